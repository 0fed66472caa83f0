"""Serving throughput and latency, side by side in one run, on the same ONNX model:

    python benchmarks/serve_throughput.py --models scan_convnet_mnist5k,resnet50 --concurrency 1,8,32

Columns: our server over HTTP and over gRPC (``zoo serve --model MODEL.onnx --no-demo --grpc-port P``,
embedded onnxruntime, dynamic batching); the real Triton server that PyTriton starts
(:class:`serve.triton.PyTritonServer`: the same ``.onnx`` in Triton's Python backend via onnxruntime)
over its HTTP and its gRPC; in-process onnxruntime (``OnnxEncoder.run``) at ``--baseline-batch`` (32).
``resnet50`` is the registered architecture with random weights at 3x224x224 (ImageNet mean/std);
other names are zoo models, pretrained when they have weights.

Both servers run at once with the same batching settings (``--max-batch-size``, ``--max-queue-delay-ms``)
and onnxruntime threads (``--threads``, 0 = all cores). Load: ``--client h2load`` (the default when
installed; Debian ``nghttp2-client``): nghttp2's C load generator, ``c`` connections with one request in
flight each, replaying one serialised single-image request (HTTP/1.1 v2 binary tensors; gRPC
``ModelInfer`` with ``raw_input_contents``), checked once per server before it is replayed; or
``--client python``: ``c`` threads in this process, one ``tritonclient.http`` / ``tritonclient.grpc``
client each. The same client drives both servers. A Python client spends about as much CPU per
request as the server, on the same cores; h2load about 40 us. Each point runs for ``--duration``
seconds after ``--warmup`` (longer for slow models: at least ``--rounds`` rounds of ``c`` requests
and ``--min-requests`` requests at the baseline rate; a model-bound server answers in whole merged
batches, so a short window's count is off by up to a batch). For each concurrency the four
server/protocol pairs run for half that time each in order, then again in reverse order (ABBA), then
the in-process baseline again, so every point is bracketed by two baseline runs and its ratio uses
their mean (a shared machine's load drifts).
Reported: images/s, p50/p99 latency, ratio to in-process, average merged batch size (our ``/metrics``;
Triton's ``nv_inference_count / nv_inference_exec_count``). Prints a table, writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def export(name: str, folder: Path) -> Path:
    """The ONNX file for ``name`` (random-weight ResNet-50 at 224 for ``resnet50``)."""
    import torch

    from serve.onnx import export_onnx, load_model

    torch.manual_seed(0)
    model = load_model(name)  # registered name: pretrained when it has weights, else random init
    cfg = model.pretrained_cfg
    print(f"{name}: input {cfg['input_size']}, mean {cfg['mean']}, weights "
          f"{'pretrained' if cfg.get('weights_source') else 'random'}", flush=True)
    return export_onnx(model, folder / f"{name}.onnx")


def inprocess_throughput(enc, x: np.ndarray, seconds: float, min_runs: int = 3) -> float:
    """Images/s of ``enc.run(x)`` (one batch per call), over at least ``seconds`` and ``min_runs`` calls."""
    n, start = 0, time.perf_counter()
    while True:
        enc.run(x)
        n += len(x)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= min_runs * len(x):
            return n / elapsed


def scrape(url: str, *names: str) -> tuple[float, ...]:
    """Counters (each summed over its labels) from a Prometheus text endpoint."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = dict.fromkeys(names, 0.0)
    for fam in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in fam.samples:
            if s.name in out:
                out[s.name] += s.value
    return tuple(out[n] for n in names)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``zoo serve --model X.onnx --no-demo`` in a subprocess on free HTTP and gRPC ports."""

    def __init__(self, onnx_path: Path, args: argparse.Namespace):
        self.port, self.grpc_port = free_port(), free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        cmd = [sys.executable, "-c", "import sys; from zoo.cli import main; sys.exit(main())", "serve",
               "--model", str(onnx_path), "--no-demo", "--port", str(self.port),
               "--grpc-port", str(self.grpc_port), "--threads", str(args.threads),
               "--max-batch-size", str(args.max_batch_size), "--max-queue-delay-ms", str(args.max_queue_delay_ms),
               "--max-body-mb", "256", "--timeout-s", "300"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("ZOO_API_KEY", None)
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a chatty server must never block on it
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True, env=env)

    def __enter__(self) -> ServerProcess:
        import httpx

        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"http://{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"server did not start: {self.log.read()[-2000:]}")
            time.sleep(0.2)

    def batch_counts(self) -> tuple[float, float, float]:
        """(images, encoder calls, failed requests) so far, from ``/metrics``."""
        return scrape(f"http://{self.url}/metrics", "zoo_batch_size_sum", "zoo_batch_size_count",
                      "zoo_http_failures_total")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()




class TritonSide:
    """The real Triton (PyTriton) serving the same ``.onnx``: its HTTP and gRPC endpoints."""

    def __init__(self, onnx_path: Path, args: argparse.Namespace):
        from serve.triton import PyTritonServer

        self.server = PyTritonServer(onnx_path, max_batch_size=args.max_batch_size, threads=args.threads,
                                     max_queue_delay_us=int(round(args.max_queue_delay_ms * 1000)),
                                     startup_timeout_s=300)

    def __enter__(self) -> TritonSide:
        self.server.start()
        self.url, self.grpc_url = self.server.http_address, self.server.grpc_address
        return self

    def batch_counts(self) -> tuple[float, float, float]:
        return scrape(f"http://127.0.0.1:{self.server.metrics_port}/metrics", "nv_inference_count_total",
                      "nv_inference_exec_count_total", "nv_inference_request_failure_total")  # parser adds _total

    def __exit__(self, *exc) -> None:
        self.server.stop()


def run_load(protocol: str, url: str, model_name: str, shape: tuple[int, ...], concurrency: int, warmup: float,
             duration: float) -> dict[str, float]:
    """``concurrency`` threads sending single-image requests (binary HTTP tensors / raw gRPC contents)."""
    if protocol == "http":
        import tritonclient.http as tc

        def connect():
            return tc.InferenceServerClient(url, connection_timeout=300, network_timeout=300)
    else:
        import tritonclient.grpc as tc

        def connect():
            return tc.InferenceServerClient(url)

    records: list[tuple[float, float]] = []
    errors: list[str] = []
    lock = threading.Lock()
    ready = threading.Barrier(concurrency + 1)
    t0_box: list[float] = []

    def client(i: int) -> None:
        x = np.random.default_rng(i).standard_normal((1, *shape)).astype(np.float32)
        with connect() as c:
            inp = tc.InferInput("images", [1, *shape], "FP32")
            if protocol == "http":
                inp.set_data_from_numpy(x, binary_data=True)
                out = [tc.InferRequestedOutput("features", binary_data=True)]
            else:
                inp.set_data_from_numpy(x)
                out = [tc.InferRequestedOutput("features")]
            timeout = {"client_timeout": 300} if protocol == "grpc" else {}  # http: network_timeout above
            c.infer(model_name, [inp], outputs=out)  # connect + warm
            ready.wait()
            end = t0_box[0] + warmup + duration
            mine = []
            while True:
                start = time.perf_counter()
                if start >= end:
                    break
                try:
                    c.infer(model_name, [inp], outputs=out, **timeout).as_numpy("features")
                except Exception as e:  # noqa: BLE001 - counted
                    with lock:
                        errors.append(repr(e))
                        if len(errors) > 100:  # broken, not slow: stop hammering
                            break
                    continue
                mine.append((start, time.perf_counter()))
            with lock:
                records.extend(mine)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    t0_box.append(time.perf_counter())
    ready.wait()
    t0_box[0] = time.perf_counter()
    for t in threads:
        t.join()
    lo, hi = t0_box[0] + warmup, t0_box[0] + warmup + duration
    done = [(s, e) for s, e in records if lo <= e <= hi]
    lat = np.array([e - s for s, e in done]) * 1000
    return load_result(concurrency, lat, duration, len(errors), errors[0] if errors else None)


def load_result(concurrency: int, lat_ms: np.ndarray, duration: float, errors: int, first_error: str | None) -> dict:
    """One half-point: rate and latency percentiles of the requests answered in the measured window."""
    return {
        "concurrency": concurrency,
        "img_s": len(lat_ms) / duration,
        "requests": len(lat_ms),
        "p50_ms": float(np.percentile(lat_ms, 50)) if len(lat_ms) else float("nan"),
        "p99_ms": float(np.percentile(lat_ms, 99)) if len(lat_ms) else float("nan"),
        "errors": errors,
        "first_error": first_error,
        "_lat_ms": lat_ms,  # merged over the two halves of a point, then dropped
    }


class RequestFiles:
    """One single-image request, serialised once, for h2load: the KServe v2 HTTP body (JSON header +
    binary tensor) and the gRPC ``ModelInfer`` message in its 5-byte gRPC frame."""

    def __init__(self, model_name: str, shape: tuple[int, ...], folder: Path):
        import struct

        from tritonclient.grpc import service_pb2

        x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
        header = json.dumps({"inputs": [{"name": "images", "shape": [1, *shape], "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "outputs": [{"name": "features", "parameters": {"binary_data": True}}]}).encode()
        self.model_name, self.header_length = model_name, len(header)
        self.http = folder / f"{model_name}.http.bin"
        self.http.write_bytes(header + x.tobytes())
        req = service_pb2.ModelInferRequest(model_name=model_name)
        inp = req.inputs.add(name="images", datatype="FP32")
        inp.shape.extend([1, *shape])
        req.outputs.add(name="features")
        req.raw_input_contents.append(x.tobytes())
        msg = req.SerializeToString()
        self.grpc = folder / f"{model_name}.grpc.bin"
        self.grpc.write_bytes(b"\0" + struct.pack(">I", len(msg)) + msg)

    def check(self, protocol: str, url: str) -> None:
        """Send the exact bytes h2load will replay once, and check the answer is the features tensor."""
        import grpc
        import httpx
        from tritonclient.grpc import service_pb2

        if protocol == "http":
            r = httpx.post(f"http://{url}/v2/models/{self.model_name}/infer", content=self.http.read_bytes(),
                           headers={"Content-Type": "application/octet-stream",
                                    "Inference-Header-Content-Length": str(self.header_length)}, timeout=300)
            hl = int(r.headers.get("inference-header-content-length", "0"))
            if r.status_code != 200 or not hl or json.loads(r.content[:hl])["outputs"][0]["name"] != "features":
                raise RuntimeError(f"{url}: the h2load HTTP request is not answered as expected: {r.status_code} "
                                   f"{r.content[:300]!r}")
            return
        with grpc.insecure_channel(url) as channel:
            call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                       request_serializer=lambda b: b,
                                       response_deserializer=service_pb2.ModelInferResponse.FromString)
            resp = call(self.grpc.read_bytes()[5:], timeout=300)
        if [o.name for o in resp.outputs] != ["features"] or not resp.raw_output_contents[0]:
            raise RuntimeError(f"{url}: the h2load gRPC request is not answered as expected: {resp}")


def run_load_h2load(protocol: str, url: str, files: RequestFiles, concurrency: int, warmup: float,
                    duration: float) -> dict[str, float]:
    """``h2load`` (nghttp2's C load generator): ``concurrency`` connections, one request in flight on each.

    A Python client costs as much CPU per request as the server does, on the same cores; h2load costs
    ~40 us (measured), so the figures are the servers'. HTTP/1.1 (``--h1``) for the v2 HTTP endpoint,
    HTTP/2 with gRPC framing for ``ModelInfer``. Its per-request log gives the latencies; gRPC failures
    (HTTP 200 with a non-zero grpc-status trailer, invisible to h2load) are counted from the server's
    failure counter by the caller.
    """
    import subprocess as sp

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "requests.log"
        cmd = ["h2load", "-D", f"{int(duration * 1000)}ms", "--warm-up-time", f"{int(warmup * 1000)}ms",
               "-c", str(concurrency), "-t", "1", "-m", "1", f"--log-file={log}"]
        if protocol == "http":
            cmd += ["--h1", "-H", "content-type: application/octet-stream",
                    "-H", f"inference-header-content-length: {files.header_length}", "-d", str(files.http),
                    f"http://{url}/v2/models/{files.model_name}/infer"]
        else:
            cmd += ["-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(files.grpc),
                    f"http://{url}/inference.GRPCInferenceService/ModelInfer"]
        out = sp.run(cmd, capture_output=True, text=True, timeout=warmup + duration + 120)
        rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    lat = np.array([int(r[2]) / 1000 for r in rows if r[1] == "200"], dtype=float)
    bad = [r[1] for r in rows if r[1] != "200"]
    summary = next((line for line in out.stdout.splitlines() if line.startswith("requests:")), "")
    failed = sum(int(n) for n, _ in re.findall(r"(\d+) (failed|errored|timeout)", summary))
    if out.returncode != 0 or not rows:
        failed = max(failed, 1)
    first = (f"HTTP {bad[0]}" if bad else None) or (None if not failed else (out.stdout + out.stderr)[-500:])
    return load_result(concurrency, lat, duration, len(bad) + failed, first)


def merge_halves(a: dict, b: dict) -> dict:
    """One point from its two half-length runs (ABBA order): rates over the total time, pooled latencies."""
    lat = np.concatenate([a.pop("_lat_ms"), b.pop("_lat_ms")])
    return {
        "concurrency": a["concurrency"],
        "img_s": (a["requests"] + b["requests"]) / (a["duration_s"] + b["duration_s"]),
        "requests": a["requests"] + b["requests"],
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "errors": a["errors"] + b["errors"],
        "server_failures": a.get("server_failures", 0) + b.get("server_failures", 0),
        "first_error": a["first_error"] or b["first_error"],
        "duration_s": a["duration_s"] + b["duration_s"],
        "halves_img_s": [a["img_s"], b["img_s"]],
    }


SIDES = [("ours", "http"), ("ours", "grpc"), ("triton", "http"), ("triton", "grpc")]
LABELS = {("ours", "http"): "our HTTP", ("ours", "grpc"): "our gRPC", ("triton", "http"): "Triton HTTP",
          ("triton", "grpc"): "Triton gRPC"}


def bench_model(name: str, args: argparse.Namespace, folder: Path) -> dict:
    """Baseline; then per concurrency: the four server/protocol pairs, then the baseline again."""
    from serve.onnx import OnnxEncoder

    path = export(name, folder)
    enc = OnnxEncoder(path, threads=args.threads)
    shape = enc.input_shape
    x = np.random.default_rng(0).standard_normal((args.baseline_batch, *shape)).astype(np.float32)
    enc.run(x)  # warm-up

    def baseline() -> float:
        v = inprocess_throughput(enc, x, args.baseline_seconds)
        print(f"{name}: in-process onnxruntime, batch {args.baseline_batch}: {v:.1f} img/s", flush=True)
        return v

    files = RequestFiles(enc.name, tuple(shape), folder) if args.client == "h2load" else None
    rows = []
    with contextlib.ExitStack() as stack:
        servers = {"ours": stack.enter_context(ServerProcess(path, args))}
        if not args.no_triton:
            try:
                servers["triton"] = stack.enter_context(TritonSide(path, args))
            except Exception as e:  # noqa: BLE001 - the PyTriton venv is optional: columns left empty
                print(f"{name}: Triton not available, its columns stay empty: {e}", file=sys.stderr, flush=True)
        baselines = [baseline()]  # with both servers up (idle), as during the load runs
        for c in args.concurrency:
            # Long enough for `rounds` full rounds of c requests at the baseline rate (slow models merge few
            # large batches; a short window would count 1-2 of them).
            duration = max(args.duration, args.rounds * c / baselines[-1], args.min_requests / baselines[-1])
            warmup = max(args.warmup, c / baselines[-1])
            # ABBA: each pair runs twice for half the time, in order then in reverse, so a drift of the
            # machine's load over the point does not favour the pairs measured first or last.
            active = [sp for sp in SIDES if sp[0] in servers]
            halves: dict[tuple[str, str], list[dict]] = {sp: [] for sp in active}
            for server, protocol in active + active[::-1]:
                side = servers[server]
                url = side.grpc_url if protocol == "grpc" else side.url
                if files is not None and not halves[server, protocol]:
                    files.check(protocol, url)
                m0 = side.batch_counts()
                if files is None:
                    half = run_load(protocol, url, enc.name, shape, c, warmup, duration / 2)
                else:
                    half = run_load_h2load(protocol, url, files, c, warmup, duration / 2)
                m1 = side.batch_counts()
                half.update(duration_s=duration / 2, images=m1[0] - m0[0], calls=m1[1] - m0[1])
                # Failures h2load cannot see (gRPC status trailers). When h2load stops it resets the requests
                # still in flight (at most c), which Triton counts as failed: those are reported apart.
                failed = int(m1[2] - m0[2]) if files is not None else 0
                half["server_failures"] = failed
                if failed > c:
                    half["errors"] += failed
                    half["first_error"] = half["first_error"] or f"the server counted {failed} failed requests"
                halves[server, protocol].append(half)
            point = []
            for (server, protocol), (a, b) in halves.items():
                calls, images = a["calls"] + b["calls"], a["images"] + b["images"]
                row = merge_halves(a, b)
                row.update(server=server, protocol=protocol, avg_batch=images / calls if calls else float("nan"))
                point.append(row)
                print(f"{name}: c={c:>3} {LABELS[server, protocol]:<12} {row['img_s']:8.1f} img/s, p50 "
                      f"{row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, avg batch {row['avg_batch']:.1f}, "
                      f"errors {row['errors']}", flush=True)
            baselines.append(baseline())
            for row in point:
                row["inprocess_img_s"] = (baselines[-2] + baselines[-1]) / 2
                row["ratio"] = row["img_s"] / row["inprocess_img_s"]
            rows += point
    return {"model": name, "onnx_model_name": enc.name, "input_shape": list(shape),
            "inprocess_img_s": float(np.mean(baselines)), "inprocess_runs_img_s": baselines, "rows": rows}


def _cell(rows: list[dict], server: str, protocol: str, c: int) -> dict | None:
    return next((r for r in rows if (r["server"], r["protocol"], r["concurrency"]) == (server, protocol, c)), None)


def table(results: list[dict], batch: int) -> str:
    head = " | ".join(f"{LABELS[k]} img/s (p50/p99 ms)" for k in SIDES)
    lines = [f"| model | c | {head} | in-process img/s (b={batch}) | our gRPC / in-process | our gRPC / Triton gRPC |",
             "|---|---:|" + "---:|" * (len(SIDES) + 3)]
    for r in results:
        for c in sorted({row["concurrency"] for row in r["rows"]}):
            cells, base = [], None
            for server, protocol in SIDES:
                row = _cell(r["rows"], server, protocol, c)
                if row is None:
                    cells.append("-")
                    continue
                base = row["inprocess_img_s"]
                err = f", {row['errors']} errors" if row["errors"] else ""
                cells.append(f"{row['img_s']:.1f} ({row['p50_ms']:.1f} / {row['p99_ms']:.1f}{err})")
            ours, tri = _cell(r["rows"], "ours", "grpc", c), _cell(r["rows"], "triton", "grpc", c)
            vs_tri = f"{ours['img_s'] / tri['img_s']:.2f}" if ours and tri and tri["img_s"] else "-"
            lines.append(f"| {r['model']} | {c} | {' | '.join(cells)} | {base:.1f} | "
                         f"{ours['ratio']:.2f} | {vs_tri} |")
    return "\n".join(lines)


def targets(results: list[dict], small: str) -> list[dict]:
    """our gRPC >= Triton's gRPC at every concurrency; the small model at the top concurrency >= 0.5 in-process."""
    out = []
    for r in results:
        for c in sorted({row["concurrency"] for row in r["rows"]}):
            ours, tri = _cell(r["rows"], "ours", "grpc", c), _cell(r["rows"], "triton", "grpc", c)
            if ours and tri:
                out.append({"model": r["model"], "concurrency": c, "what": "our gRPC >= Triton gRPC img/s",
                            "value": ours["img_s"] / max(tri["img_s"], 1e-9), "target": 1.0})
        if r["model"] == small:
            c = max(row["concurrency"] for row in r["rows"])
            best = max((row for row in r["rows"] if row["server"] == "ours" and row["concurrency"] == c),
                       key=lambda row: row["img_s"])
            out.append({"model": r["model"], "concurrency": c, "what": f"our {best['protocol']} / in-process",
                        "value": best["ratio"], "target": 0.5})
    for t in out:
        t["met"] = bool(t["value"] >= t["target"])
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {("ours", "http"): "#8fb3de", ("ours", "grpc"): "#2b5d9b", ("triton", "http"): "#f2b880",
              ("triton", "grpc"): "#c4601d"}
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, r in zip(axes[0], results):
        cs = sorted({row["concurrency"] for row in r["rows"]})
        width = 0.8 / len(SIDES)
        for k, side in enumerate(SIDES):
            vals = [(_cell(r["rows"], *side, c) or {}).get("img_s", 0.0) for c in cs]
            xs = [i + (k - (len(SIDES) - 1) / 2) * width for i in range(len(cs))]
            ax.bar(xs, vals, width, color=colors[side], label=LABELS[side])
        base = [next(row["inprocess_img_s"] for row in r["rows"] if row["concurrency"] == c) for c in cs]
        ax.plot(range(len(cs)), base, color="#444", ls="--", marker="o", label="in-process onnxruntime, batch 32")
        ax.set_xticks(range(len(cs)), [str(c) for c in cs])
        ax.set_title(f"{r['model']} {'x'.join(map(str, r['input_shape']))}")
        ax.set_xlabel("concurrent clients (1 image / request)")
        ax.set_ylabel("images / s")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="scan_convnet_mnist5k,resnet50")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    p.add_argument("--baseline-batch", type=int, default=32)
    p.add_argument("--baseline-seconds", type=float, default=3.0, help="per baseline run (at least 3 batches)")
    # A model-bound server completes requests in whole merged batches (ResNet-50 at c=32: ~16 images every
    # ~0.7 s), so a window counts +-1 batch: 40 rounds make that +-1-2 % (4 rounds gave +-10-25 %, session 6).
    p.add_argument("--rounds", type=float, default=40.0,
                   help="measure at least this many rounds of c requests at the baseline rate")
    p.add_argument("--min-requests", type=float, default=200.0,
                   help="measure long enough for this many requests at the baseline rate (slow models, c=1)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads, all sides (0: all)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    p.add_argument("--no-triton", action="store_true", help="skip the Triton (PyTriton) columns")
    p.add_argument("--client", choices=["auto", "h2load", "python"], default="auto",
                   help="load generator: h2load (nghttp2's C client, Debian package nghttp2-client; auto when "
                        "installed) or python (tritonclient threads in this process)")
    p.add_argument("--json", default=str(RESULTS / "serve_throughput.json"))
    p.add_argument("--png", default=str(RESULTS / "serve_throughput.png"))
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    if args.client == "auto":
        import shutil

        args.client = "h2load" if shutil.which("h2load") else "python"
        if args.client == "python":
            print("h2load not found (apt install nghttp2-client): the load comes from tritonclient threads in this "
                  "process, whose CPU cost is of the order of the server's", file=sys.stderr, flush=True)
    elif args.client == "h2load":
        import shutil

        if not shutil.which("h2load"):
            p.error("--client h2load: h2load is not installed (Debian: apt install nghttp2-client)")
    models = [m for m in args.models.split(",") if m]
    results = []
    t_start = time.time()
    load_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            results.append(bench_model(name, args, Path(tmp)))
    print()
    print(table(results, args.baseline_batch))
    goals = targets(results, small=models[0])
    print()
    for t in goals:
        print(f"target: {t['model']} c={t['concurrency']}: {t['what']}: {t['value']:.2f} (>= {t['target']}) -> "
              f"{'met' if t['met'] else 'NOT met'}")
    import onnxruntime

    out = {"args": {k: v for k, v in vars(args).items()}, "platform": platform.platform(),
           "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "cpu_count": os.cpu_count(),
           "load_average_at_start": load_start, "load_average_at_end": list(os.getloadavg()),
           "wall_s": time.time() - t_start, "targets": goals, "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    tmp_json = Path(args.json).with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp_json, args.json)
    if args.png:
        plot(results, Path(args.png))
    print(f"wrote {args.json}" + (f" and {args.png}" if args.png else ""))
    return 0 if all(row["errors"] == 0 for r in results for row in r["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
