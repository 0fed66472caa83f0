"""The HTTP feature server in operation: dynamic batching under load, metrics, auth, timeouts, TCP_NODELAY,
graceful shutdown on SIGTERM, and the ``zoo serve`` command end to end."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
tritonhttp = pytest.importorskip("tritonclient.http")

from tritonclient.utils import InferenceServerException  # noqa: E402

from serve.onnx import OnnxEncoder  # noqa: E402
from serve.server import bind_socket, create_app  # noqa: E402
from tests.server.helpers import (  # noqa: E402
    MODEL,
    ROOT,
    LiveServer,
    Recording,
    free_port,
    make_index,
    metric_samples,
    metric_sum,
    prep,
    torch_features,
)

# ------------------------------------------------------------------------------ batching, load


def test_concurrent_requests_are_merged_into_one_encoder_call(onnx_path, torch_model, test_pngs):
    enc = Recording(OnnxEncoder(onnx_path, threads=1), delay_s=0.05)
    app = create_app(enc, max_batch_size=32, max_queue_delay_ms=200.0)
    x = prep(test_pngs[0][:12], torch_model.pretrained_cfg)
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
    x = prep(test_pngs[0][:8], torch_model.pretrained_cfg)
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


def test_cli_serve_refuses_an_index_of_another_model(tmp_path, monkeypatch, capsys, encoder):
    from zoo.cli import main

    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    other = make_index(np.eye(2, 256, dtype=np.float32), ["a", "b"], "simclr_convnet_mnist5k",
                       encoder.pretrained_cfg, [0, 1])
    other.save(tmp_path / "idx")
    args = ["serve", "--index", str(tmp_path / "idx"), "--no-demo", "--port", str(free_port()), "--threads", "1",
            "--grpc-port", "-1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "built by model 'simclr_convnet_mnist5k'" in err and MODEL in err


def test_zoo_serve_end_to_end_then_sigterm_exits_0(tmp_path, index, test_pngs, torch_model):
    """The real command: ONNX export into the cache, --index, tritonclient + /search, SIGTERM -> exit 0."""
    index.save(tmp_path / "idx")
    port = free_port()
    env = {**os.environ, "ZOO_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", "import sys; from zoo.cli import main; sys.exit(main())", "serve", "--no-demo",
           "--index", str(tmp_path / "idx"), "--port", str(port), "--threads", "1", "--api-key", "k",
           "--grpc-port", str(free_port())]
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
        x = prep(test_pngs[0][:2], torch_model.pretrained_cfg)
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
    x = prep(test_pngs[0][:1], torch_model.pretrained_cfg)
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
