"""The KServe v2 gRPC front end (Triton's inference.GRPCInferenceService) through ``tritonclient.grpc``:
health, metadata, config, infer equal to HTTP's and to PyTorch, one shared batcher, auth, limits,
status codes for bad input (then a good request succeeds), metrics, and the ``zoo serve`` command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
tritongrpc = pytest.importorskip("tritonclient.grpc")
pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from serve.grpc_server import attach_grpc  # noqa: E402
from serve.server import create_app  # noqa: E402
from tests.server.helpers import (  # noqa: E402
    MODEL,
    ROOT,
    LiveServer,
    Recording,
    free_port,
    metric_samples,
    metric_sum,
    prep,
    torch_features,
)

SHAPE = (3, 28, 28)


class GrpcLive(LiveServer):
    """HTTP (uvicorn) and gRPC on free ports, one app, one event loop."""

    def __init__(self, app):
        self.frontend = attach_grpc(app, "127.0.0.1", 0)
        super().__init__(app)

    def __enter__(self):
        super().__enter__()
        self.grpc_url = self.frontend.address
        self.client = tritongrpc.InferenceServerClient(self.grpc_url)
        self.channel = grpc.insecure_channel(self.grpc_url)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        return self

    def __exit__(self, *exc):
        self.client.close()
        self.channel.close()
        super().__exit__(*exc)


@pytest.fixture(scope="module")
def live(encoder):
    app = create_app(encoder, max_batch_size=16, max_queue_delay_ms=5.0, max_body_bytes=1 << 20, timeout_s=20.0)
    with GrpcLive(app) as srv:
        yield srv


def _grpc_input(x: np.ndarray, dtype: str = "FP32"):
    inp = tritongrpc.InferInput("images", list(x.shape), dtype)
    inp.set_data_from_numpy(x)
    return inp


def _code(exc: pytest.ExceptionInfo) -> str:
    return exc.value.status().removeprefix("StatusCode.")


def _http_infer(srv, x: np.ndarray) -> dict[str, np.ndarray]:
    import tritonclient.http as tritonhttp

    with tritonhttp.InferenceServerClient(srv.url) as c:
        inp = tritonhttp.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        r = c.infer(MODEL, [inp])
        return {n: r.as_numpy(n) for n in ("features", "cluster_probs")}


# ------------------------------------------------------------------------------------ health, metadata


def test_health_metadata_and_config_match_http(live):
    c = live.client
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready(MODEL) and c.is_model_ready(MODEL, "1")
    assert not c.is_model_ready("no_such_model") and not c.is_model_ready(MODEL, "7")
    meta = c.get_server_metadata(as_json=True)
    assert meta["name"] == live.http.get("/v2").json()["name"] and meta["version"]
    http_md = live.http.get(f"/v2/models/{MODEL}").json()
    md = c.get_model_metadata(MODEL, as_json=True)  # int64 fields come back as strings in proto JSON
    assert md["name"] == MODEL and md["versions"] == ["1"] and md["platform"] == http_md["platform"]
    for side in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(s) for s in t["shape"]]) for t in md[side]] == \
               [(t["name"], t["datatype"], t["shape"]) for t in http_md[side]]
    cfg = c.get_model_config(MODEL).config  # a model_config_pb2.ModelConfig message
    http_cfg = live.http.get(f"/v2/models/{MODEL}/config").json()
    assert cfg.name == MODEL and cfg.max_batch_size == http_cfg["max_batch_size"] == 16
    assert list(cfg.input[0].dims) == [3, 28, 28] and cfg.input[0].data_type == 11  # TYPE_FP32
    assert [o.name for o in cfg.output] == ["features", "cluster_probs"] and list(cfg.output[1].dims) == [10]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 5000
    assert cfg.parameters["zoo_config"].string_value == http_cfg["parameters"]["zoo_config"]["string_value"]
    idx = c.get_model_repository_index(as_json=True)["models"]
    assert [(m["name"], m["version"], m["state"]) for m in idx] == [(MODEL, "1", "READY")]
    for call in (lambda: c.get_model_metadata("no_such_model"), lambda: c.get_model_config(MODEL, "7")):
        with pytest.raises(InferenceServerException) as e:
            call()
        assert _code(e) == "NOT_FOUND" and ("no_such_model" in e.value.message() or "'7'" in e.value.message())


# ------------------------------------------------------------------------------------------ inference


def test_infer_equals_http_and_pytorch(live, torch_model, test_pngs):
    pngs = test_pngs[0][:5]
    x = prep(pngs, torch_model.pretrained_cfg)
    outs = [tritongrpc.InferRequestedOutput("features"), tritongrpc.InferRequestedOutput("cluster_probs")]
    r = live.client.infer(MODEL, [_grpc_input(x)], outputs=outs, request_id="g-1")
    assert r.get_response().id == "g-1" and r.get_response().model_name == MODEL
    assert len(r.get_response().raw_output_contents) == 2  # raw outputs, as Triton sends them
    http = _http_infer(live, x)
    np.testing.assert_array_equal(r.as_numpy("features"), http["features"])  # same encoder, same input
    np.testing.assert_array_equal(r.as_numpy("cluster_probs"), http["cluster_probs"])
    t_feats, t_probs = torch_features(torch_model, pngs)  # the independent PyTorch path
    np.testing.assert_allclose(r.as_numpy("features"), t_feats, atol=1e-4)
    np.testing.assert_allclose(r.as_numpy("cluster_probs"), t_probs, atol=1e-4)
    # no outputs named: all of them; one named: only that one
    assert live.client.infer(MODEL, [_grpc_input(x)]).as_numpy("cluster_probs").shape == (5, 10)
    one = live.client.infer(MODEL, [_grpc_input(x)], outputs=[tritongrpc.InferRequestedOutput("cluster_probs")])
    assert one.as_numpy("features") is None and one.as_numpy("cluster_probs").shape == (5, 10)


def test_typed_contents_equal_raw_contents(live, torch_model, test_pngs):
    x = prep(test_pngs[0][:2], torch_model.pretrained_cfg)
    req = pb.ModelInferRequest(model_name=MODEL, model_version="1")
    t = req.inputs.add(name="images", datatype="FP32", shape=x.shape)
    t.contents.fp32_contents.extend(x.ravel().tolist())
    resp = live.stub.ModelInfer(req, timeout=30)
    names = [o.name for o in resp.outputs]
    feats = np.frombuffer(resp.raw_output_contents[names.index("features")], dtype="<f4")
    assert list(resp.outputs[names.index("features")].shape) == [2, 256]
    np.testing.assert_array_equal(feats.reshape(2, 256), _http_infer(live, x)["features"])


def test_grpc_and_http_requests_share_one_batcher(encoder, torch_model, test_pngs):
    rec = Recording(encoder.inner)
    app = create_app(rec, max_batch_size=16, max_queue_delay_ms=400.0)
    x = prep(test_pngs[0][:4], torch_model.pretrained_cfg)
    with GrpcLive(app) as srv:
        results: dict[str, np.ndarray] = {}

        def via_grpc(i: int) -> None:
            with tritongrpc.InferenceServerClient(srv.grpc_url) as c:
                results[f"g{i}"] = c.infer(MODEL, [_grpc_input(x[i:i + 1])]).as_numpy("features")

        def via_http(i: int) -> None:
            results[f"h{i}"] = _http_infer(srv, x[i:i + 1])["features"]

        threads = [threading.Thread(target=f, args=(i,)) for f, i in ((via_grpc, 0), (via_grpc, 1),
                                                                      (via_http, 2), (via_http, 3))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert rec.sizes == [4], rec.sizes  # the 2 gRPC and 2 HTTP requests ran as ONE encoder call
        direct = encoder.inner.run(x)["features"]
        for key, i in (("g0", 0), ("g1", 1), ("h2", 2), ("h3", 3)):
            np.testing.assert_allclose(results[key][0], direct[i], atol=1e-5)
        s = metric_samples(srv.http.get("/metrics").text)
        assert metric_sum(s, "zoo_images_total", model=MODEL) == 4
        assert metric_sum(s, "zoo_http_requests_total", method="GRPC", status="OK",
                          endpoint="/inference.GRPCInferenceService/ModelInfer") == 2
        assert metric_sum(s, "zoo_http_requests_total", method="POST", status="200",
                          endpoint="/v2/models/{name}/infer") == 2


# --------------------------------------------------------------------------------- errors, limits


def _poisoned(x: np.ndarray, value: float) -> np.ndarray:
    bad = x.copy()
    bad.reshape(-1)[5] = value
    return bad


def test_bad_input_gets_a_status_code_then_a_good_request_succeeds(live, torch_model, test_pngs):
    good = prep(test_pngs[0][:1], torch_model.pretrained_cfg)
    expected = live.client.infer(MODEL, [_grpc_input(good)]).as_numpy("features")
    big = np.zeros((400, *SHAPE), np.float32)  # 3.8 MB > the 1 MiB body limit
    cases = [
        ("wrong shape", lambda: live.client.infer(MODEL, [_grpc_input(np.zeros((1, 3, 8, 8), np.float32))]),
         "INVALID_ARGUMENT", "shape"),
        ("wrong dtype", lambda: live.client.infer(MODEL, [_grpc_input(good.astype(np.float64), "FP64")]),
         "INVALID_ARGUMENT", "FP64"),
        ("unknown model", lambda: live.client.infer("no_such_model", [_grpc_input(good)]), "NOT_FOUND",
         "no_such_model"),
        ("unknown version", lambda: live.client.infer(MODEL, [_grpc_input(good)], model_version="3"), "NOT_FOUND",
         "version"),
        ("unknown output", lambda: live.client.infer(MODEL, [_grpc_input(good)],
                                                     outputs=[tritongrpc.InferRequestedOutput("logits")]),
         "INVALID_ARGUMENT", "logits"),
        ("oversized", lambda: live.client.infer(MODEL, [_grpc_input(big)]), "RESOURCE_EXHAUSTED", ""),
        ("NaN", lambda: live.client.infer(MODEL, [_grpc_input(_poisoned(good, np.nan))]), "INVALID_ARGUMENT",
         "element 5 (flat index) is NaN"),  # the same value rule as HTTP (serve.kserve.check_fp32_tensor)
        ("Inf", lambda: live.client.infer(MODEL, [_grpc_input(_poisoned(good, np.inf))]), "INVALID_ARGUMENT",
         "element 5 (flat index) is Inf"),
    ]
    for what, call, code, word in cases:
        with pytest.raises(InferenceServerException) as e:
            call()
        assert _code(e) == code, (what, e.value.status(), e.value.message())
        assert word in e.value.message(), (what, e.value.message())
        np.testing.assert_array_equal(live.client.infer(MODEL, [_grpc_input(good)]).as_numpy("features"), expected)
    # malformed messages the client library would not build: raw byte count, wrong input name, no data
    for mutate, word in ((lambda r: r.raw_input_contents.append(b"\0" * 12), "bytes"),
                         (lambda r: (r.inputs[0].__setattr__("name", "pixels"),
                                     r.raw_input_contents.append(good.tobytes())), "pixels"),
                         (lambda r: None, "no data")):
        req = pb.ModelInferRequest(model_name=MODEL)
        req.inputs.add(name="images", datatype="FP32", shape=good.shape)
        mutate(req)
        with pytest.raises(grpc.RpcError) as e:
            live.stub.ModelInfer(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and word in e.value.details(), e.value.details()
    np.testing.assert_array_equal(live.client.infer(MODEL, [_grpc_input(good)]).as_numpy("features"), expected)
    s = metric_samples(live.http.get("/metrics").text)
    ep = "/inference.GRPCInferenceService/ModelInfer"
    assert metric_sum(s, "zoo_http_requests_total", endpoint=ep, method="GRPC", status="INVALID_ARGUMENT") >= 8
    assert metric_sum(s, "zoo_http_failures_total", endpoint=ep, kind="client") >= 10


def test_bearer_token_in_metadata(encoder, torch_model, test_pngs):
    x = prep(test_pngs[0][:1], torch_model.pretrained_cfg)
    with GrpcLive(create_app(encoder, api_key="s3cret")) as srv:
        c = srv.client
        assert c.is_server_live() and c.is_server_ready()  # health needs no key, as on HTTP
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": "Basic czNjcmV0"}):
            for call in (lambda h=headers: c.get_model_metadata(MODEL, headers=h),
                         lambda h=headers: c.infer(MODEL, [_grpc_input(x)], headers=h)):
                with pytest.raises(InferenceServerException) as e:
                    call()
                assert _code(e) == "UNAUTHENTICATED" and "API key" in e.value.message()
        ok = {"authorization": "Bearer s3cret"}
        assert c.get_model_metadata(MODEL, headers=ok).name == MODEL
        feats = c.infer(MODEL, [_grpc_input(x)], headers=ok).as_numpy("features")
        np.testing.assert_allclose(feats, encoder.inner.run(x)["features"], atol=1e-5)


def test_timeout_is_deadline_exceeded_and_the_next_request_succeeds(encoder, torch_model, test_pngs):
    slow = Recording(encoder.inner, delay_s=1.0)
    x = prep(test_pngs[0][:1], torch_model.pretrained_cfg)
    with GrpcLive(create_app(slow, timeout_s=0.3, max_queue_delay_ms=0.0)) as srv:
        with pytest.raises(InferenceServerException) as e:
            srv.client.infer(MODEL, [_grpc_input(x)])
        assert _code(e) == "DEADLINE_EXCEEDED" and "0.3 s" in e.value.message()
        time.sleep(1.0)  # the abandoned batch finishes
        slow.delay_s = 0.0
        np.testing.assert_allclose(srv.client.infer(MODEL, [_grpc_input(x)]).as_numpy("features"),
                                   encoder.inner.run(x)["features"], atol=1e-5)
        s = metric_samples(srv.http.get("/metrics").text)
        assert metric_sum(s, "zoo_http_failures_total", kind="timeout",
                          endpoint="/inference.GRPCInferenceService/ModelInfer") == 1


# ---------------------------------------------------------------------------------------- the command


def test_cli_grpc_port_in_use_is_exit_2(capsys):
    from zoo.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--port", str(free_port()), "--grpc-port", str(port), "--no-demo"]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "--grpc-port" in err


def test_zoo_serve_speaks_grpc_then_sigterm_exits_0(tmp_path, onnx_path, torch_model, test_pngs):
    port, gport = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZOO_CACHE": str(tmp_path / "cache")}
    env.pop("ZOO_API_KEY", None)
    cmd = [sys.executable, "-c", "import sys; from zoo.cli import main; sys.exit(main())", "serve", "--no-demo",
           "--model", str(onnx_path), "--port", str(port), "--grpc-port", str(gport), "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:
            if "gRPC" in line:
                assert f"127.0.0.1:{gport}" in line, line
                break
        else:
            pytest.fail(proc.stderr.read())
        x = prep(test_pngs[0][:2], torch_model.pretrained_cfg)
        with tritongrpc.InferenceServerClient(f"127.0.0.1:{gport}") as c:
            assert c.is_server_ready()
            feats = c.infer(MODEL, [_grpc_input(x)]).as_numpy("features")
        np.testing.assert_allclose(feats, torch_features(torch_model, test_pngs[0][:2])[0], atol=1e-4)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------ the batcher's hot path


class _Blocking:
    """An encoder that records batch sizes and can be held (to queue work behind it)."""

    name = "blocking"

    def __init__(self):
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def run(self, x):
        self.gate.wait(10)
        self.sizes.append(len(x))
        return {"features": x.reshape(len(x), -1).sum(axis=1, keepdims=True)}


def test_batcher_runs_a_full_batch_at_once_a_lone_request_after_the_delay_and_times_out():
    import asyncio

    from serve.server import DynamicBatcher

    async def scenario():
        enc = _Blocking()
        x = np.arange(8, dtype=np.float32).reshape(8, 1, 1, 1)
        b = DynamicBatcher(enc, max_batch_size=4, max_queue_delay_s=30.0)
        t0 = time.perf_counter()  # 4 requests fill the batch: no 30 s wait
        outs = await asyncio.gather(*(b.submit(x[i:i + 1]) for i in range(4)))
        assert time.perf_counter() - t0 < 5 and enc.sizes == [4]
        assert [float(o["features"][0, 0]) for o in outs] == [0.0, 1.0, 2.0, 3.0]
        out = await b.submit(x)  # 8 images: two full batches, outputs in order
        np.testing.assert_array_equal(out["features"][:, 0], x.ravel())
        assert enc.sizes == [4, 4, 4]
        await b.aclose()

        b = DynamicBatcher(enc, max_batch_size=4, max_queue_delay_s=0.2)
        t0 = time.perf_counter()
        await b.submit(x[:1])  # alone: runs once the delay is over
        assert 0.18 <= time.perf_counter() - t0 < 5 and enc.sizes[-1] == 1
        enc.gate.clear()  # hold the encoder: the next request cannot finish in time
        with pytest.raises(TimeoutError):
            await b.submit(x[:2], timeout=0.3)
        enc.gate.set()
        out = await b.submit(x[2:3], timeout=5)  # the server keeps serving
        assert float(out["features"][0, 0]) == 2.0
        await b.aclose()
        with pytest.raises(RuntimeError, match="shutting down"):
            await b.submit(x[:1])

    asyncio.run(scenario())
