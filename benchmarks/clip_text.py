"""CLIP on shapes: zero-shot accuracy, text->image recall, ONNX parity of both towers, text-tower throughput.

    PYTHONPATH=. python benchmarks/clip_text.py [--model clip_convnet_shapes] [--repeats 5]

Throughput: onnxruntime text tower vs eager PyTorch on the same token batches, side by side in one run
(texts/s, best of ``--repeats``, tokenising included for both); writes benchmarks/results/clip_text.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import zoo
from serve.onnx import check_parity, export_onnx
from serve.onnx_text import OnnxTextEncoder, check_text_parity, export_text_onnx
from zoo.data import load_dataset
from zoo.eval import evaluate

OUT = Path(__file__).parent / "results" / "clip_text.json"


def best_rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return n / min(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="clip_convnet_shapes")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = zoo.create_model(args.model, pretrained=True).eval()
    metrics = evaluate(model, "shapes_captions", protocols="zeroshot,retrieval", progress=False)
    with tempfile.TemporaryDirectory() as d:
        image_onnx = export_onnx(model, Path(d) / "image.onnx")
        text_enc = OnnxTextEncoder(export_text_onnx(model, Path(d) / "text.onnx"), threads=1)
        parity = {"image_max_abs_diff": check_parity(model, image_onnx)["max_abs_diff"],
                  "text_max_abs_diff": check_text_parity(model, text_enc)}
        captions = [c for caps in load_dataset("shapes_captions", "test", n_test=256).captions for c in caps][:256]
        rows = []
        for batch in (1, 64):
            texts = captions[:batch] if batch > 1 else captions[:1]
            reps = max(1, 64 // batch)

            def run_onnx(texts=texts, reps=reps):
                for _ in range(reps):
                    text_enc.embed_text(texts)

            def run_torch(texts=texts, reps=reps):
                for _ in range(reps):
                    model.embed_text(texts)

            onnx_rate = best_rate(run_onnx, batch * reps, args.repeats)
            torch_rate = best_rate(run_torch, batch * reps, args.repeats)
            rows.append({"batch": batch, "onnxruntime_texts_per_s": onnx_rate, "pytorch_texts_per_s": torch_rate,
                         "ratio": onnx_rate / torch_rate})
    keys = ["zeroshot_top1[shape]", "zeroshot_top1[colour]", "zeroshot_top1[background]", "t2i_recall@1",
            "t2i_recall@10", "t2i_precision@10", "t2i_exact_recall@10"]
    result = {"model": args.model, "machine": "2-core CPU, no GPU", "threads": 1,
              "metrics": {k: metrics[k] for k in keys}, "parity": parity, "text_throughput": rows}
    print(f"{'metric':28s} value")
    for k in keys:
        print(f"{k:28s} {metrics[k]:.4f}")
    print(f"ONNX parity: image {parity['image_max_abs_diff']:.2e}, text {parity['text_max_abs_diff']:.2e}")
    print(f"{'batch':>5s} {'onnxruntime/s':>14s} {'pytorch/s':>10s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['batch']:5d} {r['onnxruntime_texts_per_s']:14.0f} {r['pytorch_texts_per_s']:10.0f} {r['ratio']:6.2f}")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
