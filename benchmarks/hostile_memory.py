"""Peak memory of the real server process under each hostile request of issue 18.

    python benchmarks/hostile_memory.py [--model scan_convnet_mnist5k] [--bound-mb 200]

Starts ``zoo serve --model MODEL.onnx --no-demo --threads 1`` in its own process, sends one good
request (warm-up: preprocessing, ONNX session, pools), then each attack in turn. Before an attack the
server's peak RSS is reset (``/proc/PID/clear_refs`` = 5) and its RSS read; after it, ``VmHWM`` (peak)
and ``VmRSS`` (what stays). Reported: HTTP status, peak growth over the RSS before the request, RSS
left after it, and whether the peak stays within ``--bound-mb``; then that a good request still works.
Prints a table, writes ``benchmarks/results/hostile_memory.json``. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG declaring width x height RGB (its pixel data is missing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 65536, 9))
            + chunk(b"IEND", b""))


def status_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def attacks(shape: tuple[int, int, int]) -> list[tuple[str, str, dict]]:
    from PIL import Image

    c, h, w = shape
    n = c * h * w
    big = png(Image.new("L", (6000, 6000), 90))
    rgb40 = png(Image.new("RGB", (8000, 5000), (10, 200, 30)))
    jpeg = io.BytesIO()
    Image.new("RGB", (6000, 6000), (120, 60, 200)).save(jpeg, format="JPEG", quality=90)
    x = np.random.default_rng(0).random((15_000_000 // (n * 19) + 1, c, h, w), dtype=np.float32)
    big_json = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
    nan_json = json.dumps({"inputs": [{"name": "images", "shape": [1, c, h, w], "datatype": "FP32",
                                       "data": [0.5] * (n - 1) + [float("nan")]}]}).encode()
    infer = "/v2/models/{m}/infer"
    return [
        ("thin 1x400000 PNG", "/classify", {"files": {"file": ("thin.png", png(Image.new("L", (400_000, 1))))}}),
        ("thin 400000x1 PNG", "/embed", {"files": {"file": ("tall.png", png(Image.new("L", (1, 400_000))))}}),
        ("thin 1x40000000 PNG (40 Mpx)", "/classify",
         {"files": {"file": ("thin40.png", png(Image.new("L", (40_000_000, 1))))}}),
        ("ten 6000x6000 PNGs", "/embed", {"files": [("files", (f"b{i}.png", big)) for i in range(10)]}),
        ("40 Mpx RGB PNG (8000x5000)", "/embed", {"files": {"file": ("rgb40.png", rgb40)}}),
        ("6000x6000 JPEG", "/embed", {"files": {"file": ("big.jpg", jpeg.getvalue())}}),
        ("144 Mpx PNG (bomb warning range)", "/classify", {"files": {"file": ("b144.png", bomb_png(12000, 12000))}}),
        ("400 Mpx PNG (bomb)", "/classify", {"files": {"file": ("b400.png", bomb_png(20000, 20000))}}),
        ("100000 nested brackets", infer, {"content": b"[" * 100_000 + b"]" * 100_000}),
        ("NaN in FP32 JSON", infer, {"content": nan_json}),
        (f"{len(big_json) / 1e6:.1f} MB JSON infer (valid)", infer, {"content": big_json}),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="scan_convnet_mnist5k")
    ap.add_argument("--bound-mb", type=float, default=200.0)
    ap.add_argument("--out", default=str(RESULTS / "hostile_memory.json"))
    args = ap.parse_args(argv)
    import httpx

    import zoo
    from serve.onnx import export_onnx

    tmp = Path(tempfile.mkdtemp(prefix="hostile_"))
    model = zoo.create_model(args.model, pretrained=True).eval()
    onnx_path = export_onnx(model, tmp / f"{args.model}.onnx")
    shape = tuple(int(s) for s in model.pretrained_cfg["input_size"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ZOO_CACHE": str(tmp / "cache")}
    cmd = [sys.executable, "-c", "import sys; from zoo.cli import main; sys.exit(main())", "serve", "--model",
           str(onnx_path), "--no-demo", "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    rows = []
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        deadline = time.time() + 120
        while True:
            try:
                if http.get("/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise SystemExit(f"server did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
        from PIL import Image

        good = png(Image.new("L", (28, 28), 128))
        assert http.post("/classify", files={"file": ("g.png", good)}).status_code == 200
        served = http.get("/").json()["models"][0]
        start = status_kb(proc.pid)
        for name, path, kw in attacks(shape):
            clear = Path(f"/proc/{proc.pid}/clear_refs")
            clear.write_text("5")  # peak RSS := current RSS
            before = status_kb(proc.pid)["VmRSS"]
            t = time.perf_counter()
            r = http.post(path.format(m=served), **kw)
            secs = time.perf_counter() - t
            time.sleep(0.2)
            after = status_kb(proc.pid)
            peak_mb = (after["VmHWM"] - before) / 1024
            err = r.json().get("error", "") if r.headers.get("content-type", "").startswith("application/json") else ""
            rows.append({"attack": name, "endpoint": path, "status": r.status_code, "seconds": round(secs, 3),
                         "peak_growth_mb": round(peak_mb, 1), "rss_left_mb": round((after["VmRSS"] - before) / 1024, 1),
                         "within_bound": peak_mb <= args.bound_mb, "error": err[:120]})
        ok = http.post("/classify", files={"file": ("g.png", good)}).status_code == 200
        end = status_kb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"zoo serve --model {args.model}.onnx --no-demo --threads 1; baseline RSS {start['VmRSS'] / 1024:.0f} MB; "
          f"bound +{args.bound_mb:g} MB")
    print(f"{'attack':<36} {'endpoint':<22} {'status':>6} {'peak +MB':>9} {'left +MB':>9} {'s':>6}  within")
    for r in rows:
        print(f"{r['attack']:<36} {r['endpoint']:<22} {r['status']:>6} {r['peak_growth_mb']:>9.1f} "
              f"{r['rss_left_mb']:>9.1f} {r['seconds']:>6.2f}  {'yes' if r['within_bound'] else 'NO'}")
    print(f"good request afterwards: {'200' if ok else 'FAILED'}; RSS at the end "
          f"{end['VmRSS'] / 1024:.0f} MB (+{(end['VmRSS'] - start['VmRSS']) / 1024:.0f} MB over the start)")
    out = {"machine": "2-core CPU, no GPU (shared)", "platform": platform.platform(), "model": args.model,
           "command": "python benchmarks/hostile_memory.py " + " ".join(argv or sys.argv[1:]),
           "bound_mb": args.bound_mb, "baseline_rss_mb": round(start["VmRSS"] / 1024, 1),
           "end_rss_mb": round(end["VmRSS"] / 1024, 1), "good_request_after": ok, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if ok and all(r["within_bound"] and r["status"] < 500 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
