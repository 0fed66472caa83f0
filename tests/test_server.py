"""The HTTP feature server: KServe v2 / Triton protocol (tritonclient), /embed /search /classify,
dynamic batching, metrics, auth, limits, timeouts, graceful shutdown."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
tritonhttp = pytest.importorskip("tritonclient.http")
pytest.importorskip("onnxruntime")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

import zoo  # noqa: E402
from serve.index import FeatureIndex  # noqa: E402
from serve.onnx import OnnxEncoder, export_onnx  # noqa: E402
from serve.preprocess import Preprocessor  # noqa: E402
from serve.server import bind_socket, create_app  # noqa: E402
from zoo.data import load_dataset, transform_for  # noqa: E402

MODEL = "scan_convnet_mnist5k"
ROOT = Path(__file__).resolve().parents[1]
N_INDEX = 60


# ----------------------------------------------------------------------------------------- helpers


class Recording:
    """Wraps an encoder; records every ``run`` batch size (independently of the server's counters)."""

    def __init__(self, inner, delay_s: float = 0.0):
        self.inner = inner
        self.delay_s = delay_s
        self.sizes: list[int] = []
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, images):
        with self._lock:
            self.sizes.append(len(images))
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.inner.run(images)


class LiveServer:
    """uvicorn running ``app`` in a background thread on 127.0.0.1, a free port."""

    def __init__(self, app):
        import uvicorn

        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"127.0.0.1:{self.port}"
        self.base = f"http://{self.url}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.http = httpx.Client(base_url=self.base, timeout=30)  # one client: no per-request SSL setup

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.http.close()
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A ~100-byte PNG whose header declares width x height 8-bit RGB (a zlib bomb if decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 << 16), 9)  # first rows of zeros; the rest is "missing"
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric_sum(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == str(w) for k, w in labels.items()))


def make_index(features: np.ndarray, items: list[str], model_name: str, cfg: dict, labels) -> FeatureIndex:
    return FeatureIndex.build(features, items, model_name=model_name, preprocess=Preprocessor(cfg).config(),
                              index_type="flat", labels=labels)


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def torch_model():
    return zoo.create_model(MODEL, pretrained=True).eval()


@pytest.fixture(scope="module")
def onnx_path(torch_model, tmp_path_factory):
    return export_onnx(torch_model, tmp_path_factory.mktemp("onnx") / f"{MODEL}.onnx")


@pytest.fixture(scope="module")
def encoder(onnx_path):
    return Recording(OnnxEncoder(onnx_path, threads=1))


@pytest.fixture(scope="module")
def test_pngs():
    ds = load_dataset("mnist5k", split="test")
    return [png_bytes(ds.get_pil(i)) for i in range(N_INDEX)], ds.targets[:N_INDEX]


def torch_features(model, pngs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch path on the same PNG bytes: PIL.Image.open + transform_for + forward_features."""
    tf = transform_for(model)
    x = torch.stack([tf(Image.open(io.BytesIO(b))) for b in pngs])
    with torch.no_grad():
        f = model.forward_features(x)
        return f.numpy(), model.predict_cluster(x).numpy()


@pytest.fixture(scope="module")
def index(torch_model, test_pngs):
    pngs, labels = test_pngs
    feats, _ = torch_features(torch_model, pngs)
    items = [f"mnist5k/test/{i}" for i in range(len(pngs))]
    return make_index(feats, items, MODEL, torch_model.pretrained_cfg, labels)


@pytest.fixture(scope="module")
def live(encoder, index):
    app = create_app(encoder, index, max_batch_size=16, max_queue_delay_ms=5.0, max_body_bytes=1 << 20,
                     timeout_s=20.0)
    with LiveServer(app) as srv:
        srv.app = app
        yield srv


def _prep(pngs: list[bytes], cfg: dict) -> np.ndarray:
    return Preprocessor(cfg).batch([Image.open(io.BytesIO(b)) for b in pngs])


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
    x = _prep(pngs, torch_model.pretrained_cfg)
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
    x = _prep(test_pngs[0][:2], torch_model.pretrained_cfg)
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
    x = _prep([good_png], torch_model.pretrained_cfg)
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


# ------------------------------------------------------------------------------ batching, load


def test_concurrent_requests_are_merged_into_one_encoder_call(onnx_path, torch_model, test_pngs):
    enc = Recording(OnnxEncoder(onnx_path, threads=1), delay_s=0.05)
    app = create_app(enc, max_batch_size=32, max_queue_delay_ms=200.0)
    x = _prep(test_pngs[0][:12], torch_model.pretrained_cfg)
    expected = enc.inner.run(x)["features"]
    with LiveServer(app) as srv:

        def one(i):
            with tritonhttp.InferenceServerClient(srv.url) as c:
                inp = tritonhttp.InferInput("images", [1, 3, 28, 28], "FP32")
                inp.set_data_from_numpy(x[i:i + 1])
                return c.infer(MODEL, [inp]).as_numpy("features")

        with ThreadPoolExecutor(12) as pool:
            feats = list(pool.map(one, range(12)))
    # every request got its own rows back ...
    np.testing.assert_allclose(np.concatenate(feats), expected, atol=1e-5)
    # ... from fewer encoder calls than requests, at least one of them a real merge
    assert sum(enc.sizes) == 12 and len(enc.sizes) < 12 and max(enc.sizes) > 1, enc.sizes
    assert list(app.state.zoo["models"][MODEL].batcher.batch_sizes) == enc.sizes


def test_load_8_clients_zero_errors_and_batching_in_metrics(live, torch_model, test_pngs):
    x = _prep(test_pngs[0][:8], torch_model.pretrained_cfg)
    before = metric_samples(live.http.get("/metrics").text)
    stop = time.time() + 6.0
    counts, errors = [0] * 8, []

    def client(i):
        with tritonhttp.InferenceServerClient(live.url) as c:
            inp = tritonhttp.InferInput("images", [1, 3, 28, 28], "FP32")
            inp.set_data_from_numpy(x[i:i + 1])
            while time.time() < stop:
                try:
                    f = c.infer(MODEL, [inp]).as_numpy("features")
                    assert f.shape == (1, 256)
                    counts[i] += 1
                except Exception as e:  # noqa: BLE001 - collected and asserted below
                    errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    after = metric_samples(live.http.get("/metrics").text)
    endpoint = "/v2/models/{name}/infer"

    def delta(name, **lab):
        return metric_sum(after, name, **lab) - metric_sum(before, name, **lab)

    assert delta("zoo_http_requests_total", endpoint=endpoint, status=200) == sum(counts) > 50
    batches = delta("zoo_batch_size_count", model=MODEL)
    images = delta("zoo_batch_size_sum", model=MODEL)
    assert images == sum(counts)
    assert images / batches > 1.0, (images, batches)


def test_metrics_count_requests_by_endpoint_and_status(encoder, test_pngs):
    from fastapi import FastAPI

    sub = FastAPI()
    sub.get("/")(lambda: {"sub": True})
    app = create_app(encoder, demo_mount=lambda a: a.mount("/sub", sub))  # like the Gradio demo
    png = test_pngs[0][0]
    with LiveServer(app) as srv:
        assert srv.http.get("/sub/").json() == {"sub": True}
        assert srv.http.get("/nope").status_code == 404
        for _ in range(3):
            assert srv.http.post("/embed", files={"files": ("a.png", png, "image/png")}).status_code == 200
        for _ in range(2):
            assert srv.http.post("/embed", files={"files": ("a.txt", b"nope", "text/plain")}).status_code == 400
        assert srv.http.get("/v2/models/missing").status_code == 404
        text = srv.http.get("/metrics").text
    s = metric_samples(text)
    assert metric_sum(s, "zoo_http_requests_total", endpoint="/embed", status=200) == 3
    assert metric_sum(s, "zoo_http_requests_total", endpoint="/embed", status=400) == 2
    assert metric_sum(s, "zoo_http_requests_total", endpoint="/v2/models/{name}", status=404) == 1
    assert metric_sum(s, "zoo_http_requests_total", endpoint="/sub", status=200) == 1
    assert metric_sum(s, "zoo_http_requests_total", endpoint="/", status=200) == 0
    assert metric_sum(s, "zoo_http_requests_total", endpoint="unmatched", status=404) == 1
    assert metric_sum(s, "zoo_http_failures_total", endpoint="/embed", kind="client") == 2
    assert metric_sum(s, "zoo_batch_size_sum", model=MODEL) == 3
    assert metric_sum(s, "zoo_batch_size_count", model=MODEL) == 3
    assert metric_sum(s, "zoo_queue_wait_seconds_count", model=MODEL) == 3
    assert metric_sum(s, "zoo_compute_seconds_count", model=MODEL) == 3
    assert metric_sum(s, "zoo_http_requests_in_flight") == 1  # the /metrics request itself


# ----------------------------------------------------------------------------- auth, timeout


def test_bearer_token_auth(encoder, test_pngs):
    with LiveServer(create_app(encoder, api_key="s3cret")) as srv:
        assert srv.http.get("/v2/health/ready").status_code == 200  # health needs no key
        assert srv.http.get("/v2/health/live").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}):
            r = srv.http.get(f"/v2/models/{MODEL}", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            assert "API key" in r.json()["error"]
            r = srv.http.post("/embed", headers=headers,
                           files={"files": ("a.png", test_pngs[0][0], "image/png")})
            assert r.status_code == 401
        assert srv.http.get("/metrics").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert srv.http.get(f"/v2/models/{MODEL}", headers=ok).status_code == 200
        with tritonhttp.InferenceServerClient(srv.url) as c:
            assert c.is_server_ready()
            with pytest.raises(InferenceServerException) as e:
                c.get_model_metadata(MODEL)
            assert e.value.status() == "401"
            assert c.get_model_metadata(MODEL, headers=ok)["name"] == MODEL


def test_keyed_demo_opens_in_a_browser_through_a_cookie_scoped_to_demo(encoder, test_pngs):
    from fastapi import FastAPI

    demo = FastAPI()
    demo.get("/")(lambda: {"demo": True})
    app = create_app(encoder, api_key="s3cret", demo_mount=lambda a: a.mount("/demo", demo))
    with LiveServer(app) as srv:
        assert srv.http.get("/demo/").status_code == 401
        assert srv.http.get("/demo/?api_key=wrong").status_code == 401
        r = srv.http.get("/demo/?api_key=s3cret&tab=2")  # a link a person can open once
        assert r.status_code == 303 and r.headers["location"] == "/demo/?tab=2"  # the key leaves the URL
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "Path=/demo" in cookie and "SameSite=Strict" in cookie
        jar = {"zoo_api_key": "s3cret"}
        assert srv.http.get("/demo/", cookies=jar).json() == {"demo": True}
        assert srv.http.get("/demo/", cookies={"zoo_api_key": "wrong"}).status_code == 401
        # the cookie opens the demo only: the API still needs the bearer header, and so does ?api_key=
        r = srv.http.post("/embed", cookies=jar, files={"files": ("a.png", test_pngs[0][0], "image/png")})
        assert r.status_code == 401
        assert srv.http.get("/metrics?api_key=s3cret").status_code == 401
        assert srv.http.get("/demox/?api_key=s3cret").status_code == 401


def test_timeout_is_504_and_the_next_request_succeeds(onnx_path, test_pngs):
    enc = Recording(OnnxEncoder(onnx_path, threads=1), delay_s=0.6)
    with LiveServer(create_app(enc, timeout_s=0.3)) as srv:
        files = {"file": ("a.png", test_pngs[0][0], "image/png")}
        r = srv.http.post("/classify", files=files)
        assert r.status_code == 504 and "timeout" in r.json()["error"]
        enc.delay_s = 0.0
        time.sleep(0.5)  # the slow call still occupies the encoder thread
        assert srv.http.post("/classify", files=files).status_code == 200


# ------------------------------------------------------------------------- process lifecycle

_SERVER_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from serve.server import bind_socket, create_app, run_server

    class SlowEncoder:
        name = "slow"
        pretrained_cfg = {"name": "slow", "input_size": [3, 8, 8], "mean": [0.5] * 3, "std": [0.5] * 3,
                          "crop_pct": 1.0}
        input_shape = (3, 8, 8)
        output_names = ["features"]
        embed_dim = 3
        num_clusters = None

        def run(self, images):
            time.sleep(float(sys.argv[1]))
            return {"features": images.mean(axis=(2, 3))}

    sock = bind_socket("127.0.0.1", 0)
    print(sock.getsockname()[1], flush=True)
    sys.exit(run_server(create_app(SlowEncoder()), sock, graceful_shutdown_s=20, log_level="warning"))
""")


def test_sigterm_finishes_the_request_in_flight_then_exits_0(tmp_path):
    script = tmp_path / "slow_server.py"
    script.write_text(_SERVER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), "2.0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        port = int(proc.stdout.readline())
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        x = np.arange(2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8)
        result = {}

        def slow_request():
            with tritonhttp.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=30) as c:
                inp = tritonhttp.InferInput("images", [2, 3, 8, 8], "FP32")
                inp.set_data_from_numpy(x)
                result["features"] = c.infer("slow", [inp]).as_numpy("features")

        t = threading.Thread(target=slow_request)
        t.start()
        time.sleep(0.8)  # the request is inside the 2 s encoder call
        t_sig = time.time()
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert proc.wait(30) == 0, proc.stderr.read()
        assert time.time() - t_sig > 0.5  # it waited for the request
        np.testing.assert_allclose(result["features"], x.mean(axis=(2, 3)))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_port_in_use_is_exit_2(capsys):
    from zoo.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(port), "--no-demo"]) == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_refuses_an_index_of_another_model(tmp_path, monkeypatch, capsys, encoder):
    from zoo.cli import main

    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    other = make_index(np.eye(2, 256, dtype=np.float32), ["a", "b"], "simclr_convnet_mnist5k",
                       encoder.pretrained_cfg, [0, 1])
    other.save(tmp_path / "idx")
    args = ["serve", "--index", str(tmp_path / "idx"), "--no-demo", "--port", str(_free_port()), "--threads", "1",
            "--grpc-port", "-1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "built by model 'simclr_convnet_mnist5k'" in err and MODEL in err


def test_zoo_serve_end_to_end_then_sigterm_exits_0(tmp_path, index, test_pngs, torch_model):
    """The real command: ONNX export into the cache, --index, tritonclient + /search, SIGTERM -> exit 0."""
    index.save(tmp_path / "idx")
    port = _free_port()
    env = {**os.environ, "ZOO_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", "import sys; from zoo.cli import main; sys.exit(main())", "serve", "--no-demo",
           "--index", str(tmp_path / "idx"), "--port", str(port), "--threads", "1", "--api-key", "k",
           "--grpc-port", str(_free_port())]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        printed = []
        for line in proc.stdout:
            printed.append(line)
            if "/metrics" in line:
                break
        text = "".join(printed)
        assert f"http://127.0.0.1:{port}/docs" in text and f"http://127.0.0.1:{port}/v2" in text, text
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer k"}) as http:
            deadline = time.time() + 60
            while True:
                try:
                    if http.get("/v2/health/ready", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.time() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
            r = http.post("/search", files={"file": ("q.png", test_pngs[0][5], "image/png")}, params={"k": 3})
            assert r.status_code == 200 and r.json()["neighbours"][0]["item"] == "mnist5k/test/5", r.text
        x = _prep(test_pngs[0][:2], torch_model.pretrained_cfg)
        with tritonhttp.InferenceServerClient(f"127.0.0.1:{port}") as c:
            inp = tritonhttp.InferInput("images", [2, 3, 28, 28], "FP32")
            inp.set_data_from_numpy(x)
            feats = c.infer(MODEL, [inp], headers={"Authorization": "Bearer k"}).as_numpy("features")
        np.testing.assert_allclose(feats, torch_features(torch_model, test_pngs[0][:2])[0], atol=1e-4)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_no_nagle_delay_on_small_requests(live, test_pngs, torch_model):
    """Accepted connections must have TCP_NODELAY (else Nagle + delayed ACK add ~40 ms per POST)."""
    sock = bind_socket("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    sock.close()
    x = _prep(test_pngs[0][:1], torch_model.pretrained_cfg)
    with tritonhttp.InferenceServerClient(live.url) as c:
        inp = tritonhttp.InferInput("images", [1, 3, 28, 28], "FP32")
        inp.set_data_from_numpy(x)
        c.infer(MODEL, [inp])
        times = []
        for _ in range(15):
            t = time.perf_counter()
            c.infer(MODEL, [inp])
            times.append(time.perf_counter() - t)
    assert np.median(times) < 0.035, times
