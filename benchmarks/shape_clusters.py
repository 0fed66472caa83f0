"""What k-means clusters of a model's `shapes` features follow: NMI against shape, colour and background.

    python benchmarks/shape_clusters.py runs/bg/simclr_plain/model runs/bg3/simclr_bg/model ... \
        --gallery docs/img/shape_clusters --json benchmarks/results/shape_clusters.json

For each model folder: features of the 1,000 `shapes` test images, k-means with k = 4 (the shape
classes) on L2-normalised features (``zoo.eval.kmeans``, 3 restarts, seed 0), and the NMI of the
clusters against each concept label and the object's size; optionally a cluster gallery per model
(``zoo.eval.plots.plot_cluster_gallery``). Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def concept_nmi(model_dir: str, k: int = 4, gallery: Path | None = None) -> dict:
    import zoo
    from zoo.data import load_dataset, transform_for
    from zoo.eval.cluster import _l2_normalize, kmeans
    from zoo.eval.features import extract_features
    from zoo.eval.metrics import nmi
    from zoo.eval.plots import plot_cluster_gallery

    model = zoo.load(model_dir).eval()
    ds = load_dataset("shapes", "test", transform=transform_for(model))
    feats = extract_features(model, ds, progress=False)["features"]
    assign, _ = kmeans(_l2_normalize(np.asarray(feats, dtype=np.float32)), k, seed=0, nredo=3)
    row = {"model": model_dir, "method": model.pretrained_cfg.get("method"), "k": k}
    row.update({f"nmi_{c}": float(nmi(ds.concepts[c], assign)) for c in ("shape", "colour", "background")})
    row["nmi_size"] = float(nmi(ds.factors["size"], assign))  # the half-size 5..11 as 7 labels: a nuisance too
    if gallery is not None:
        name = Path(model_dir).parent.name
        plot_cluster_gallery(ds, assign, gallery / f"{name}.png", labels=ds.concepts["shape"],
                             class_names=ds.concept_names["shape"], seed=0)
        row["gallery"] = str(gallery / f"{name}.png")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model folders")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--gallery", default=None, help="folder for one cluster-gallery PNG per model")
    parser.add_argument("--json", default="benchmarks/results/shape_clusters.json")
    args = parser.parse_args()
    gallery = Path(args.gallery) if args.gallery else None
    rows = [concept_nmi(m, args.k, gallery) for m in args.models]
    print("| model | NMI shape | NMI colour | NMI background | NMI size |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['nmi_shape']:.3f} | {r['nmi_colour']:.3f} | {r['nmi_background']:.3f} "
              f"| {r['nmi_size']:.3f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"data": "shapes", "split": "test", "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
