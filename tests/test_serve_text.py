"""Text in the server: both CLIP towers in ONNX (+ Triton repository), /embed_text, /search?text=,
/classify?labels=, KServe v2 with a BYTES input, and clear 4xx for bad text (the server keeps serving)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

pytest.importorskip("open_clip")
pytest.importorskip("onnxruntime")
tritonhttp = pytest.importorskip("tritonclient.http")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import zoo  # noqa: E402
from serve.onnx import OnnxEncoder, check_parity, export_onnx  # noqa: E402
from serve.onnx_text import OnnxTextEncoder, check_text_parity, export_text_onnx, write_clip_repository  # noqa: E402
from serve.server import create_app  # noqa: E402
from serve.text import MAX_LABELS  # noqa: E402
from tests.server.helpers import LiveServer, make_index, png_bytes  # noqa: E402
from zoo.data import load_dataset, transform_for  # noqa: E402

MODEL = "clip_convnet_shapes"
N = 200


@pytest.fixture(scope="module")
def clip():
    return zoo.create_model(MODEL, pretrained=True).eval()


@pytest.fixture(scope="module")
def towers(clip, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    return (OnnxEncoder(export_onnx(clip, d / "image.onnx"), threads=1),
            OnnxTextEncoder(export_text_onnx(clip, d / "text.onnx"), threads=1))


@pytest.fixture(scope="module")
def data(clip):
    ds = load_dataset("shapes", "test", transform=transform_for(clip), n_test=N)
    x = torch.stack([ds[i][0] for i in range(N)])
    with torch.no_grad():
        feats = clip.forward_features(x).numpy()
    return ds, feats


@pytest.fixture(scope="module")
def live(towers, data, clip):
    ds, feats = data
    index = make_index(feats, [f"shapes/test/{i}" for i in range(N)], MODEL, clip.pretrained_cfg, ds.targets)
    app = create_app(list(towers), index, max_batch_size=16, max_queue_delay_ms=2.0, timeout_s=20.0)
    with LiveServer(app) as srv:
        yield srv


def test_both_towers_export_with_parity(clip, towers, tmp_path, monkeypatch):
    image, text = towers
    assert check_parity(clip, image)["max_abs_diff"] < 1e-4
    assert check_text_parity(clip, text) < 1e-4
    assert text.name == f"{MODEL}_text" and text.input_shape == (16,) and text.embed_dim == 64
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    image_dir, text_dir = write_clip_repository(clip, tmp_path / "repo")
    assert image_dir.name == MODEL and text_dir.name == f"{MODEL}_text"
    cfg = (text_dir / "config.pbtxt").read_text()
    assert 'name: "tokens"' in cfg and "TYPE_INT64" in cfg and "dims: [ 16 ]" in cfg and 'name: "text_features"' in cfg
    assert (text_dir / "1" / "model.onnx").is_file() and (image_dir / "1" / "model.onnx").is_file()
    from zoo.cli import main

    assert main(["triton", MODEL, "--out", str(tmp_path / "cli_repo")]) == 0  # the CLI writes both towers
    assert sorted(p.name for p in (tmp_path / "cli_repo").iterdir()) == [MODEL, f"{MODEL}_text"]
    assert OnnxTextEncoder(tmp_path / "cli_repo" / f"{MODEL}_text" / "1" / "model.onnx").embed_dim == 64


def test_embed_text_matches_model(live, clip):
    texts = ["a red circle", "something blue on a noisy background"]
    r = live.http.post("/embed_text", json={"texts": texts})
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["embeddings"])
    np.testing.assert_allclose(got, clip.embed_text(texts).numpy(), atol=1e-5)
    assert r.json()["truncated"] == [False, False] and r.json()["model"] == f"{MODEL}_text"
    one = live.http.get("/embed_text", params={"text": "a red circle"}).json()["embeddings"]
    np.testing.assert_allclose(one, got[:1], atol=1e-6)


def test_search_by_text(live, clip, data):
    ds, feats = data
    r = live.http.get("/search", params={"text": "a red circle", "k": 5})
    assert r.status_code == 200, r.text
    ids = [int(n["item"].rsplit("/", 1)[1]) for n in r.json()["neighbours"]]
    q = clip.embed_text(["a red circle"])[0].numpy()
    expected = np.argsort(-(F.normalize(torch.from_numpy(feats), dim=1).numpy() @ q))[:5]
    assert ids == expected.tolist()
    assert all(ds.concepts["shape"][i] == 0 and ds.concepts["colour"][i] == 0 for i in ids)  # circles, red


def test_classify_with_labels(live, clip, data):
    ds, feats = data
    i = int(np.flatnonzero(ds.concepts["shape"] == 2)[0])  # a triangle
    labels = ["circle", "square", "triangle", "cross"]
    r = live.http.post("/classify", params={"labels": ",".join(labels)},
                       files={"file": ("t.png", png_bytes(ds.get_pil(i)), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    img = F.normalize(torch.from_numpy(feats[i]), dim=0)
    logits = clip.logit_scale.detach().exp() * clip.embed_text(labels) @ img
    np.testing.assert_allclose(body["probabilities"], logits.softmax(0).numpy(), atol=1e-4)
    assert body["label"] == "triangle" and body["labels"] == labels


def test_kserve_bytes_input(live, clip):
    c = tritonhttp.InferenceServerClient(live.url)
    md = c.get_model_metadata(f"{MODEL}_text")
    assert md["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    texts = ["a green square", "a picture of a cross"]
    ref = clip.encode_text(clip.tokenize(texts).ids).detach().numpy()
    for binary in (True, False):
        inp = tritonhttp.InferInput("text", [2], "BYTES")
        inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary)
        out = c.infer(f"{MODEL}_text", [inp], outputs=[tritonhttp.InferRequestedOutput("text_features",
                                                                                      binary_data=binary)])
        np.testing.assert_allclose(out.as_numpy("text_features"), ref, atol=1e-5)


def _bytes_request(raw: list[bytes]) -> tuple[bytes, dict]:
    blob = b"".join(struct.pack("<I", len(b)) + b for b in raw)
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(raw)],
                                     "parameters": {"binary_data_size": len(blob)}}]}).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


def test_bad_text_gets_clear_4xx_and_server_keeps_serving(live):
    h = live.http
    cases = [
        (h.post("/embed_text", json={"texts": []}), "no text"),
        (h.post("/embed_text", json={"texts": ["ok", "   "]}), "text 1 is empty"),
        (h.post("/embed_text", json={"texts": ["x" * 3000]}), "characters; the limit"),
        (h.post("/embed_text", content=b'{"texts": ["\xff\xfe"]}'), "not valid UTF-8"),
        (h.get("/embed_text?text=%FF%FE"), "not valid UTF-8"),
        (h.get("/search?text="), "text 0 is empty"),
        (h.get("/search?text=%C3%28"), "not valid UTF-8"),
        (h.post("/classify", params={"labels": ",".join(["a"] * (MAX_LABELS + 1))},
                files={"file": ("a.png", b"x", "image/png")}), "labels; the limit"),
        (h.post("/classify", params={"labels": "cat,,dog"}, files={"file": ("a.png", b"x", "image/png")}),
         "label 1 is empty"),
    ]
    body, headers = _bytes_request([b"a red circle", b"\xff bad"])
    cases.append((h.post(f"/v2/models/{MODEL}_text/infer", content=body, headers=headers), "not valid UTF-8"))
    body, headers = _bytes_request([b""])
    cases.append((h.post(f"/v2/models/{MODEL}_text/infer", content=body, headers=headers), "text 0 is empty"))
    for r, message in cases:
        assert r.status_code == 400, (message, r.status_code, r.text)
        assert message in r.json()["error"], (message, r.json())
    long = " ".join(["red"] * 40)  # 40 words > the 16-token context: cut and said so
    r = h.post("/embed_text", json={"texts": [long, "a red circle"]})
    assert r.status_code == 200 and r.json()["truncated"] == [True, False] and "cut to fit" in r.json()["note"]
    body, headers = _bytes_request([long.encode()])
    r = h.post(f"/v2/models/{MODEL}_text/infer", content=body, headers=headers)
    assert r.status_code == 200 and r.headers["X-Zoo-Truncated"] == "0"
    assert h.get("/v2/health/ready").status_code == 200
    assert h.post("/embed_text", json={"texts": ["a red circle"]}).status_code == 200


def test_image_only_server_says_no_text_tower(towers):
    from fastapi.testclient import TestClient

    app = create_app(towers[0])
    with TestClient(app) as client:
        r = client.post("/embed_text", json={"texts": ["a red circle"]})
    assert r.status_code == 400 and "no text tower is served" in r.json()["error"]
