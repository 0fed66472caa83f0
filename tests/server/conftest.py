"""Module-scoped fixtures of the server tests (pytest injects them into every test module here): the
shipped SCAN model, its ONNX export and encoder, 60 MNIST test PNGs, a flat index of them, a live server."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")  # serve.onnx needs it; tests.server.helpers skips for the other extras

import zoo  # noqa: E402
from serve.onnx import OnnxEncoder, export_onnx  # noqa: E402
from serve.server import create_app  # noqa: E402
from tests.server.helpers import MODEL, N_INDEX, LiveServer, Recording, make_index, png_bytes, torch_features  # noqa: E402
from zoo.data import load_dataset  # noqa: E402


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
