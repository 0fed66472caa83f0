"""Feature-server throughput and latency versus in-process onnxruntime, on the same ONNX model.

    python benchmarks/serve_throughput.py --models resnet50,scan_convnet_mnist5k --concurrency 1,8,32

For each model: the encoder is exported to ONNX (``resnet50``: the registered architecture with
random weights at 3x224x224 and ImageNet mean/std; other names: the zoo model, pretrained when it
has weights). The baseline is in-process onnxruntime (``OnnxEncoder.run``) on batches of
``--baseline-batch`` (32) images. The server is the real command, ``zoo serve --model MODEL.onnx
--no-demo`` (embedded backend, dynamic batching), in its own process; load comes from this process:
``c`` threads, one ``tritonclient.http`` client each, single-image requests with binary tensors, for
``--duration`` seconds after ``--warmup`` (longer for slow models: at least ``--rounds`` rounds of
``c`` requests at the baseline rate). The baseline is measured again after each concurrency, so each
server run is bracketed by two baseline runs and its ratio uses their mean (a shared machine's load
drifts). Reported per concurrency: images/s, p50/p99 latency, ratio to the baseline, and the
server's average merged batch size (from ``/metrics``). Both sides use the same onnxruntime thread
setting (``--threads``, 0 = all cores); the clients share the machine's cores with the server, as
they would on one host.
Prints a table, writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``zoo serve --model X.onnx --no-demo`` in a subprocess on a free port."""

    def __init__(self, onnx_path: Path, args: argparse.Namespace):
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "import sys; from zoo.cli import main; sys.exit(main())", "serve",
               "--model", str(onnx_path), "--no-demo", "--port", str(self.port), "--threads", str(args.threads),
               "--max-batch-size", str(args.max_batch_size), "--max-queue-delay-ms", str(args.max_queue_delay_ms),
               "--max-body-mb", "256", "--timeout-s", "300"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("ZOO_API_KEY", None)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)

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
                raise RuntimeError(f"server did not start: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.2)

    def metrics(self) -> dict[str, float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://{self.url}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name in ("zoo_batch_size_sum", "zoo_batch_size_count"):
                    out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_load(url: str, model_name: str, shape: tuple[int, ...], concurrency: int, warmup: float,
             duration: float) -> dict[str, float]:
    """``concurrency`` threads sending single-image binary requests; stats over the measured window."""
    import tritonclient.http as tritonhttp

    records: list[tuple[float, float]] = []
    errors: list[str] = []
    lock = threading.Lock()
    ready = threading.Barrier(concurrency + 1)
    t0_box: list[float] = []

    def client(i: int) -> None:
        x = np.random.default_rng(i).standard_normal((1, *shape)).astype(np.float32)
        with tritonhttp.InferenceServerClient(url, connection_timeout=300, network_timeout=300) as c:
            inp = tritonhttp.InferInput("images", [1, *shape], "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            out = [tritonhttp.InferRequestedOutput("features", binary_data=True)]
            c.infer(model_name, [inp], outputs=out)  # connect + warm
            ready.wait()
            end = t0_box[0] + warmup + duration
            while True:
                start = time.perf_counter()
                if start >= end:
                    break
                try:
                    c.infer(model_name, [inp], outputs=out).as_numpy("features")
                except Exception as e:  # noqa: BLE001 - counted
                    with lock:
                        errors.append(repr(e))
                    continue
                with lock:
                    records.append((start, time.perf_counter()))

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
    return {
        "concurrency": concurrency,
        "img_s": len(done) / duration,
        "requests": len(done),
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def bench_model(name: str, args: argparse.Namespace, folder: Path) -> dict:
    """Baseline, then for each concurrency: server load, baseline again (each server run is bracketed)."""
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

    baselines = [baseline()]
    rows = []
    with ServerProcess(path, args) as server:
        for c in args.concurrency:
            # Long enough for `rounds` full rounds of c requests at the baseline rate (slow models merge few
            # large batches; a short window would count 1-2 of them).
            duration = max(args.duration, args.rounds * c / baselines[-1])
            warmup = max(args.warmup, c / baselines[-1])
            m0 = server.metrics()
            row = run_load(server.url, enc.name, shape, c, warmup, duration)
            m1 = server.metrics()
            batches = m1.get("zoo_batch_size_count", 0) - m0.get("zoo_batch_size_count", 0)
            images = m1.get("zoo_batch_size_sum", 0) - m0.get("zoo_batch_size_sum", 0)
            row["avg_batch"] = images / batches if batches else float("nan")
            row["duration_s"] = duration
            baselines.append(baseline())
            row["inprocess_img_s"] = (baselines[-2] + baselines[-1]) / 2
            row["ratio"] = row["img_s"] / row["inprocess_img_s"]
            rows.append(row)
            print(f"{name}: concurrency {c:>3}: {row['img_s']:.1f} img/s over {duration:.0f} s, p50 {row['p50_ms']:.1f} "
                  f"ms, p99 {row['p99_ms']:.1f} ms, avg batch {row['avg_batch']:.1f}, ratio {row['ratio']:.2f}, "
                  f"errors {row['errors']}", flush=True)
    return {"model": name, "onnx_model_name": enc.name, "input_shape": list(shape),
            "inprocess_img_s": float(np.mean(baselines)), "inprocess_runs_img_s": baselines, "rows": rows}


def table(results: list[dict], batch: int) -> str:
    lines = [f"| model | concurrency | server img/s | p50 ms | p99 ms | avg batch | in-process img/s (batch {batch}) "
             "| ratio | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for row in r["rows"]:
            lines.append(f"| {r['model']} | {row['concurrency']} | {row['img_s']:.1f} | {row['p50_ms']:.1f} | "
                         f"{row['p99_ms']:.1f} | {row['avg_batch']:.1f} | {row['inprocess_img_s']:.1f} | "
                         f"{row['ratio']:.2f} | {row['errors']} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        cs = [str(row["concurrency"]) for row in r["rows"]]
        ax.bar(cs, [row["img_s"] for row in r["rows"]], color="#4c72b0", label="server (tritonclient, 1 img/request)")
        ax.plot(cs, [row["inprocess_img_s"] for row in r["rows"]], color="#c44e52", ls="--", marker="o",
                label="in-process onnxruntime, batch 32 (measured around each run)")
        top = 1.3 * max(max(row["img_s"], row["inprocess_img_s"]) for row in r["rows"])
        for i, row in enumerate(r["rows"]):
            inside = row["img_s"] > 0.3 * top  # label inside tall bars, above short ones
            ax.text(i, row["img_s"] / 2 if inside else row["img_s"] + 0.01 * top,
                    f"{row['ratio']:.2f}x\np99 {row['p99_ms']:.0f} ms", ha="center",
                    va="center" if inside else "bottom", fontsize=8, color="white" if inside else "black")
        ax.set_title(f"{r['model']} {'x'.join(map(str, r['input_shape']))}")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images / s")
        ax.set_ylim(0, top)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,scan_convnet_mnist5k")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per concurrency")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--baseline-batch", type=int, default=32)
    p.add_argument("--baseline-seconds", type=float, default=5.0, help="per baseline run (at least 3 batches)")
    p.add_argument("--rounds", type=float, default=6.0,
                   help="measure at least this many rounds of c requests at the baseline rate")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads, both sides (0: all)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    p.add_argument("--json", default=str(RESULTS / "serve_throughput.json"))
    p.add_argument("--png", default=str(RESULTS / "serve_throughput.png"))
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    results = []
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m for m in args.models.split(",") if m]:
            results.append(bench_model(name, args, Path(tmp)))
    print()
    print(table(results, args.baseline_batch))
    target = None
    for r in results:
        if r["model"] == "resnet50":
            row = max(r["rows"], key=lambda row: row["concurrency"])
            target = {"model": "resnet50", "concurrency": row["concurrency"], "ratio": row["ratio"],
                      "target": 0.8, "met": bool(row["ratio"] >= 0.8)}
            print(f"\ntarget: ResNet-50 server >= 0.8x in-process at concurrency {row['concurrency']}: "
                  f"{row['ratio']:.2f}x -> {'met' if target['met'] else 'NOT met'}")
    import onnxruntime

    out = {"args": {k: v for k, v in vars(args).items()}, "platform": platform.platform(),
           "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "cpu_count": os.cpu_count(),
           "load_average_at_end": list(os.getloadavg()), "wall_s": time.time() - t_start, "target": target,
           "results": results}
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
