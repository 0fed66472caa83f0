"""Image-index benchmark: build time, queries/s, recall@10 and bytes per vector of flat / HNSW / IVF / IVF-PQ.

    python benchmarks/index.py --sizes 10000,100000 --threads 1

Vectors are REAL model features: mnist5k (train + test, 5,000 images) embedded with
``scan_convnet_mnist5k`` (256-d), L2-normalised, then replicated with small Gaussian noise to reach
each size N: vector ``i`` is feature ``i % 5000`` plus noise of norm ``--noise`` times the median
nearest-neighbour distance of the 5,000 real features, re-normalised. Queries are held out: fresh
noisy copies of random real features (not in the index). Ground truth is exact inner-product search
(faiss brute force); ``same_source_at_10`` is the share of results that are copies of the query's
own real image (``exact_same_source_at_10`` for exact search). Each index is built through ``serve.index.FeatureIndex.build`` (which tunes
efSearch / nprobe for recall@10 >= ``--target-recall`` on its own held-out sample), then searched
with all queries in one batch (``qps`` = queries / wall time, ``--threads`` faiss threads).
``bytes_per_vector`` is the serialised faiss index size / N (``folder_bytes_per_vector`` adds
ids/items/meta). Prints a Markdown table, writes JSON and a recall-vs-QPS plot.

``--backends faiss,milvus`` builds every type on both backends from the same vectors in the same
run: ``milvus`` is Milvus Lite (the embedded engine, in this process, through a ``.db`` folder in a
temporary directory), built and tuned through the same ``FeatureIndex.build``; its
``bytes_per_vector`` is the size of Milvus Lite's data folder (segments + WAL + index files) / N.

    python benchmarks/index.py --sizes 100000 --types hnsw,ivf --backends faiss,milvus --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def real_features(model_name: str, splits: tuple[str, ...] = ("train", "test"), batch_size: int = 256) -> np.ndarray:
    """mnist5k features of the model (train + test: ``[5000, D]``), L2-normalised."""
    import torch

    import zoo
    from zoo.data import load_dataset, transform_for
    from zoo.eval import extract_features

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = zoo.create_model(model_name, pretrained=True).eval()
    tf = transform_for(model)
    parts = [extract_features(model, load_dataset("mnist5k", split=s, transform=tf), batch_size=batch_size,
                              progress=False)["features"] for s in splits]
    x = np.concatenate(parts).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def median_nn_distance(x: np.ndarray) -> float:
    import faiss

    dist, _ = faiss.knn(x, x, 2, metric=faiss.METRIC_INNER_PRODUCT)
    return float(np.median(np.sqrt(np.maximum(2.0 - 2.0 * dist[:, 1], 0.0))))


def noisy_copies(base: np.ndarray, idx: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    out = base[idx] + rng.standard_normal((len(idx), base.shape[1])).astype(np.float32) * sigma
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def replicate(base: np.ndarray, n: int, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for s in range(0, n, 200_000):
        idx = np.arange(s, min(n, s + 200_000)) % len(base)
        out[s : s + len(idx)] = noisy_copies(base, idx, sigma, rng)
    return out


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_one(kind: str, db: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace,
            items: list[str], source: np.ndarray, n_base: int, backend: str = "faiss") -> dict:
    from serve.index import FeatureIndex

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        options = {"uri": str(Path(tmp) / "bench.db"), "collection": "bench"} if backend == "milvus" else {}
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            idx = FeatureIndex.build(db, items, args.model, {}, index_type=kind, target_recall=args.target_recall,
                                     memory_budget_mb=args.memory_budget_mb, backend=backend, **options)
        total_build = time.perf_counter() - t0
        idx.search(queries[:10], 10)  # warm-up
        t1 = time.perf_counter()
        res = idx.search(queries, 10)
        search_s = time.perf_counter() - t1
        recall = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(res.ids, truth)]))
        folder = idx.save(Path(tmp) / "idx")
        info = idx.info()
        if backend == "milvus":  # Milvus Lite's data folder: parquet segments, WAL, per-segment index files
            idx.close()
            index_bytes = _tree_bytes(Path(options["uri"]))
            folder_bytes = index_bytes + _tree_bytes(folder)
        else:
            index_bytes = (folder / "index.faiss").stat().st_size
            folder_bytes = sum(p.stat().st_size for p in folder.iterdir())
    n = len(db)
    row = {
        "backend": backend,
        "type": kind,
        "n": n,
        "dim": int(db.shape[1]),
        "faiss_index": info.get("faiss_index") or f"Milvus {info['milvus_index'].get('index_type')}",
        "search_params": idx.search_params,
        "build_s": round(float(idx.meta["build_seconds"]), 2),
        "tune_s": round(float(idx.meta["tune_seconds"]), 2),
        "build_total_s": round(total_build, 2),
        "qps": round(len(queries) / search_s, 1),
        "recall_at_10": round(recall, 4),
        # share of the 10 results that are noisy copies of the query's own real image (exact search: ~1 when
        # N / 5000 >= 10): near-duplicates whose order the quantised IVF-PQ distances cannot resolve
        "same_source_at_10": round(float(np.mean(res.ids % n_base == source[:, None])), 4),
        "tuned_recall_at_10": idx.meta["tuning"]["recall_at_10"],
        "bytes_per_vector": round(index_bytes / n, 1),
        "folder_bytes_per_vector": round(folder_bytes / n, 1),
        "estimated_bytes_per_vector": round(idx.meta["estimated_bytes"] / n, 1),
        "warnings": [str(w.message) for w in caught if "recall" in str(w.message)],
    }
    del idx
    return row


def kinds_order(kind: str) -> int:
    order = ["flat", "hnsw", "ivf", "ivfpq"]
    return order.index(kind) if kind in order else len(order)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = {"flat": "tab:gray", "hnsw": "tab:blue", "ivf": "tab:green", "ivfpq": "tab:orange"}
    markers = ["o", "s", "^", "D", "v"]
    sizes = sorted({r["n"] for r in rows})
    for r in rows:
        milvus = r.get("backend") == "milvus"  # hollow markers: the Milvus backend
        ax.scatter(r["qps"], r["recall_at_10"], facecolors="none" if milvus else colors.get(r["type"], "k"),
                   edgecolors=colors.get(r["type"], "k"), marker=markers[sizes.index(r["n"]) % len(markers)], s=60)
        ax.annotate(f"{'milvus ' if milvus else ''}{r['type']} {r['n'] // 1000}k", (r["qps"], r["recall_at_10"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("queries / s (batch, log scale)")
    ax.set_ylabel("recall@10 vs exact search")
    ax.set_title("serve.index on scan_convnet_mnist5k features (noisy replicas)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="scan_convnet_mnist5k")
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated N (e.g. 10000,100000,1000000)")
    parser.add_argument("--types", default="flat,hnsw,ivf,ivfpq")
    parser.add_argument("--backends", default="faiss",
                        help="comma-separated index backends, each built on the same vectors (faiss,milvus); "
                             "milvus runs Milvus Lite (embedded, in-process) in a temporary folder")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--splits", default="train,test", help="mnist5k splits embedded as the base vectors")
    parser.add_argument("--noise", type=float, default=0.5, help="noise norm / median NN distance of real features")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--memory-budget-mb", type=float, default=1024.0, help="sets IVF-PQ's code size")
    parser.add_argument("--threads", type=int, default=1, help="faiss OpenMP threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "index.json"))
    parser.add_argument("--png", default=str(ROOT / "benchmarks" / "results" / "index.png"))
    parser.add_argument("--tmp", default=None, help="where indexes are saved to measure their size")
    parser.add_argument("--partial-json", default=None,
                        help="also rewrite this JSON after every measured row (long runs keep what they measured)")
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of other (N, type) pairs already in --json (e.g. add a 1M run)")
    args = parser.parse_args()

    import faiss

    faiss.omp_set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    kinds = [k for k in args.types.split(",") if k]
    backends = [b for b in args.backends.split(",") if b]

    t0 = time.perf_counter()
    base = real_features(args.model, tuple(args.splits.split(",")))
    nn = median_nn_distance(base)
    sigma = args.noise * nn / np.sqrt(base.shape[1])
    print(f"{len(base)} real features of {args.model} (dim {base.shape[1]}) in {time.perf_counter() - t0:.1f} s; "
          f"median NN distance {nn:.4f}, noise sigma {sigma:.5f}/dim", flush=True)
    rng = np.random.default_rng(args.seed + 12345)
    source = rng.integers(len(base), size=args.queries)
    queries = noisy_copies(base, source, sigma, rng)

    def write_partial(rows: list[dict]) -> None:
        # a long run (1M on the Milvus backend) killed mid-way keeps what it measured
        if args.partial_json:
            Path(args.partial_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.partial_json).write_text(json.dumps({"config": {k: v for k, v in vars(args).items()
                                                                      if k not in ("json", "png", "tmp")},
                                                           "rows": rows}, indent=2) + "\n")

    rows = []
    for n in sizes:
        db = replicate(base, n, sigma, args.seed)
        items = [f"mnist5k/{i % len(base)}#{i // len(base)}" for i in range(n)]
        _, truth = faiss.knn(queries, db, 10, metric=faiss.METRIC_INNER_PRODUCT)
        for kind in kinds:
            for backend in backends:
                if backend == "milvus" and kind == "ivfpq":
                    print(f"  N={n} ivfpq: skipped on milvus (Milvus Lite has no IVF_PQ)", flush=True)
                    continue
                row = run_one(kind, db, queries, truth, args, items, source, len(base), backend)
                row["exact_same_source_at_10"] = round(float(np.mean(truth % len(base) == source[:, None])), 4)
                rows.append(row)
                write_partial(rows)
                print(f"  N={n} {backend} {kind}: build {row['build_total_s']} s, {row['qps']} q/s, recall@10 "
                      f"{row['recall_at_10']}, {row['bytes_per_vector']} B/vector, {row['search_params']}", flush=True)
        del db, items

    if args.append and Path(args.json).is_file():
        def key(r: dict) -> tuple:
            return r["n"], r.get("backend", "faiss"), r["type"]

        new = {key(r) for r in rows}
        old = [r for r in json.loads(Path(args.json).read_text())["rows"] if key(r) not in new]
        rows = sorted(old + rows, key=lambda r: (r["n"], kinds_order(r["type"]), r.get("backend", "faiss")))
        args.sizes = ",".join(str(n) for n in sorted({r["n"] for r in rows}))
        args.types = ",".join(sorted({r["type"] for r in rows}, key=kinds_order))
    header = ["N", "backend", "type", "params", "build s (total)", "q/s", "recall@10", "same-source@10", "B/vector"]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["search_params"].items()) or "exact"
        print(f"| {r['n']:,} | {r.get('backend', 'faiss')} | {r['type']} | {params} | {r['build_s']} "
              f"({r['build_total_s']}) | {r['qps']:,} | "
              f"{r['recall_at_10']:.4f} | {r['same_source_at_10']:.4f} | {r['bytes_per_vector']} |")
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "png", "tmp")},
        "base": {"n": int(len(base)), "dim": int(base.shape[1]), "median_nn_distance": nn, "sigma_per_dim": sigma},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "faiss": faiss.__version__},
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, Path(args.png))
    print(f"\nwrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
