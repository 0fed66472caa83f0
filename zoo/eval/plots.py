"""Plots of evaluation results written as PNG files (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zoo.eval.metrics import _as_labels, _contingency, cluster_accuracy

__all__ = [
    "matched_confusion",
    "plot_cluster_gallery",
    "plot_confusion",
    "plot_embedding_2d",
    "plot_training_curves",
    "write_eval_plots",
]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting needs matplotlib; install it with `pip install 'selfsup-zoo[demo]'` (the demo extra)"
        ) from e
    if "matplotlib.pyplot" not in sys.modules:  # headless by default; keep a backend chosen by the caller
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG and close it (figures are not kept open between plots)."""
    try:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        return path
    finally:
        _pyplot().close(fig)


def matched_confusion(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contingency table with clusters reordered by their Hungarian-matched class.

    Returns ``(table [n_classes, n_clusters], classes, clusters_in_column_order)``: column ``i`` is the
    cluster matched to class ``i`` (for ``i < min(n_classes, n_clusters)``); unmatched clusters follow.
    The diagonal sums to ``cluster_accuracy * N``.
    """
    from scipy.optimize import linear_sum_assignment

    table, classes, clusters = _contingency(*_as_labels(y_true, y_pred))
    rows, cols = linear_sum_assignment(table, maximize=True)
    by_class = dict(zip(rows.tolist(), cols.tolist()))
    order = [by_class[r] for r in range(table.shape[0]) if r in by_class]
    order += [c for c in range(table.shape[1]) if c not in set(order)]
    return table[:, order], classes, clusters[order]


def plot_confusion(
    y_true: Any,
    y_pred: Any,
    path: str | Path,
    class_names: Sequence[str] | None = None,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Write the Hungarian-matched confusion matrix (classes x clusters) to a PNG at ``path``.

    Columns are clusters ordered by their matched class (Kuhn 1955), so a perfect clustering is
    diagonal; with ``normalize`` each row is divided by the class size. Returns the path.
    """
    plt = _pyplot()
    table, classes, clusters = matched_confusion(y_true, y_pred)
    values = table / np.maximum(table.sum(axis=1, keepdims=True), 1) if normalize else table
    names = list(class_names) if class_names is not None else [str(c) for c in classes]
    size = max(4.0, 0.45 * max(table.shape) + 2)
    fig, ax = plt.subplots(figsize=(size, size * table.shape[0] / max(table.shape[1], 1) + 0.5))
    im = ax.imshow(values, cmap="Blues", vmin=0, aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(clusters)), [str(c) for c in clusters], rotation=90 if len(clusters) > 20 else 0)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("cluster (ordered by matched class)")
    ax.set_ylabel("class")
    acc = float(np.trace(table[:, : min(table.shape)])) / max(int(table.sum()), 1)
    ax.set_title(title or f"Hungarian-matched confusion (ACC {acc:.3f})")
    if max(table.shape) <= 20:
        for i in range(table.shape[0]):
            for j in range(table.shape[1]):
                text = f"{values[i, j]:.2f}" if normalize else str(int(values[i, j]))
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if values[i, j] > 0.5 * values.max() else "black",
                )
    return _save(fig, path)


def plot_embedding_2d(
    features: Any,
    labels: Any,
    path: str | Path,
    method: str = "pca",
    seed: int = 0,
    max_points: int = 5000,
    title: str | None = None,
) -> Path:
    """Scatter a 2-D projection of ``features`` coloured by ``labels`` to a PNG at ``path``.

    ``method`` is ``"pca"``, ``"tsne"`` (scikit-learn; t-SNE of van der Maaten & Hinton 2008 on
    L2-normalised features, PCA-initialised) or ``"umap"`` (McInnes et al. 2018, cosine metric;
    needs the ``umap-learn`` package). At most ``max_points`` points (a seeded random subset) are
    drawn. Returns the path.
    """
    if method not in ("pca", "tsne", "umap"):
        raise ValueError(f"method must be 'pca', 'tsne' or 'umap', got {method!r}")
    if method == "umap" and not umap_available():
        raise ImportError("method='umap' needs the umap-learn package (pip install umap-learn); use 'tsne'")
    if hasattr(features, "detach"):
        features = features.detach().cpu().numpy()
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"features {x.shape} do not match {y.shape[0]} labels")
    if x.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_points, replace=False))
        x, y = x[keep], y[keep]
    plt = _pyplot()
    if method == "pca":
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, random_state=seed).fit_transform(x)
    elif method == "umap":
        import umap

        n_neighbors = int(min(15, max(2, x.shape[0] - 1)))
        xy = umap.UMAP(n_components=2, metric="cosine", n_neighbors=n_neighbors, random_state=seed).fit_transform(x)
    else:
        from sklearn.manifold import TSNE

        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        perplexity = float(min(30.0, max(1.0, (x.shape[0] - 1) / 3)))
        xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(x)
    fig, ax = plt.subplots(figsize=(6, 6))
    classes = np.unique(y)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        m = y == c
        ax.scatter(xy[m, 0], xy[m, 1], s=4, color=cmap(i % cmap.N), label=str(c), alpha=0.7)
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{method.upper()} of features ({x.shape[0]} points)")
    return _save(fig, path)


def umap_available() -> bool:
    """Whether ``umap-learn`` can be imported (the UMAP embedding is optional)."""
    import importlib.util

    return importlib.util.find_spec("umap") is not None


def _thumbnail(img: Any, size: int) -> np.ndarray:
    img = img.convert("RGB")
    if max(img.size) != size:
        from PIL import Image

        scale = size / max(img.size)
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))),
                         Image.Resampling.NEAREST if max(img.size) < size else Image.Resampling.BILINEAR)
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    a = np.asarray(img)
    canvas[: a.shape[0], : a.shape[1]] = a
    return canvas


def plot_cluster_gallery(
    dataset: Any,
    assignments: Any,
    path: str | Path,
    per_cluster: int = 12,
    max_clusters: int = 30,
    labels: Any = None,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    thumb: int = 48,
    title: str | None = None,
) -> Path:
    """Write a gallery PNG: one row per cluster, ``per_cluster`` example images drawn at random (seeded).

    ``dataset`` needs ``get_pil(i)`` (every ``zoo.data`` dataset has it) and ``len(dataset) ==
    len(assignments)``. Rows are the ``max_clusters`` largest clusters, largest first; each row is
    labelled with the cluster id, its size and, when ``labels`` are given, its majority class and
    that class's share (the cluster's purity). Returns the path.
    """
    assign = np.asarray(assignments.detach().cpu().numpy() if hasattr(assignments, "detach") else assignments)
    assign = assign.reshape(-1)
    if len(dataset) != assign.shape[0]:
        raise ValueError(f"{assign.shape[0]} cluster assignments for a dataset of {len(dataset)} images")
    if per_cluster < 1 or max_clusters < 1:
        raise ValueError("per_cluster and max_clusters must be >= 1")
    y = None if labels is None else np.asarray(labels).reshape(-1)
    clusters, sizes = np.unique(assign, return_counts=True)
    order = clusters[np.argsort(-sizes, kind="stable")][:max_clusters]
    rng = np.random.default_rng(seed)
    rows, captions = [], []
    for c in order:
        members = np.flatnonzero(assign == c)
        pick = np.sort(rng.choice(members, min(per_cluster, members.size), replace=False))
        tiles = [_thumbnail(dataset.get_pil(int(i)), thumb) for i in pick]
        tiles += [np.full((thumb, thumb, 3), 255, np.uint8)] * (per_cluster - len(tiles))
        gap = np.full((thumb, 2, 3), 255, np.uint8)
        rows.append(np.concatenate([t for tile in tiles for t in (tile, gap)], axis=1))
        caption = f"cluster {c}  n={members.size}"
        if y is not None:
            vals, cnt = np.unique(y[members], return_counts=True)
            top = vals[cnt.argmax()]
            name = class_names[int(top)] if class_names is not None and 0 <= int(top) < len(class_names) else top
            caption += f"  majority {name} ({cnt.max() / members.size:.0%})"
        captions.append(caption)
    plt = _pyplot()
    height = len(rows) * (thumb / 72 + 0.25) + 0.6
    fig, axes = plt.subplots(len(rows), 1, figsize=(per_cluster * (thumb + 2) / 72 + 0.2, height), squeeze=False)
    for ax, row, caption in zip(axes[:, 0], rows, captions):
        ax.imshow(row, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(caption, fontsize=8, loc="left", pad=2)
    note = f" (largest {len(order)} of {clusters.size})" if clusters.size > len(order) else ""
    fig.suptitle(title or f"cluster gallery{note}", fontsize=10)
    return _save(fig, path)


def read_log_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Numeric columns of a training ``log.csv`` (header row; empty or non-numeric cells become NaN)."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{path}: no logged rows")
    out: dict[str, np.ndarray] = {}
    for key in rows[0]:
        values = []
        for r in rows:
            try:
                values.append(float(r.get(key) or "nan"))
            except ValueError:
                values.append(float("nan"))
        col = np.asarray(values)
        if not np.isnan(col).all():
            out[key] = col
    return out


def plot_training_curves(log_csv: str | Path, path: str | Path, title: str | None = None) -> Path:
    """Write training curves from a run's ``log.csv`` (``zoo train``'s log): loss and lr against step.

    The loss panel also draws the other logged loss terms (columns whose name starts with ``loss``).
    A ``stage`` column (SCAN) is marked by vertical lines where it changes. Returns the path.
    """
    log = read_log_csv(log_csv)
    if "step" not in log or "loss" not in log:
        raise ValueError(f"{log_csv}: a training log needs 'step' and 'loss' columns, has {sorted(log)}")
    step = log["step"]
    plt = _pyplot()
    panels = 2 if "lr" in log else 1
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.6 * panels + 0.4), sharex=True, squeeze=False)
    ax = axes[0, 0]
    ax.plot(step, log["loss"], label="loss", lw=1.5)
    for key in sorted(k for k in log if k.startswith("loss") and k != "loss"):
        ax.plot(step, log[key], label=key, lw=0.8, alpha=0.7)
    ax.set_ylabel("loss")
    if len([k for k in log if k.startswith("loss")]) > 1:
        ax.legend(fontsize=7)
    if "stage" in log:
        change = np.flatnonzero(np.diff(np.nan_to_num(log["stage"])) != 0)
        for i in change:
            for a in axes[:, 0]:
                a.axvline(step[i + 1], color="gray", ls="--", lw=0.8)
    if panels == 2:
        axes[1, 0].plot(step, log["lr"], color="tab:orange")
        axes[1, 0].set_ylabel("learning rate")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title or f"training curves ({Path(log_csv).parent.name})")
    return _save(fig, path)


def write_eval_plots(
    model: Any,
    dataset: str,
    out_dir: str | Path,
    run_dir: str | Path | None = None,
    embedding: str = "tsne",
    max_points: int = 2000,
    k: int | None = None,
    batch_size: int = 256,
    device: Any = None,
    progress: bool = True,
    seed: int = 0,
    **dataset_kwargs: Any,
) -> list[Path]:
    """Plots of ``model`` on the test split of a named dataset, written as PNGs into ``out_dir``.

    - ``embedding_<method>.png``: 2-D map (:func:`plot_embedding_2d`, t-SNE by default; ``"umap"``
      when umap-learn is installed) of at most ``max_points`` test points, coloured by label;
    - ``confusion_kmeans.png`` / ``gallery_kmeans.png``: Hungarian-matched confusion matrix and
      cluster gallery of k-means (``k`` clusters, default the number of test classes, on
      L2-normalised features, as the ``kmeans`` protocol);
    - ``confusion_head.png`` / ``gallery_head.png``: the same for the cluster head, when the model has one;
    - ``training_curves.png``: from ``run_dir/log.csv`` when ``run_dir`` is given.

    Returns the written paths.
    """
    from zoo.data import load_dataset, transform_for
    from zoo.eval.cluster import _l2_normalize, kmeans
    from zoo.eval.features import extract_features

    out = Path(out_dir)
    log_csv = None
    if run_dir is not None:  # check before the slow part
        log_csv = Path(run_dir) / "log.csv" if Path(run_dir).is_dir() else Path(run_dir)
        if not log_csv.is_file():
            raise FileNotFoundError(f"no training log at {log_csv} (expected a run folder holding log.csv)")
    test_ds = load_dataset(dataset, "test", transform=transform_for(model), **dataset_kwargs)
    test = extract_features(model, test_ds, batch_size=batch_size, device=device, progress=progress,
                            cluster_probs=True)
    x, y = test["features"], test["labels"]
    names = list(getattr(test_ds, "classes", []) or []) or None
    labelled = bool(y.size) and y.min() >= 0
    paths = [
        plot_embedding_2d(x, y, out / f"embedding_{embedding}.png", method=embedding, seed=seed,
                          max_points=max_points, title=f"{embedding.upper()} of {dataset} test features")
    ]
    k = k or (int(np.unique(y).size) if labelled else 10)
    assign, _ = kmeans(_l2_normalize(x), k, seed=seed, nredo=3)
    clusterings = {"kmeans": assign}
    if test.get("cluster_probs") is not None:
        clusterings["head"] = np.asarray(test["cluster_probs"]).argmax(axis=1)
    for tag, pred in clusterings.items():
        if labelled:
            present = np.unique(y)
            row_names = [names[c] for c in present] if names and present.max() < len(names) else None
            paths.append(plot_confusion(y, pred, out / f"confusion_{tag}.png", class_names=row_names,
                                        title=f"{tag} clusters, Hungarian-matched (ACC "
                                              f"{cluster_accuracy(y, pred):.3f})"))
        paths.append(plot_cluster_gallery(test_ds, pred, out / f"gallery_{tag}.png",
                                          labels=y if labelled else None, class_names=names, seed=seed,
                                          title=f"{tag} clusters of {dataset} test images"))
    if log_csv is not None:
        paths.append(plot_training_curves(log_csv, out / "training_curves.png"))
    return paths
