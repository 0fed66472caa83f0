"""The HTTP feature server's routes: KServe v2 / Triton protocol (tritonclient), /embed /search /classify,
and bad input answered 4xx naming the problem (then the server keeps serving)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

tritonhttp = pytest.importorskip("tritonclient.http")

from PIL import Image  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

import zoo  # noqa: E402
from serve.onnx import OnnxEncoder, export_onnx  # noqa: E402
from serve.server import create_app  # noqa: E402
from tests.server.helpers import (  # noqa: E402
    MODEL,
    LiveServer,
    bomb_png,
    make_index,
    metric_samples,
    metric_sum,
    png_bytes,
    prep,
    torch_features,
)

# ----------------------------------------------------------------------------- KServe v2 / Triton


def test_tritonclient_metadata_and_repository(live, encoder):
    c = tritonhttp.InferenceServerClient(live.url)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready(MODEL) and c.is_model_ready(MODEL, "1")
    assert not c.is_model_ready("no_such_model")
    meta = c.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"] and meta["name"]
    md = c.get_model_metadata(MODEL)
    assert md == c.get_model_metadata(MODEL, "1")
    assert md["name"] == MODEL and md["versions"] == ["1"] and md["platform"] == "onnxruntime_onnx"
    assert md["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 28, 28]}]
    assert md["outputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 256]},
                             {"name": "cluster_probs", "datatype": "FP32", "shape": [-1, 10]}]
    cfg = c.get_model_config(MODEL)
    assert cfg["name"] == MODEL and cfg["max_batch_size"] == 16 and cfg["input"][0]["dims"] == [3, 28, 28]
    assert c.get_model_repository_index() == [{"name": MODEL, "version": "1", "state": "READY"}]
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("no_such_model")
    assert e.value.status() == "404" and "no_such_model" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata(MODEL, "7")
    assert e.value.status() == "404"
    c.close()


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer_equals_onnx_and_torch(live, encoder, torch_model, test_pngs, binary):
    pngs = test_pngs[0][:5]
    x = prep(pngs, torch_model.pretrained_cfg)
    c = tritonhttp.InferenceServerClient(live.url)
    inp = tritonhttp.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [tritonhttp.InferRequestedOutput("features", binary_data=binary),
            tritonhttp.InferRequestedOutput("cluster_probs", binary_data=binary)]
    res = c.infer(MODEL, [inp], outputs=outs, request_id="req-42")
    assert res.get_response()["id"] == "req-42"
    assert (res.get_output("features").get("parameters") is not None) == binary
    feats, probs = res.as_numpy("features"), res.as_numpy("cluster_probs")
    direct = encoder.inner.run(x)
    np.testing.assert_allclose(feats, direct["features"], atol=1e-5)
    np.testing.assert_allclose(probs, direct["cluster_probs"], atol=1e-5)
    t_feats, t_probs = torch_features(torch_model, pngs)
    np.testing.assert_allclose(feats, t_feats, atol=1e-4)
    np.testing.assert_allclose(probs, t_probs, atol=1e-4)
    # no outputs named: all of them, binary (binary_data_output); a subset when named
    res = c.infer(MODEL, [inp])
    np.testing.assert_allclose(res.as_numpy("cluster_probs"), direct["cluster_probs"], atol=1e-5)
    res = c.infer(MODEL, [inp], outputs=[tritonhttp.InferRequestedOutput("cluster_probs", binary_data=binary)])
    assert res.as_numpy("features") is None and res.as_numpy("cluster_probs").shape == (5, 10)
    c.close()


def test_infer_raw_json_nested_data(live, encoder, test_pngs, torch_model):
    x = prep(test_pngs[0][:2], torch_model.pretrained_cfg)
    body = {"id": "n", "inputs": [{"name": "images", "shape": [2, 3, 28, 28], "datatype": "FP32",
                                   "data": x.tolist()}], "outputs": [{"name": "features"}]}
    r = live.http.post(f"/v2/models/{MODEL}/versions/1/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == MODEL and out["id"] == "n" and out["outputs"][0]["shape"] == [2, 256]
    np.testing.assert_allclose(np.array(out["outputs"][0]["data"]).reshape(2, 256),
                               encoder.inner.run(x)["features"], atol=1e-5)


# --------------------------------------------------------------------------------- for people


def test_embed_matches_pytorch_on_the_same_png_bytes(live, torch_model, test_pngs):
    pngs = test_pngs[0][:3]
    files = [("files", (f"digit{i}.png", b, "image/png")) for i, b in enumerate(pngs)]
    r = live.http.post("/embed", files=files, params={"normalize": "false"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == MODEL and out["dim"] == 256 and out["files"] == ["digit0.png", "digit1.png", "digit2.png"]
    t_feats, _ = torch_features(torch_model, pngs)
    np.testing.assert_allclose(np.array(out["embeddings"]), t_feats, atol=1e-4)
    r = live.http.post("/embed", files=files)  # default: L2-normalised, like model.embed
    emb = np.array(r.json()["embeddings"])
    np.testing.assert_allclose(emb, t_feats / np.linalg.norm(t_feats, axis=1, keepdims=True), atol=1e-5)


def test_search_returns_the_indexed_image_first(live, test_pngs):
    pngs, labels = test_pngs
    for i in (3, 17):
        r = live.http.post("/search", files={"file": ("q.png", pngs[i], "image/png")}, params={"k": 5})
        assert r.status_code == 200, r.text
        nb = r.json()["neighbours"]
        assert len(nb) == 5 and nb[0]["item"] == f"mnist5k/test/{i}" and nb[0]["id"] == i
        assert nb[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert all(a["score"] >= b["score"] for a, b in zip(nb, nb[1:]))
        assert nb[0]["label"] == int(labels[i])


def test_classify_equals_predict_cluster(live, torch_model, test_pngs):
    pngs = test_pngs[0][:4]
    _, t_probs = torch_features(torch_model, pngs)
    for b, p in zip(pngs, t_probs):
        r = live.http.post("/classify", files={"file": ("x.png", b, "image/png")})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["cluster"] == int(np.argmax(p)) and out["num_clusters"] == 10
        np.testing.assert_allclose(out["probabilities"], p, atol=1e-4)
        assert out["confidence"] == pytest.approx(float(p.max()), abs=1e-4)


def test_search_without_index_and_classify_without_head(tmp_path):
    model = zoo.create_model("simclr_convnet_mnist5k", pretrained=True).eval()
    enc = OnnxEncoder(export_onnx(model, tmp_path / "simclr.onnx"), threads=1)
    png = png_bytes(Image.new("L", (28, 28), 128))
    with LiveServer(create_app(enc)) as srv:
        r = srv.http.post("/search", files={"file": ("q.png", png, "image/png")})
        assert r.status_code == 409 and "no index is loaded" in r.json()["error"]
        r = srv.http.post("/classify", files={"file": ("q.png", png, "image/png")})
        assert r.status_code == 400 and "no cluster head" in r.json()["error"]
        assert srv.http.post("/embed", files={"files": ("q.png", png, "image/png")}).status_code == 200


def test_index_of_another_model_is_refused(encoder):
    other = make_index(np.eye(2, 256, dtype=np.float32), ["a", "b"], "simclr_convnet_mnist5k",
                       encoder.pretrained_cfg, [0, 1])
    with pytest.raises(ValueError, match="built by model 'simclr_convnet_mnist5k'"):
        create_app(encoder, other)


# ------------------------------------------------------------------------------------ bad input


def test_bad_input_is_4xx_naming_the_problem_and_the_server_recovers(live, test_pngs, torch_model):
    good_png = test_pngs[0][0]
    x = prep([good_png], torch_model.pretrained_cfg)
    url = f"/v2/models/{MODEL}/infer"

    def good_requests():
        assert live.http.post("/classify", files={"file": ("g.png", good_png, "image/png")}).status_code == 200
        body = {"inputs": [{"name": "images", "shape": [1, 3, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}]}
        assert live.http.post(url, json=body).status_code == 200

    def infer_body(**over):
        inp = {"name": "images", "shape": [1, 3, 28, 28], "datatype": "FP32", "data": x.ravel().tolist()}
        inp.update(over)
        return {"inputs": [inp]}

    truncated = good_png[: len(good_png) // 2]
    cases = [
        ("post", "/classify", {"files": {"file": ("notes.txt", b"hello, not an image", "text/plain")}}, 400, "not an image"),
        ("post", "/embed", {"files": {"files": ("half.png", truncated, "image/png")}}, 400, "truncated"),
        ("post", "/search", {"files": {"file": ("bomb.png", bomb_png(), "image/png")}}, 400, "pixels"),
        ("post", "/embed", {"files": {"files": ("empty.png", b"", "image/png")}}, 400, "empty"),
        ("post", "/embed", {"data": {"normalize": "true"}}, 400, "files"),
        ("post", "/v2/models/{m}/infer", {"json": infer_body(shape=[1, 3, 32, 32])}, 400, "shape"),
        ("post", "/v2/models/{m}/infer", {"json": infer_body(shape=[1, 3, 28, 28], data=[1.0, 2.0])}, 400, "values"),
        ("post", "/v2/models/{m}/infer", {"json": infer_body(datatype="FP64")}, 400, "FP64"),
        ("post", "/v2/models/{m}/infer", {"json": infer_body(name="pixels")}, 400, "pixels"),
        ("post", "/v2/models/{m}/infer", {"json": infer_body(data=[["a"]])}, 400, "data"),
        ("post", "/v2/models/{m}/infer", {"content": b"{not json", "headers": {"content-type": "application/json"}},
         400, "JSON"),
        ("post", "/v2/models/{m}/infer", {"content": b'{"inputs":[]}xx',
                                          "headers": {"Inference-Header-Content-Length": "13"}}, 400, "inputs"),
        ("post", "/v2/models/{m}/infer",
         {"content": json.dumps(infer_body(parameters={"binary_data_size": 9408})).encode(),
          "headers": {"Inference-Header-Content-Length": "99999"}}, 400, "Inference-Header-Content-Length"),
        ("post", "/v2/models/{m}/infer", {"json": {**infer_body(), "outputs": [{"name": "logits"}]}}, 400, "logits"),
        ("post", "/v2/models/nope/infer", {"json": infer_body()}, 404, "nope"),
        ("get", "/v2/models/nope", {}, 404, "unknown model"),
        ("post", "/v2/models/{m}/infer", {"content": b"x" * ((1 << 20) + 1)}, 413, "limit"),
        ("post", "/search", {"files": {"file": ("g.png", good_png, "image/png")}, "params": {"k": 0}}, 400, "k"),
    ]
    for method, path, kw, status, needle in cases:
        r = getattr(live.http, method)(path.format(m=MODEL), **kw)
        assert r.status_code == status, (path, needle, r.status_code, r.text)
        assert needle in r.json()["error"], (path, r.json())
        good_requests()
    # binary tensor of the wrong length, through the binary extension
    raw = x.tobytes()
    hdr = json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 28, 28], "datatype": "FP32",
                                  "parameters": {"binary_data_size": len(raw) - 4}}]}).encode()
    r = live.http.post(url, content=hdr + raw[:-4], headers={"Inference-Header-Content-Length": str(len(hdr))})
    assert r.status_code == 400 and "binary_data_size" in r.json()["error"]
    good_requests()
    samples = metric_samples(live.http.get("/metrics").text)
    assert metric_sum(samples, "zoo_http_failures_total", kind="server") == 0


def test_chunked_body_over_the_limit_is_refused_while_streaming(live, test_pngs):
    """No Content-Length: the server counts while reading and answers 413 before the body ends."""
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  "Content-Type: application/octet-stream\r\n\r\n".encode())
        chunk = b"0" * 65536
        sent = 0
        response = b""
        for _ in range(64):  # up to 4 MiB, 4x the limit; stop as soon as the server answers
            try:
                s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
            except OSError:
                break
            s.settimeout(0.05)
            try:
                response = s.recv(65536)
            except TimeoutError:
                continue
            finally:
                s.settimeout(10)
            if response:
                break
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert sent <= (1 << 20) + 2 * len(chunk)
        assert b"exceeds the limit" in response or b"exceeds the limit" in s.recv(65536)
    good = test_pngs[0][0]
    assert live.http.post("/classify", files={"file": ("g.png", good, "image/png")}).status_code == 200
