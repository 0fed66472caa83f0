"""Shared by the server tests (here and in tests/test_hostile.py, test_serve_text.py, test_demo.py): a live
uvicorn server, PNG bytes (and a PNG bomb), Prometheus metric parsing, the PyTorch reference path.
The module-scoped fixtures built from these live in tests/server/conftest.py."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("tritonclient.http")
pytest.importorskip("onnxruntime")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from serve.index import FeatureIndex  # noqa: E402
from serve.preprocess import Preprocessor  # noqa: E402
from serve.server import bind_socket  # noqa: E402
from zoo.data import transform_for  # noqa: E402

MODEL = "scan_convnet_mnist5k"
ROOT = Path(__file__).resolve().parents[2]
N_INDEX = 60


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
        from serve.http_protocol import CoalescingHttpToolsProtocol  # as serve.server.run_server serves

        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=5, http=CoalescingHttpToolsProtocol))
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


def torch_features(model, pngs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch path on the same PNG bytes: PIL.Image.open + transform_for + forward_features."""
    tf = transform_for(model)
    x = torch.stack([tf(Image.open(io.BytesIO(b))) for b in pngs])
    with torch.no_grad():
        f = model.forward_features(x)
        return f.numpy(), model.predict_cluster(x).numpy()


def prep(pngs: list[bytes], cfg: dict) -> np.ndarray:
    """The server's preprocessing of PNG bytes, as the batch tensor a KServe v2 client sends."""
    return Preprocessor(cfg).batch([Image.open(io.BytesIO(b)) for b in pngs])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
