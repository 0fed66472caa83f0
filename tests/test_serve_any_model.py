"""``zoo serve --model X`` for any model: a folder ``zoo convert`` wrote from an ImageNet-layout checkpoint
(its dataset, imagenet-1k, is not on this machine) is served with no index; ``--images DIR`` builds the
index and the demo from a user's folder, reporting and skipping unreadable files."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import zoo
from zoo.cli import build_parser, main
from zoo.data import load_dataset, transform_for

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
tritonhttp = pytest.importorskip("tritonclient.http")
from fastapi.testclient import TestClient  # noqa: E402

from serve.app import build_embedded, dataset_available, image_source  # noqa: E402

FLAGS = ("--index DIR", "--images DIR", "--data NAME")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def zoo_cache(tmp_path_factory):
    """One $ZOO_CACHE for the module: each model is exported to ONNX once (the server's cache)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOO_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def swav_folder(tmp_path_factory) -> Path:
    """A ResNet in SwAV's release layout (``module.`` prefix, projection head, prototypes), converted by
    ``zoo convert`` into a model folder: its config names imagenet-1k, 224x224 inputs."""
    tmp = tmp_path_factory.mktemp("swav")
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    state["module.projection_head.0.weight"] = torch.randn(32, 512)
    state["module.projection_head.0.bias"] = torch.zeros(32)
    state["module.prototypes.weight"] = torch.randn(10, 32)
    torch.save(state, tmp / "swav_800ep_pretrain.pth.tar")
    out = tmp / "swav_r18"
    assert main(["convert", str(tmp / "swav_800ep_pretrain.pth.tar"), "--out", str(out), "--format", "swav",
                 "--name", "swav_r18_in1k"]) == 0
    return out


def _serve_then(check):
    """A stand-in for ``serve.server.run_server``: serve ``cli_serve``'s real app on its bound socket in a
    thread, run ``check(base_url)``, stop. Errors are kept to be raised after ``main`` returns."""
    import uvicorn

    errors: list[BaseException] = []

    def run(app, sock, **_kw) -> int:
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            deadline = time.time() + 30
            while not server.started:
                assert thread.is_alive() and time.time() < deadline, "server did not start"
                time.sleep(0.02)
            check(f"127.0.0.1:{sock.getsockname()[1]}")
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            errors.append(e)
        finally:
            server.should_exit = True
            thread.join(15)
            sock.close()
        return 0

    return run, errors


def test_converted_imagenet_folder_is_served_with_no_index(swav_folder, monkeypatch, capsys):
    """`zoo serve --model DIR` (the real CLI path): v2 infer and /embed give the PyTorch model's features,
    /search is a 409 naming how to attach an index, /demo says why there is none."""
    import serve.server

    model = zoo.create_model(str(swav_folder)).eval()
    assert model.pretrained_cfg["dataset"] == "imagenet-1k" and not model.has_cluster_head
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 50, 3), dtype=np.uint8)) for i in range(2)]
    pngs = [_png(p) for p in pil]
    tf = transform_for(model)
    x = torch.stack([tf(Image.open(io.BytesIO(b))) for b in pngs])
    with torch.no_grad():
        want = model.forward_features(x).numpy()

    def check(url: str) -> None:
        with httpx.Client(base_url=f"http://{url}", timeout=30) as http:
            r = http.post("/embed", files=[("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)],
                          params={"normalize": "false"})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(np.asarray(r.json()["embeddings"]), want, rtol=1e-3, atol=1e-4)
            r = http.post("/search", files={"file": ("q.png", pngs[0], "image/png")})
            assert r.status_code == 409 and "no index is loaded" in r.json()["error"], r.text
            assert all(flag in r.json()["error"] for flag in FLAGS), r.text
            r = http.get("/demo")
            assert r.status_code == 404 and "imagenet-1k" in r.json()["error"] and "--images DIR" in r.json()["error"]
            assert http.get("/demo/anything").status_code == 404
            r = http.post("/classify", files={"file": ("q.png", pngs[0], "image/png")})
            assert r.status_code == 400 and "no cluster head" in r.json()["error"]  # and the server keeps serving
        prep = np.stack([tf(p).numpy() for p in pil]).astype(np.float32)
        with tritonhttp.InferenceServerClient(url) as c:
            inp = tritonhttp.InferInput("images", list(prep.shape), "FP32")
            inp.set_data_from_numpy(prep)
            feats = c.infer("swav_r18_in1k", [inp]).as_numpy("features")
        np.testing.assert_allclose(feats, want, rtol=1e-3, atol=1e-4)

    run, errors = _serve_then(check)
    monkeypatch.setattr(serve.server, "run_server", run)
    monkeypatch.delenv("ZOO_API_KEY", raising=False)
    code = main(["serve", "--model", str(swav_folder), "--port", str(_free_port()), "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0 and "unknown dataset" not in out + err, out + err
    assert "/search is off" in out and "/demo is off" in out and "imagenet-1k" in out, out
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> tuple[Path, list[str]]:
    """12 mnist5k digits as PNGs in two sub-folders, plus a corrupt and a truncated file."""
    root = tmp_path_factory.mktemp("photos")
    ds = load_dataset("mnist5k", split="test")
    names = []
    for i in range(12):
        rel = f"{'ab'[i % 2]}/{i:02d}.png"
        (root / rel).parent.mkdir(exist_ok=True)
        ds.get_pil(i).save(root / rel)
        names.append(rel)
    (root / "a" / "broken.png").write_bytes(b"this is not an image")
    (root / "b" / "truncated.png").write_bytes((root / "b" / "01.png").read_bytes()[:60])
    return root, names


def _args(*argv: str):
    return build_parser().parse_args(["serve", *argv, "--threads", "1"])


@pytest.mark.parametrize("demo", [True, False])
def test_images_folder_builds_the_index_skipping_unreadable_files(photo_folder, tmp_path, monkeypatch, capsys, demo):
    root, names = photo_folder
    argv = ["--model", "simclr_convnet_mnist5k", "--images", str(root)] + ([] if demo else ["--no-demo"])
    app, info = build_embedded(_args(*argv))
    err = capsys.readouterr().err
    for bad in ("broken.png", "truncated.png"):
        assert f"skipped unreadable image {root / ('a' if bad == 'broken.png' else 'b') / bad}" in err, err
    assert "features" in err  # the embedding's progress bar
    if demo:
        assert "checking images" in err  # the full decode check's progress bar
    assert info["demo"] is demo and "12 items" in info["index"] and "2 unreadable skipped" in info["index"]
    index = app.state.zoo["index"]
    assert sorted(index.items.values()) == sorted(names)
    # the folder's own images are their own nearest neighbours; the features are the model's
    model = zoo.create_model("simclr_convnet_mnist5k", pretrained=True).eval()
    with TestClient(app) as client:
        for rel in (names[3], names[8]):
            r = client.post("/search", files={"file": ("q.png", (root / rel).read_bytes(), "image/png")},
                            params={"k": 3})
            assert r.status_code == 200, r.text
            assert r.json()["neighbours"][0]["item"] == rel and r.json()["index_size"] == 12
        r = client.post("/embed", files={"files": ("q.png", (root / names[0]).read_bytes(), "image/png")},
                        params={"normalize": "false"})
        with torch.no_grad():
            want = model.forward_features(transform_for(model)(Image.open(root / names[0]))[None]).numpy()
        np.testing.assert_allclose(np.asarray(r.json()["embeddings"]), want, rtol=1e-3, atol=1e-4)
        r = client.get("/demo/")
        if demo:
            assert r.status_code == 200 and "gradio" in r.text.lower()
        else:
            assert r.status_code == 404 and "--no-demo" in r.json()["error"]


def test_image_source_for_every_registered_model(tmp_path, monkeypatch):
    """The default images behind /search and the demo: the model's dataset when this machine can load it,
    else none with the reason; explicit flags win; bad combinations are refused."""
    monkeypatch.setenv("ZOO_DATA", str(tmp_path / "no-data"))  # cifar10 & co. without their files
    for name in zoo.list_models():
        cfg = zoo.model_info(name)
        src = image_source(_args("--model", name), cfg, have_model=True)
        dataset = cfg.get("dataset")
        if dataset in ("mnist5k", "digits", "shapes", "shapes_captions"):  # bundled / generated
            assert src.data == dataset and not src.why_none, name
        else:
            assert src.data is None and src.images is None and src.why_none, name
            assert (repr(dataset) in src.why_none) if dataset else "no training dataset" in src.why_none
    assert image_source(_args(), zoo.model_info("scan_convnet_mnist5k"), True).data == "mnist5k"  # zoo serve
    assert image_source(_args("--data", "digits"), {"dataset": "imagenet-1k"}, True).data == "digits"
    assert image_source(_args("--images", "x"), {"dataset": "imagenet-1k"}, True).images == "x"
    ok, why = dataset_available("cifar10")
    assert not ok and "not on this machine" in why and str(tmp_path / "no-data") in why
    assert "'imagenet-1k' is not one the zoo can load" in dataset_available("imagenet-1k")[1]
    with pytest.raises(ValueError, match="bare .onnx"):
        image_source(_args("--data", "digits"), {}, have_model=False)
    with pytest.raises(SystemExit):  # argparse: --images and --data are exclusive
        _args("--images", "x", "--data", "digits")


def test_explicit_data_that_cannot_load_is_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZOO_DATA", str(tmp_path / "no-data"))
    port = str(_free_port())
    assert main(["serve", "--model", "simclr_convnet_mnist5k", "--data", "cifar10", "--port", port]) == 2
    assert "cifar10" in capsys.readouterr().err
    assert main(["serve", "--model", "simclr_convnet_mnist5k", "--images", str(tmp_path / "nope"), "--port",
                 port]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_default_serves_scan_with_the_mnist5k_demo(tmp_path, monkeypatch):
    """`zoo serve` with no arguments: scan_convnet_mnist5k, /search over the 1,000 mnist5k test digits, the
    demo mounted, /classify equal to the model's cluster head."""
    app, info = build_embedded(_args())
    assert info["model"] == "scan_convnet_mnist5k" and info["demo"] and not info["notes"]
    assert info["index"].startswith("mnist5k test split") and "1000 items" in info["index"]
    model = zoo.create_model("scan_convnet_mnist5k", pretrained=True).eval()
    ds = load_dataset("mnist5k", split="test")
    png = _png(ds.get_pil(7))
    with TestClient(app) as client:
        r = client.post("/search", files={"file": ("q.png", png, "image/png")}, params={"k": 1})
        assert r.status_code == 200 and r.json()["neighbours"][0]["item"] == "mnist5k/test/7", r.text
        r = client.post("/classify", files={"file": ("q.png", png, "image/png")})
        with torch.no_grad():
            want = int(model.predict_cluster(transform_for(model)(Image.open(io.BytesIO(png)))[None])[0].argmax())
        assert r.status_code == 200 and r.json()["cluster"] == want
        assert client.get("/demo/").status_code == 200
