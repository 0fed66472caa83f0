"""Feature extraction throughput: onnxruntime (the exported model) versus eager PyTorch, side by side.

    python benchmarks/onnx_vs_torch.py --models resnet50,scan_convnet_mnist5k --batch 32 --rounds 6

For each model: export to ONNX (serve/onnx.py, random weights when the model has none), check
parity, then time batches of the same random input through both, alternating in ABBA rounds so
machine noise hits both alike. Both compute the exported outputs (features, plus cluster
probabilities for a model with a cluster head); PyTorch runs under ``torch.inference_mode()``.
Both use the same number of intra-op threads (``--threads``, default: torch's). Reports the median
batch time as images/s, and the ratio onnxruntime / PyTorch (>1: onnxruntime is faster) for wall
time and for process CPU time (less sensitive to other load on a shared machine). Prints a
markdown table and writes JSON (default benchmarks/results/onnx_vs_torch.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source checkout
    sys.path.insert(0, str(ROOT))

from serve.onnx import OnnxEncoder, check_parity, export_onnx, load_model  # noqa: E402


def bench(spec: str, args: argparse.Namespace, workdir: Path) -> dict:
    torch.manual_seed(0)
    model = load_model(spec)
    if args.size:
        model.pretrained_cfg["input_size"] = [3, args.size, args.size]
    name = model.pretrained_cfg.get("name") or spec
    path = export_onnx(model, workdir / f"{name}.onnx")
    enc = OnnxEncoder(path, providers=["CPUExecutionProvider"], threads=args.threads)
    parity = check_parity(model, enc, n_random=4)["max_abs_diff"]
    x = torch.randn(args.batch, *enc.input_shape)
    x_np = x.numpy()

    def torch_step() -> None:
        with torch.inference_mode():
            features = model.forward_features(x)
            if model.has_cluster_head:
                model.forward_head(features).softmax(dim=1)

    def onnx_step() -> None:
        enc.run(x_np)

    steps = {"torch": torch_step, "onnx": onnx_step}
    for _ in range(args.warmup):
        torch_step()
        onnx_step()
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        order = ["torch", "onnx"] if r % 2 == 0 else ["onnx", "torch"]  # ABBA
        for side in order:
            for _ in range(args.steps):
                start, start_cpu = time.perf_counter(), time.process_time()
                steps[side]()
                wall[side].append(time.perf_counter() - start)
                cpu[side].append(time.process_time() - start_cpu)
    t_wall = {k: statistics.median(v) for k, v in wall.items()}
    t_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {
        "model": name,
        "input": list(enc.input_shape),
        "outputs": enc.output_names,
        "batch": args.batch,
        "torch_img_s": args.batch / t_wall["torch"],
        "onnx_img_s": args.batch / t_wall["onnx"],
        "ratio": t_wall["torch"] / t_wall["onnx"],
        "cpu_ratio": t_cpu["torch"] / t_cpu["onnx"],
        "torch_batch_s": t_wall["torch"],
        "onnx_batch_s": t_wall["onnx"],
        "torch_cpu_s": t_cpu["torch"],
        "onnx_cpu_s": t_cpu["onnx"],
        "batches_timed": len(wall["torch"]),
        "parity_max_abs_diff": parity,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet50,scan_convnet_mnist5k",
                        help="comma list of registered names / model folders (random weights when none)")
    parser.add_argument("--size", type=int, default=0, help="override the input size (0: the model's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2, help="batches per side per round")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads for both (0: torch's default)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "onnx_vs_torch.json"))
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    print(f"batch={args.batch} rounds={args.rounds}x{args.steps} device=cpu threads={args.threads} "
          f"torch={torch.__version__} onnxruntime={_ort_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(spec.strip(), args, Path(tmp)) for spec in args.models.split(",") if spec.strip()]
    print("| model | input | batch | PyTorch img/s | onnxruntime img/s | onnxruntime / PyTorch (wall) "
          "| (CPU time) | parity max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['batch']} | {r['torch_img_s']:.1f} "
              f"| {r['onnx_img_s']:.1f} | {r['ratio']:.2f} | {r['cpu_ratio']:.2f} | {r['parity_max_abs_diff']:.1e} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "platform": platform.platform(), "torch": torch.__version__,
               "onnxruntime": _ort_version(), "numpy": np.__version__, "rows": rows}
    out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return rows


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


if __name__ == "__main__":
    main()
