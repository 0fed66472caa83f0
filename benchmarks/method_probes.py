"""Measured probes of why a method's gain over its base does or does not appear in a short run.

    python benchmarks/method_probes.py labels RUN --data mnist5k [--key pseudo_labels]
    python benchmarks/method_probes.py unmix RUN --base BASE_RUN
    python benchmarks/method_probes.py saliency --data mnist5k

``RUN`` is a training folder (``zoo train --out RUN`` or a row of ``benchmarks/methods.py``), read from
its newest checkpoint and ``log.csv``; nothing is retrained.

- ``labels``: a pseudo-label buffer of the method's state (IFND's ``pseudo_labels`` of the last epoch,
  InterCLR's memory-bank labels, UIC's labels) against the true training labels: the share of images with
  a label, NMI with the truth, and, for the pairs that share a pseudo-label (IFND's detected false
  negatives), the precision (share truly of one class), the recall (share of the true same-class pairs
  found) and the share of each anchor's negatives that are removed.
- ``unmix``: Un-Mix's log columns (``unmix_lam``, ``unmix_region``, ``unmix_loss``): the distribution of
  ``lam``, how the mixture term tracks it, and the method's own term (``loss - unmix_loss``) at the last
  epoch beside the base run's loss.
- ``saliency``: background augmentation's saliency masks (:func:`train.augment.saliency_masks`, the masks
  the trainer uses where a dataset has no exact ones) on the training images against the ink (pixels above
  0.3, digits on black): the share of ink outside the mask (strokes that a background swap or removal
  overwrites) and the share of the mask on black background. No ``RUN``.

Prints a table and writes JSON (``--json``, default ``benchmarks/results/probe_<kind>_<run name>.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def newest_checkpoint(run: Path) -> Path:
    ckpts = sorted((run / "checkpoints").glob("step_*.safetensors"))
    if not ckpts:
        raise FileNotFoundError(f"{run}: no checkpoints/step_*.safetensors")
    return ckpts[-1]


def read_log(run: Path) -> list[dict[str, float]]:
    with open(run / "log.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def pair_stats(pseudo: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pairs ``i != j`` with ``pseudo_i = pseudo_j >= 0`` against pairs with ``truth_i = truth_j``, counted
    exactly from the contingency table (no N x N matrix)."""
    from sklearn.metrics import normalized_mutual_info_score

    n = len(pseudo)
    has = pseudo >= 0
    table: dict[tuple[int, int], int] = {}
    for p, t in zip(pseudo[has].tolist(), truth[has].tolist()):
        table[(p, t)] = table.get((p, t), 0) + 1
    both = sum(c * (c - 1) for c in table.values())  # ordered pairs sharing pseudo and true label
    _, pc = np.unique(pseudo[has], return_counts=True)
    _, tc = np.unique(truth, return_counts=True)
    detected = int((pc * (pc - 1)).sum())
    true_pairs = int((tc * (tc - 1)).sum())
    return {
        "labelled_share": float(has.mean()),
        "nmi_vs_truth": float(normalized_mutual_info_score(truth[has], pseudo[has])) if has.any() else 0.0,
        "clusters_used": int(len(pc)),
        "pair_precision": both / detected if detected else 0.0,
        "pair_recall": both / true_pairs if true_pairs else 0.0,
        "negatives_removed_share": detected / (n * (n - 1)),
        "true_false_negative_share": true_pairs / (n * (n - 1)),
    }


def probe_labels(run: Path, data: str, key: str) -> dict:
    from zoo.checkpoint import load_state
    from zoo.data import load_dataset

    ckpt = newest_checkpoint(run)
    state = load_state(ckpt)["method"]
    if key not in state:
        raise KeyError(f"{ckpt}: no {key!r} in the method state; buffers: "
                       f"{sorted(k for k in state if 'label' in k or 'assign' in k)}")
    pseudo = state[key].reshape(-1).long().numpy()
    truth = np.asarray(load_dataset(data, "train").targets)
    if len(pseudo) != len(truth):
        raise ValueError(f"{key} has {len(pseudo)} entries, the {data} training set {len(truth)}")
    extra = {k: float(state[k]) for k in ("accepted_ratio",) if k in state}
    return {"run": str(run), "checkpoint": ckpt.name, "key": key, **extra, **pair_stats(pseudo, truth)}


def probe_unmix(run: Path, base: Path | None) -> dict:
    rows = [r for r in read_log(run) if "unmix_lam" in r]
    if not rows:
        raise ValueError(f"{run}/log.csv has no unmix_lam column: not an Un-Mix run (or logged before it existed)")
    lam = np.array([r["unmix_lam"] for r in rows])
    mix = np.array([r["unmix_loss"] for r in rows])
    own = np.array([r["loss"] - r["unmix_loss"] for r in rows])
    region = np.array([r["unmix_region"] for r in rows]) > 0
    last_epoch = max(r["epoch"] for r in rows)
    last = np.array([r["epoch"] == last_epoch for r in rows])
    closeness = np.minimum(lam, 1 - lam)  # 0: one source dominates, 0.5: an even mixture
    out = {
        "run": str(run), "steps": len(rows),
        "lam_mean": float(lam.mean()), "lam_quartiles": [float(q) for q in np.quantile(lam, [0.25, 0.5, 0.75])],
        "corr_mix_loss_vs_min_lam": float(np.corrcoef(closeness, mix)[0, 1]),
        "mix_loss_first_epoch": float(mix[[r["epoch"] == 0 for r in rows]].mean()),
        "mix_loss_last_epoch": float(mix[last].mean()),
        "mix_loss_last_epoch_global": float(mix[last & ~region].mean()) if (last & ~region).any() else None,
        "mix_loss_last_epoch_region": float(mix[last & region].mean()) if (last & region).any() else None,
        "own_loss_last_epoch": float(own[last].mean()),
        "mix_share_of_loss_last_epoch": float((mix[last] / (mix[last] + own[last])).mean()),
    }
    if base is not None:
        base_rows = read_log(base)
        base_last = max(r["epoch"] for r in base_rows)
        out["base_run"] = str(base)
        out["base_loss_last_epoch"] = float(np.mean([r["loss"] for r in base_rows if r["epoch"] == base_last]))
    return out


def probe_saliency(data: str, n: int = 1000) -> dict:
    import torch

    from train.augment import saliency_masks
    from zoo.data import load_dataset

    images = load_dataset(data, "train").images[:n]
    x = images.float().div(255)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    mask = saliency_masks(x)[:, 0] > 0.5
    ink = x.mean(dim=1) > 0.3
    return {"data": data, "images": int(len(x)), "ink_share": float(ink.float().mean()),
            "mask_share": float(mask.float().mean()),
            "ink_outside_mask": float((ink & ~mask).sum() / ink.sum()),
            "mask_on_background": float((mask & ~ink).sum() / mask.sum()),
            "iou": float((ink & mask).sum() / (ink | mask).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["labels", "unmix", "saliency"])
    parser.add_argument("run", type=Path, nargs="?", default=Path("none"))
    parser.add_argument("--data", default="mnist5k", help="labels: the run's training data")
    parser.add_argument("--key", default="pseudo_labels", help="labels: the buffer of the method state")
    parser.add_argument("--base", type=Path, default=None, help="unmix: the base method's run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.kind == "saliency":
        result, args.run = probe_saliency(args.data), Path(args.data) / "saliency"
    elif args.kind == "labels":
        result = probe_labels(args.run, args.data, args.key)
    else:
        result = probe_unmix(args.run, args.base)
    for k, v in result.items():
        print(f"{k:32s} {v:.4f}" if isinstance(v, float) else f"{k:32s} {v}")
    name = f"{args.run.parent.name}_{args.run.name}".replace("+", "_")
    path = Path(args.json or ROOT / "benchmarks" / "results" / "probes" / f"{args.kind}_{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
