"""ONNX export (parity with PyTorch), the onnxruntime encoder, Triton model repositories, and a real
Triton server (PyTriton, in its own venv) driven by tritonclient."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import zoo
from serve.onnx import (
    CLUSTER_PROBS,
    FEATURES,
    OnnxEncoder,
    check_parity,
    export_onnx,
    onnx_for_model,
    read_zoo_config,
    real_images_for,
)
from serve.triton import (
    PyTritonServer,
    TritonUnavailableError,
    _free_port,
    triton_python,
    write_model_repository,
)
from zoo.cli import main

TOL = 1e-4
REPO_ROOT = Path(__file__).resolve().parents[1]


def _torch_out(model, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Independent reference: the model's own public API."""
    with torch.no_grad():
        out = {FEATURES: model.forward_features(x).numpy()}
        if model.has_cluster_head:
            out[CLUSTER_PROBS] = model.predict_cluster(x).numpy()
    return out


@pytest.fixture(scope="module")
def scan():
    return zoo.create_model("scan_convnet_mnist5k", pretrained=True).eval()


@pytest.fixture(scope="module")
def scan_onnx(scan, tmp_path_factory) -> Path:
    return export_onnx(scan, tmp_path_factory.mktemp("onnx") / "scan.onnx")


@pytest.fixture(scope="module")
def mnist_real(scan) -> torch.Tensor:
    images, note = real_images_for(scan, n=64)
    assert images is not None, note
    return images


# ----------------------------------------------------------------------------- export + parity
def test_export_parity_cluster_head_random_and_real(scan, scan_onnx, mnist_real):
    enc = OnnxEncoder(scan_onnx)
    assert enc.output_names == [FEATURES, CLUSTER_PROBS]
    torch.manual_seed(1)
    for x in (torch.randn(7, 3, 28, 28), mnist_real):
        ref, got = _torch_out(scan, x), enc.run(x.numpy())
        for name in (FEATURES, CLUSTER_PROBS):
            assert got[name].shape == ref[name].shape
            assert np.abs(got[name] - ref[name]).max() < TOL, name
    # real digits: the head's clusters agree with PyTorch's, probabilities sum to 1
    got = enc.run(mnist_real.numpy())
    np.testing.assert_allclose(got[CLUSTER_PROBS].sum(1), 1.0, atol=1e-5)
    assert (got[CLUSTER_PROBS].argmax(1) == scan.predict_cluster(mnist_real).argmax(1).numpy()).all()
    report = check_parity(scan, enc, real_images=mnist_real)
    assert set(report["random"]) == set(report["real"]) == {FEATURES, CLUSTER_PROBS}
    assert 0 < report["max_abs_diff"] < TOL and report["n_real"] == 64
    assert 0.1 < report["scale"][CLUSTER_PROBS] <= 1.0 and report["max_rel_diff"] < TOL


def test_export_parity_without_cluster_head(tmp_path):
    model = zoo.create_model("simclr_convnet_mnist5k", pretrained=True).eval()
    assert not model.has_cluster_head
    enc = OnnxEncoder(export_onnx(model, tmp_path / "simclr.onnx"))
    assert enc.output_names == [FEATURES] and enc.num_clusters is None and enc.embed_dim == 256
    real, _ = real_images_for(model, n=32)
    for x in (torch.randn(4, 3, 28, 28), real):
        assert np.abs(enc.run(x.numpy())[FEATURES] - _torch_out(model, x)[FEATURES]).max() < TOL


def test_parity_check_detects_a_model_that_changed(scan, scan_onnx):
    changed = zoo.create_model("scan_convnet_mnist5k", pretrained=True).eval()
    with torch.no_grad():
        changed.backbone.features[1].bias.add_(0.05)  # first BatchNorm's shift
    report = check_parity(changed, scan_onnx)
    assert report["random"][FEATURES] > 1e-3


@pytest.mark.parametrize(
    "arch, kwargs, size, dim",
    [("resnet18", {}, 32, 512), ("vit_s16", {"image_size": 32}, 32, 384)],
)
def test_export_other_backbones(tmp_path, arch, kwargs, size, dim):
    torch.manual_seed(0)
    cfg = {"name": f"{arch}_test", "input_size": [3, size, size], "mean": [0.5] * 3, "std": [0.5] * 3}
    model = zoo.ZooModel(arch, arch_kwargs=kwargs, pretrained_cfg=cfg).eval()
    if arch.startswith("vit"):  # the same blocks, fewer of them: export time on a 2-core machine
        model.backbone.vit.encoder.layers = model.backbone.vit.encoder.layers[:2]
    with torch.no_grad():  # inference mode must not switch ViT attention to its non-exportable fast path
        enc = OnnxEncoder(export_onnx(model, tmp_path / f"{arch}.onnx"))
    assert enc.input_shape == (3, size, size) and enc.embed_dim == dim
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size)
        assert np.abs(enc.run(x.numpy())[FEATURES] - _torch_out(model, x)[FEATURES]).max() < TOL


def test_dynamic_batch_axis_one_session(scan, scan_onnx):
    graph_input = onnx.load(str(scan_onnx)).graph.input[0]
    assert graph_input.name == "images"
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 28, 28]
    enc = OnnxEncoder(scan_onnx)
    x = torch.randn(5, 3, 28, 28).numpy()
    five = enc.run(x)
    ones = [enc.run(x[i : i + 1]) for i in range(5)]
    for name in enc.output_names:
        assert five[name].shape[0] == 5 and ones[0][name].shape[0] == 1
        np.testing.assert_allclose(np.concatenate([o[name] for o in ones]), five[name], atol=1e-5)
    empty = enc.run(np.zeros((0, 3, 28, 28), np.float32))
    assert empty[FEATURES].shape == (0, 256) and empty[CLUSTER_PROBS].shape == (0, 10)


def test_metadata_round_trip(scan, scan_onnx):
    enc = OnnxEncoder(scan_onnx)
    expected = json.loads(json.dumps(scan.config()))
    assert enc.pretrained_cfg == expected == read_zoo_config(scan_onnx)
    assert enc.name == "scan_convnet_mnist5k"
    assert enc.input_shape == (3, 28, 28) and enc.embed_dim == 256 and enc.num_clusters == 10
    assert enc.pretrained_cfg["mean"] == scan.pretrained_cfg["mean"]
    assert "CPUExecutionProvider" in enc.providers


def test_wrong_inputs_are_clear_errors(scan_onnx, tmp_path):
    enc = OnnxEncoder(scan_onnx)
    with pytest.raises(ValueError, match=r"shape \[B,3,28,28\].*\[2, 3, 32, 32\]"):
        enc.run(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="shape"):
        enc.run(np.zeros((3, 28, 28), np.float32))
    with pytest.raises(ValueError, match="float32.*float64"):
        enc.run(np.zeros((2, 3, 28, 28), np.float64))
    with pytest.raises(ValueError, match="numpy array"):
        enc.run([[0.0]])
    with pytest.raises(FileNotFoundError):
        OnnxEncoder(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ValueError, match="onnxruntime cannot load"):
        OnnxEncoder(bad)


def test_onnx_for_model_caches_by_weights(tmp_path, monkeypatch):
    import serve.onnx as so

    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = zoo.create_model("convnet_tiny").eval()
    first = onnx_for_model(model)
    assert first.parent == tmp_path / "cache" / "onnx" and first.name.startswith("convnet_tiny-")

    def no_export(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(so, "export_onnx", no_export)
    assert onnx_for_model(model) == first  # cache hit: no second export
    assert onnx_for_model(str(first)) == first  # an .onnx file is used as is
    monkeypatch.undo()
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    with torch.no_grad():
        model.cluster_head = None
        next(model.parameters()).add_(1.0)
    second = onnx_for_model(model)
    assert second != first and second.is_file()
    assert sorted(p.name for p in second.parent.iterdir()) == sorted([first.name, second.name])  # no temp files
    # The cache keeps the newest KEEP_EXPORTS exports of a name; another name's files are not touched.
    (second.parent / "convnet_tiny_2-0123456789abcdef.onnx").write_bytes(b"another model's export")
    made = [first, second]
    for _ in range(so.KEEP_EXPORTS):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        made.append(onnx_for_model(model))
    names = sorted(p.name for p in second.parent.iterdir())
    assert names == sorted([p.name for p in made[-so.KEEP_EXPORTS:]] + ["convnet_tiny_2-0123456789abcdef.onnx"])


# ----------------------------------------------------------------------------- CLI
def _parse_diffs(text: str) -> dict[str, dict[str, float]]:
    found = {}
    for kind in ("random inputs", "real images"):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(kind))
        found[kind] = {k: float(v) for k, v in re.findall(r"(features|cluster_probs) ([0-9.e+-]+)", line)}
    return found


def test_cli_export_prints_diffs_and_writes(tmp_path, capsys):
    out = tmp_path / "sub" / "scan.onnx"
    assert main(["export", "scan_convnet_mnist5k", "--onnx", str(out)]) == 0
    text = capsys.readouterr().out
    diffs = _parse_diffs(text)
    assert "256 mnist5k/test images" in text
    for kind in diffs:
        assert set(diffs[kind]) == {"features", "cluster_probs"}
        assert all(0 <= v < TOL for v in diffs[kind].values()), text
    assert OnnxEncoder(out).name == "scan_convnet_mnist5k"
    assert [p.name for p in out.parent.iterdir()] == ["scan.onnx"]

    # a tolerance nothing meets: exit 1, nothing written under the target name
    strict = tmp_path / "strict.onnx"
    assert main(["export", "simclr_convnet_mnist5k", "--onnx", str(strict), "--tolerance", "1e-12"]) == 1
    captured = capsys.readouterr()
    assert "exceeds the tolerance" in captured.err and not strict.exists()
    assert list(tmp_path.glob(".strict*")) == []


def test_cli_export_skips_real_check_when_dataset_not_bundled(tmp_path, capsys):
    assert main(["export", "convnet_tiny", "--onnx", str(tmp_path / "t.onnx")]) == 0
    text = capsys.readouterr().out
    assert "real images: skipped" in text and "--check-data" in text
    assert main(["export", "convnet_tiny", "--onnx", str(tmp_path / "t.onnx"), "--check-data", "digits"]) == 0
    assert "digits/test images" in capsys.readouterr().out


# ----------------------------------------------------------------------------- Triton model repository
def _parser_python() -> str:
    """An interpreter with tritonclient[grpc]: the triton venv's, else this one's (it has tritonclient too)."""
    try:
        return str(triton_python())
    except TritonUnavailableError:
        return sys.executable


PARSE_PBTXT = """
import json, sys
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
cfg = text_format.Parse(open(sys.argv[1]).read(), model_config_pb2.ModelConfig())
print(json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)))
"""


def _parse_config(path: Path) -> dict:
    proc = subprocess.run([_parser_python(), "-c", PARSE_PBTXT, str(path)], capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _onnx_io(path: Path) -> tuple[dict, dict]:
    graph = onnx.load(str(path)).graph

    def dims(v):
        return [d.dim_value for d in v.type.tensor_type.shape.dim][1:]

    return {v.name: dims(v) for v in graph.input}, {v.name: dims(v) for v in graph.output}


def test_triton_repository_config_matches_onnx_graph(scan_onnx, tmp_path):
    repo = tmp_path / "repo"
    (repo / "other_model").mkdir(parents=True)
    folder = write_model_repository(scan_onnx, repo, max_batch_size=16, max_queue_delay_us=250, instances=2,
                                    kind="cpu")
    assert folder == repo / "scan_convnet_mnist5k"
    assert (folder / "1" / "model.onnx").read_bytes() == scan_onnx.read_bytes()
    cfg = _parse_config(folder / "config.pbtxt")
    assert cfg["name"] == "scan_convnet_mnist5k"
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["backend"] == "onnxruntime"
    assert int(cfg["max_batch_size"]) == 16
    assert int(cfg["dynamic_batching"]["max_queue_delay_microseconds"]) == 250
    assert cfg["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    inputs, outputs = _onnx_io(folder / "1" / "model.onnx")
    assert {t["name"]: [int(d) for d in t["dims"]] for t in cfg["input"]} == inputs == {"images": [3, 28, 28]}
    assert {t["name"]: [int(d) for d in t["dims"]] for t in cfg["output"]} == outputs
    assert outputs == {"features": [256], "cluster_probs": [10]}
    assert {t["data_type"] for t in cfg["input"] + cfg["output"]} == {"TYPE_FP32"}
    zoo_cfg = json.loads(cfg["parameters"]["zoo_config"]["string_value"])
    assert zoo_cfg["name"] == "scan_convnet_mnist5k" and zoo_cfg["input_size"] == [3, 28, 28]

    # rewriting replaces the model folder, leaves others and no temporary folders behind
    write_model_repository(scan_onnx, repo, kind="gpu", name="scan-v2")
    write_model_repository(scan_onnx, repo, kind="gpu")
    assert sorted(p.name for p in repo.iterdir()) == ["other_model", "scan-v2", "scan_convnet_mnist5k"]
    assert _parse_config(folder / "config.pbtxt")["instance_group"][0]["kind"] == "KIND_GPU"
    with pytest.raises(ValueError, match="kind"):
        write_model_repository(scan_onnx, repo, kind="tpu")
    with pytest.raises(ValueError, match="model name"):
        write_model_repository(scan_onnx, repo, name="bad/name")


def test_cli_triton_from_model_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    assert main(["triton", "simclr_convnet_mnist5k", "--out", str(repo), "--max-batch-size", "8"]) == 0
    assert "tritonserver --model-repository" in capsys.readouterr().out
    cfg = _parse_config(repo / "simclr_convnet_mnist5k" / "config.pbtxt")
    assert int(cfg["max_batch_size"]) == 8 and [t["name"] for t in cfg["output"]] == ["features"]
    assert cfg["instance_group"][0]["kind"] == "KIND_GPU"


# ----------------------------------------------------------------------------- real Triton (PyTriton)
def test_missing_triton_venv_is_a_clear_error(tmp_path, monkeypatch, scan_onnx):
    monkeypatch.setenv("ZOO_TRITON_PYTHON", str(tmp_path / "nowhere" / "bin" / "python"))
    with pytest.raises(TritonUnavailableError, match="python3 -m venv .*nvidia-pytriton"):
        PyTritonServer(scan_onnx).start()


def test_worker_failure_reports_its_log(scan_onnx, tmp_path):
    # this venv has no pytriton: the worker dies at once and the error carries its log
    server = PyTritonServer(scan_onnx, python=sys.executable, startup_timeout_s=60, log_path=tmp_path / "w.log")
    with pytest.raises(TritonUnavailableError, match=r"(?s)exited with code.*pytriton"):
        server.start()
    assert server.process is None


def _triton_or_skip() -> Path:
    try:
        return triton_python()
    except TritonUnavailableError as exc:
        pytest.skip(f"PyTriton venv missing (scripts/setup.sh --tests builds it): {exc}")


@pytest.fixture(scope="module")
def triton_serve(scan_onnx):
    """``zoo serve --backend triton`` (real CLI flags, serve_triton_backend) in a subprocess; stopped with SIGTERM."""
    python = _triton_or_skip()
    port = _free_port("127.0.0.1")
    code = (
        "import sys; from zoo.cli import build_parser; from serve.triton import serve_triton_backend; "
        "sys.exit(serve_triton_backend(build_parser().parse_args(sys.argv[1:])))"
    )
    env = {k: v for k, v in os.environ.items() if k != "ZOO_API_KEY"}
    env["ZOO_TRITON_PYTHON"] = str(python)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "serve", "--backend", "triton", "--model", str(scan_onnx),
         "--port", str(port), "--threads", "1", "--max-batch-size", "16", "--max-queue-delay-ms", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    lines: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Triton serving" in line:
            break
    if not lines or "Triton serving" not in lines[-1]:
        proc.kill()
        pytest.fail("zoo serve --backend triton did not start:\n" + "".join(lines) + proc.stdout.read())
    yield {"proc": proc, "address": f"127.0.0.1:{port}", "lines": lines}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)


@pytest.fixture(scope="module")
def client(triton_serve):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(triton_serve["address"], concurrency=4)
    yield c
    try:
        c.close()
    except Exception:  # already closed by the shutdown test
        pass


def test_pytriton_health_and_metadata(triton_serve, client):
    assert f"http://127.0.0.1:{triton_serve['address'].split(':')[1]}" in triton_serve["lines"][-1]
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("scan_convnet_mnist5k")
    meta = client.get_model_metadata("scan_convnet_mnist5k")
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 28, 28]}]
    assert meta["outputs"] == [
        {"name": "features", "datatype": "FP32", "shape": [-1, 256]},
        {"name": "cluster_probs", "datatype": "FP32", "shape": [-1, 10]},
    ]
    config = client.get_model_config("scan_convnet_mnist5k")
    assert int(config["max_batch_size"]) == 16
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 1000


def _infer(client, x: np.ndarray, **kw):
    import tritonclient.http as httpclient

    inp = httpclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    outs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in (FEATURES, CLUSTER_PROBS)]
    return inp, outs


def test_pytriton_infer_equals_onnxruntime_and_torch(client, scan, scan_onnx, mnist_real):
    x = np.ascontiguousarray(mnist_real[:5].numpy())
    inp, outs = _infer(client, x)
    result = client.infer("scan_convnet_mnist5k", [inp], outputs=outs)
    local = OnnxEncoder(scan_onnx).run(x)
    ref = _torch_out(scan, mnist_real[:5])
    for name in (FEATURES, CLUSTER_PROBS):
        got = result.as_numpy(name)
        assert got.shape == ref[name].shape and got.dtype == np.float32
        np.testing.assert_allclose(got, local[name], atol=1e-5)
        assert np.abs(got - ref[name]).max() < TOL


def test_pytriton_concurrent_requests_are_batched_correctly(client, scan_onnx, mnist_real):
    enc = OnnxEncoder(scan_onnx)
    batches = [np.ascontiguousarray(mnist_real[i * 3 : i * 3 + 3].numpy()) for i in range(4)]
    pending = []
    for x in batches:
        inp, outs = _infer(client, x)
        pending.append(client.async_infer("scan_convnet_mnist5k", [inp], outputs=outs))
    for x, req in zip(batches, pending):
        got = req.get_result(timeout=60).as_numpy(FEATURES)
        np.testing.assert_allclose(got, enc.run(x)[FEATURES], atol=1e-5)


def test_pytriton_rejects_a_wrong_shape(client):
    from tritonclient.utils import InferenceServerException

    inp, outs = _infer(client, np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("scan_convnet_mnist5k", [inp], outputs=outs)


def test_pytriton_sigterm_stops_cleanly(triton_serve, client):
    proc = triton_serve["proc"]
    client.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    rest = proc.stdout.read()
    assert "stopping Triton" in rest
    import urllib.request

    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{triton_serve['address']}/v2/health/live", timeout=2)


# ----------------------------------------------------------------------------- benchmark script
def test_onnx_vs_torch_benchmark_smoke(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("onnx_vs_torch", REPO_ROOT / "benchmarks" / "onnx_vs_torch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.json"
    rows = bench.main(["--models", "convnet_tiny", "--size", "16", "--batch", "4", "--rounds", "2", "--steps", "1",
                       "--warmup", "0", "--threads", str(torch.get_num_threads()), "--json", str(out)])
    saved = json.loads(out.read_text())["rows"]
    assert saved == rows and rows[0]["model"] == "convnet_tiny" and rows[0]["input"] == [3, 16, 16]
    r = rows[0]
    assert r["torch_img_s"] > 0 and r["onnx_img_s"] > 0 and r["parity_max_abs_diff"] < TOL
    assert r["ratio"] == pytest.approx(r["torch_batch_s"] / r["onnx_batch_s"])
    assert "| convnet_tiny | 3x16x16 | 4 |" in capsys.readouterr().out
