"""The demo's model side: a folder or dataset embedded once, clustered (cluster head or k-means with K by
silhouette), indexed, renamed and exported; no Gradio here (:mod:`serve.demo` is the UI)."""

from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover

    from zoo.model import ZooModel



KMEANS_TEMPERATURE = 0.1  # softmax temperature over cosine similarities to k-means centroids
K_RANGE = (2, 15)  # K candidates for the silhouette criterion (inclusive)
SILHOUETTE_SAMPLE = 2000  # subsample size for choosing K
MAX_NAME_LEN = 64
THUMB_MIN = 96  # thumbnails smaller than this are enlarged (nearest neighbour) for the galleries
THUMB_MAX = 256


def _l2n(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _csv_cell(value: Any) -> Any:
    """Neutralise spreadsheet formula injection in text cells (OWASP: prefix with a quote)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def choose_k(
    embeddings: np.ndarray,
    k_range: tuple[int, int] = K_RANGE,
    sample: int = SILHOUETTE_SAMPLE,
    seed: int = 0,
) -> tuple[int, dict[int, float], np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Pick K by the silhouette criterion on a subsample of L2-normalised ``embeddings``.

    For each K in ``[k_range[0], min(k_range[1], n - 1)]`` (``n`` = subsample size, at most
    ``sample`` rows drawn with ``seed``), spherical k-means (:func:`zoo.eval.kmeans`, ``seed``)
    clusters the subsample and ``sklearn.metrics.silhouette_score(metric="cosine")`` scores it;
    K with the highest score wins (the smallest K on ties). Returns ``(K, {K: score}, subsample
    row indices, (assignments, centroids) of the winning run)``; a K whose k-means leaves fewer
    than two non-empty clusters scores ``-1``.
    """
    from sklearn.metrics import silhouette_score

    from zoo.eval import kmeans

    n = embeddings.shape[0]
    if n < 3:
        raise ValueError(
            f"choosing K automatically needs at least 3 images, got {n}; give the number of clusters "
            "(--clusters K)"
        )
    rows = np.arange(n)
    if n > sample:
        rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    x = embeddings[rows]
    lo, hi = int(k_range[0]), min(int(k_range[1]), x.shape[0] - 1)
    if lo < 2 or hi < lo:
        raise ValueError(f"no K to choose from in range {k_range} for {x.shape[0]} images")
    scores: dict[int, float] = {}
    best: tuple[float, int, tuple[np.ndarray, np.ndarray]] | None = None
    for k in range(lo, hi + 1):
        assign, cent = kmeans(x, k, seed=seed, spherical=True)
        assign = (x @ _l2n(cent).T).argmax(axis=1)
        score = float(silhouette_score(x, assign, metric="cosine")) if np.unique(assign).size >= 2 else -1.0
        scores[k] = score
        if best is None or score > best[0]:
            best = (score, k, (assign.astype(np.int64), cent))
    assert best is not None
    return best[1], scores, rows, best[2]


class ClusterSession:
    """Embedded images, their cluster assignments and a search index; the demo's logic without UI.

    Attributes: ``model`` (ZooModel, eval mode), ``model_name``, ``source`` (human-readable),
    ``items`` (list of str: ``"mnist5k/test/17"`` or a path relative to the folder),
    ``features`` (raw ``[N,D]`` float32), ``embeddings`` (L2-normalised), ``assignments`` ``[N]``
    int64, ``confidences`` ``[N]`` float32, ``probs`` ``[N,K]`` (cluster-head or k-means softmax),
    ``centroids`` ``[K,D]`` (unit norm; the normalised member mean for a cluster head),
    ``typicality`` ``[N]`` (what "most typical first" sorts by), ``num_clusters``, ``names``,
    ``labels`` (``[N]`` int64 ground truth, or ``None``), ``class_names``, ``method``
    (``"cluster_head"`` or ``"kmeans"``), ``method_text`` (the stated criterion),
    ``k_scores`` ({K: silhouette} when K was chosen), ``skipped`` ([(path, reason)]),
    ``index`` (:class:`serve.index.FeatureIndex`), ``workdir`` (thumbnails, plots, CSV exports).
    """

    def __init__(
        self,
        model: ZooModel,
        dataset: Any,
        items: list[str],
        features: np.ndarray,
        head_probs: np.ndarray | None,
        labels: np.ndarray | None,
        clusters: int | None = None,
        source: str = "",
        skipped: Sequence[tuple[str, str]] = (),
        seed: int = 0,
        k_range: tuple[int, int] = K_RANGE,
    ):
        from serve.preprocess import Preprocessor

        self.model = model.eval()
        self.model_name = str(model.pretrained_cfg.get("name") or getattr(model, "arch", "model"))
        self.dataset = dataset
        self.items = list(items)
        self._pos = {item: i for i, item in enumerate(self.items)}
        self.source = source
        self.skipped = list(skipped)
        self.preprocessor = Preprocessor(model.pretrained_cfg)
        self.features = np.ascontiguousarray(features, dtype=np.float32)
        self.embeddings = _l2n(self.features)
        n = self.features.shape[0]
        if n == 0:
            raise ValueError(f"no images to cluster in {source or 'the input'}")
        if len(self.items) != n:
            raise ValueError(f"{len(self.items)} items but {n} feature rows")
        self.labels = None if labels is None or np.all(np.asarray(labels) < 0) else np.asarray(labels, np.int64)
        self.class_names: list[str] = [str(c) for c in getattr(dataset, "classes", [])]
        self.k_scores: dict[int, float] = {}
        self._lock = threading.RLock()
        self._model_lock = threading.Lock()
        if clusters is not None:
            clusters = int(clusters)
            if clusters < 1:
                raise ValueError(f"the number of clusters must be >= 1, got {clusters}")
            if clusters > n:
                raise ValueError(
                    f"asked for K={clusters} clusters but there are only {n} images; give --clusters <= {n}"
                )
        head_k = None if head_probs is None else head_probs.shape[1]
        if head_probs is not None and (clusters is None or clusters == head_k):
            self.method = "cluster_head"
            self.num_clusters = int(head_k)
            self.probs = np.ascontiguousarray(head_probs, dtype=np.float32)
            self.assignments = self.probs.argmax(axis=1).astype(np.int64)
            self.confidences = self.probs[np.arange(n), self.assignments].astype(np.float32)
            self.typicality = self.confidences.copy()
            cent = np.zeros((self.num_clusters, self.embeddings.shape[1]), np.float32)
            np.add.at(cent, self.assignments, self.embeddings)
            self.centroids = _l2n(cent)
            self.method_text = (
                f"the model's cluster head ({self.num_clusters} clusters): cluster = argmax of its softmax, "
                "confidence = that probability; galleries show the most confident images first"
            )
        else:
            self.method = "kmeans"
            if clusters is None:
                k, self.k_scores, rows, (sub_assign, cent) = choose_k(self.embeddings, k_range, seed=seed)
                if rows.shape[0] != n:  # chosen on a subsample: cluster all images with that K
                    from zoo.eval import kmeans

                    _, cent = kmeans(self.embeddings, k, seed=seed, spherical=True)
                how = (
                    f"K = {k} chosen by the silhouette criterion: the K in [{min(self.k_scores)}, "
                    f"{max(self.k_scores)}] maximising the mean silhouette coefficient (cosine distance) "
                    f"of spherical k-means on {'all' if rows.shape[0] == n else 'a random subsample of'} "
                    f"{rows.shape[0]} images (silhouette {self.k_scores[k]:.3f})"
                )
            else:
                from zoo.eval import kmeans

                k = clusters
                _, cent = kmeans(self.embeddings, k, seed=seed, spherical=True)
                how = f"K = {k} given"
            self.num_clusters = int(k)
            self.centroids = _l2n(np.asarray(cent, np.float32))
            sims = self.embeddings @ self.centroids.T
            self.assignments = sims.argmax(axis=1).astype(np.int64)
            self.probs = _softmax(sims / KMEANS_TEMPERATURE)
            self.confidences = self.probs[np.arange(n), self.assignments].astype(np.float32)
            self.typicality = sims[np.arange(n), self.assignments].astype(np.float32)
            self.method_text = (
                f"spherical k-means (faiss) on L2-normalised features, {how}; cluster = nearest centroid "
                f"(cosine), confidence = softmax of the cosine similarities to all centroids at temperature "
                f"{KMEANS_TEMPERATURE}; galleries show the images nearest to their centroid first"
            )
        self.names: list[str] = [f"cluster {c}" for c in range(self.num_clusters)]
        self.index = _build_index(self)
        self.workdir = Path(tempfile.mkdtemp(prefix="zoo-demo-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.workdir), True)
        self._thumbs: dict[int, str] = {}
        self._coords: dict[str, np.ndarray] = {}
        self.map_method = "pca"
        self.map_drawn = False
        self.confusion_drawn = False

    # ----------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self.items)

    def close(self) -> None:
        """Delete the session's working folder (thumbnails, plots, exports)."""
        self._finalizer()

    def sizes(self) -> np.ndarray:
        """Images per cluster ``[K]``."""
        return np.bincount(self.assignments, minlength=self.num_clusters)

    def members(self, cluster: int) -> np.ndarray:
        """Indices of the cluster's images, most typical first (ties: lower index first)."""
        c = self._cluster(cluster)
        idx = np.flatnonzero(self.assignments == c)
        return idx[np.argsort(-self.typicality[idx], kind="stable")]

    def name_of(self, cluster: int) -> str:
        return self.names[int(cluster)]

    def _cluster(self, cluster: int | str) -> int:
        try:
            c = int(cluster)
        except (TypeError, ValueError):
            if isinstance(cluster, str) and cluster.strip() in self.names:
                return self.names.index(cluster.strip())
            raise ValueError(f"unknown cluster {cluster!r}; clusters are 0..{self.num_clusters - 1}") from None
        if not 0 <= c < self.num_clusters:
            raise ValueError(f"unknown cluster {cluster!r}; clusters are 0..{self.num_clusters - 1}")
        return c

    def rename(self, cluster: int | str, name: str) -> str:
        """Give ``cluster`` (id or current name) a new unique, non-empty name; returns it."""
        c = self._cluster(cluster)
        name = " ".join(str(name or "").split())
        if not name:
            raise ValueError("a cluster name cannot be empty")
        if len(name) > MAX_NAME_LEN:
            raise ValueError(f"a cluster name is at most {MAX_NAME_LEN} characters, got {len(name)}")
        with self._lock:
            if name in self.names and self.names.index(name) != c:
                raise ValueError(f"the name {name!r} is already used by cluster {self.names.index(name)}")
            self.names[c] = name
        return name

    def pil(self, i: int) -> Image.Image:
        """The original image ``i``."""
        return self.dataset.get_pil(int(i))

    def thumbnail(self, i: int) -> str:
        """Path of a PNG thumbnail of image ``i`` (small images enlarged, large ones reduced)."""
        i = int(i)
        with self._lock:
            path = self._thumbs.get(i)
        if path is not None:
            return path
        from zoo.data import pil_to_rgb

        img = pil_to_rgb(self.pil(i))
        w, h = img.size
        if max(w, h) < THUMB_MIN:
            f = -(-THUMB_MIN // max(w, h))
            img = img.resize((w * f, h * f), Image.Resampling.NEAREST)
        elif max(w, h) > THUMB_MAX:
            img.thumbnail((THUMB_MAX, THUMB_MAX))
        thumbs = self.workdir / "thumbs"
        thumbs.mkdir(exist_ok=True)
        out = thumbs / f"{i}.png"
        tmp = thumbs / f".{i}.{threading.get_ident()}.png"
        img.save(tmp)
        os.replace(tmp, out)
        with self._lock:
            self._thumbs[i] = str(out)
        return str(out)

    def _embed_pil(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        x = torch.from_numpy(self.preprocessor.batch([image]))
        with self._model_lock, torch.inference_mode():
            dev = next(self.model.parameters()).device
            f = self.model.forward_features(x.to(dev))
            p = self.model.forward_head(f).softmax(dim=1) if self.method == "cluster_head" else None
        return f.float().cpu().numpy(), None if p is None else p.float().cpu().numpy()

    def classify(self, image: Image.Image) -> tuple[int, float, np.ndarray]:
        """``(cluster, confidence, probs [K])`` for one PIL image, by the session's method."""
        f, p = self._embed_pil(image)
        if p is None:
            p = _softmax((_l2n(f) @ self.centroids.T) / KMEANS_TEMPERATURE)
        probs = p[0]
        c = int(probs.argmax())
        return c, float(probs[c]), probs

    def search(self, image: Image.Image, k: int = 8) -> list[dict[str, Any]]:
        """The ``k`` nearest images (cosine): ``[{rank, id, item, score, cluster, cluster_name}]``."""
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        f, _ = self._embed_pil(image)
        return self.nearest(f, k)

    def nearest(self, query: np.ndarray, k: int) -> list[dict[str, Any]]:
        """The ``k`` indexed images nearest to one ``[1, D]`` query feature (an image's or a text's)."""
        res = self.index.search(query, min(k, len(self)), model_name=self.model_name)
        out = []
        # by item, not by index id: the index may have been changed (add/remove) since it was built
        for rank, (item, s) in enumerate(zip(res.items[0], res.scores[0].tolist())):
            i = self._pos.get(item)
            c = None if i is None else int(self.assignments[i])
            out.append({"rank": rank + 1, "id": i, "item": item, "score": float(s), "cluster": c,
                        "cluster_name": None if c is None else self.names[c]})
        return out

    def metrics(self) -> dict[str, float] | None:
        """Hungarian ACC, NMI, ARI of the assignments against the ground truth, or ``None``."""
        if self.labels is None:
            return None
        from zoo.eval import cluster_metrics

        return cluster_metrics(self.labels, self.assignments)

    def summary(self) -> list[list[Any]]:
        """Rows ``[cluster, name, size, mean confidence(, majority class, purity)]``."""
        sizes = self.sizes()
        rows = []
        for c in range(self.num_clusters):
            m = self.assignments == c
            conf = float(self.confidences[m].mean()) if sizes[c] else float("nan")
            row: list[Any] = [c, self.names[c], int(sizes[c]), round(conf, 3)]
            if self.labels is not None:
                if sizes[c]:
                    counts = np.bincount(self.labels[m])
                    top = int(counts.argmax())
                    cls = self.class_names[top] if top < len(self.class_names) else str(top)
                    row += [cls, round(float(counts[top]) / int(sizes[c]), 3)]
                else:
                    row += ["", float("nan")]
            rows.append(row)
        return rows

    def summary_headers(self) -> list[str]:
        h = ["cluster", "name", "size", "mean confidence"]
        return h + (["majority class", "purity"] if self.labels is not None else [])

    def to_csv(self, path: str | os.PathLike | None = None) -> Path:
        """Write ``item, cluster, cluster_name, confidence[, true_label]`` atomically; returns the path.

        Every cell is quoted (``csv.QUOTE_ALL``), so a name like ``a;=1+1`` stays one cell in spreadsheets
        that split on ``;``; text cells starting with ``= + - @`` get a leading ``'`` (formula injection).
        """
        path = Path(path) if path is not None else self.workdir / "exports" / f"clusters_{self.model_name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            names = list(self.names)
        header = ["item", "cluster", "cluster_name", "confidence"]
        if self.labels is not None:
            header.append("true_label")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
                w = csv.writer(fh, quoting=csv.QUOTE_ALL)  # every cell quoted: safe for ';' locales
                w.writerow(header)
                for i, item in enumerate(self.items):
                    c = int(self.assignments[i])
                    row = [_csv_cell(item), c, _csv_cell(names[c]), f"{float(self.confidences[i]):.6f}"]
                    if self.labels is not None:
                        y = int(self.labels[i])
                        row.append(_csv_cell(self.class_names[y] if 0 <= y < len(self.class_names) else str(y)))
                    w.writerow(row)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # ----------------------------------------------------------------- plots
    def coords_2d(self, method: str = "pca", seed: int = 0) -> np.ndarray:
        """2-D projection ``[N,2]`` of the L2-normalised embeddings (cached): PCA or t-SNE."""
        if method not in ("pca", "tsne"):
            raise ValueError(f"map method must be 'pca' or 'tsne', got {method!r}")
        with self._lock:
            if method in self._coords:
                return self._coords[method]
        x = self.embeddings
        if method == "pca" or x.shape[0] < 4:
            # PCA by SVD of the centred data (numpy; same projection as sklearn's PCA up to signs)
            xc = x.astype(np.float64) - x.mean(axis=0, keepdims=True)
            _, _, vt = np.linalg.svd(xc, full_matrices=False)
            xy = xc @ vt[:2].T
            if xy.shape[1] < 2:
                xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
        else:
            from sklearn.manifold import TSNE

            perplexity = float(min(30.0, max(1.0, (x.shape[0] - 1) / 3)))
            xy = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(x)
        xy = np.asarray(xy, np.float32)
        with self._lock:
            self._coords[method] = xy
        return xy

    def map_png(self, method: str | None = None) -> Path:
        """PNG of the 2-D map coloured by cluster (legend: cluster names); returns its path."""
        from zoo.eval.plots import _pyplot

        method = method or self.map_method
        xy = self.coords_2d(method)
        self.map_method = method
        plt = _pyplot()
        names = list(self.names)
        fig, ax = plt.subplots(figsize=(7, 6))
        try:
            cmap = plt.get_cmap("tab10" if self.num_clusters <= 10 else "tab20")
            for c in range(self.num_clusters):
                m = self.assignments == c
                if m.any():
                    ax.scatter(xy[m, 0], xy[m, 1], s=5, color=cmap(c % cmap.N), alpha=0.7,
                               label=f"{names[c]} ({int(m.sum())})")
            if self.num_clusters <= 20:
                ax.legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{method.upper()} of {self.model_name} embeddings ({len(self)} images), by cluster")
            out = _save_fig(fig, self.workdir / "plots" / f"map_{method}.png")
            self.map_drawn = True
            return out
        finally:
            plt.close(fig)

    def confusion_png(self) -> Path | None:
        """PNG of the Hungarian-matched confusion matrix (classes x cluster names), or ``None``.

        :func:`zoo.eval.plots.matched_confusion` orders the clusters by their matched class, so a
        perfect clustering is diagonal; rows are normalised by class size.
        """
        if self.labels is None:
            return None
        from zoo.eval.plots import _pyplot, matched_confusion

        table, classes, clusters = matched_confusion(self.labels, self.assignments)
        names = list(self.names)
        cls_names = [self.class_names[y] if 0 <= y < len(self.class_names) else str(y) for y in classes.tolist()]
        values = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
        acc = float(np.trace(table[:, : min(table.shape)])) / max(int(table.sum()), 1)
        plt = _pyplot()
        size = max(4.5, 0.5 * max(table.shape) + 2.5)
        fig, ax = plt.subplots(figsize=(size, size * table.shape[0] / max(table.shape[1], 1) + 1.0))
        try:
            im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1, aspect="auto")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_xticks(range(len(clusters)), [names[int(c)] for c in clusters], rotation=45, ha="right",
                          fontsize=8)
            ax.set_yticks(range(len(cls_names)), cls_names, fontsize=8)
            ax.set_xlabel("cluster (ordered by matched class)")
            ax.set_ylabel("true class")
            ax.set_title(f"Hungarian-matched confusion, rows normalised (ACC {acc:.3f})")
            if max(table.shape) <= 20:
                for i in range(table.shape[0]):
                    for j in range(table.shape[1]):
                        ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if values[i, j] > 0.5 else "black")
            out = _save_fig(fig, self.workdir / "plots" / "confusion.png")
        finally:
            plt.close(fig)
        self.confusion_drawn = True
        return out


def _save_fig(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{threading.get_ident()}{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _build_index(session: ClusterSession) -> Any:
    """The session's :class:`serve.index.FeatureIndex` over its features (model name + preprocessing)."""
    from serve.index import FeatureIndex

    return FeatureIndex.build(
        session.features,
        session.items,
        model_name=session.model_name,
        preprocess=session.preprocessor.config(),
        labels=session.labels,
        model_source=session.source,
    )


def build_session(
    model: str | ZooModel,
    images: str | os.PathLike | None = None,
    data: str | None = None,
    split: str = "test",
    clusters: int | None = None,
    progress: bool = True,
    batch_size: int = 256,
    device: str | None = None,
    seed: int = 0,
    k_range: tuple[int, int] = K_RANGE,
) -> ClusterSession:
    """Embed a folder (``images``) or a bundled dataset (``data``, ``split``) and cluster it.

    ``model``: a ZooModel or a name / folder / ``hf-hub:`` spec for ``zoo.create_model``.
    With neither ``images`` nor ``data``, the model's own dataset (``pretrained_cfg["dataset"]``)
    is used. Every file of a folder is fully decoded once up front, so unreadable or truncated
    files are found before embedding: they are skipped and listed in ``session.skipped``; an
    empty folder, ``clusters < 1`` or ``clusters`` above the number of images raise ``ValueError``
    naming the problem. See the module docstring for how clusters are assigned.
    """
    import warnings

    from zoo import create_model
    from zoo.data import load_dataset, transform_for
    from zoo.eval import extract_features

    if images is not None and data is not None:
        raise ValueError("give either images (a folder) or data (a bundled dataset), not both")
    if isinstance(model, str):
        model = create_model(model, pretrained=True)
    if device:
        model = model.to(device)
    tf = transform_for(model)
    skipped: list[tuple[str, str]] = []
    if images is not None:
        from zoo.data.folder import check_image

        root = Path(images).expanduser()
        if not root.exists():
            raise ValueError(f"image folder {str(root)!r} does not exist")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unreadable files: reported through session.skipped
            ds = load_dataset("imagefolder", transform=tf, root=root, full_check=True, progress=progress)
        skipped = [(s, check_image(s, full=True) or "unreadable") for s in ds.skipped]
        items = [Path(p).relative_to(ds.root).as_posix() for p in ds.paths]
        source = f"folder {ds.root} ({len(ds)} images" + (f", {len(skipped)} unreadable skipped)" if skipped else ")")
    else:
        if data is None:
            data = model.pretrained_cfg.get("dataset")
            if not data:
                raise ValueError("the model names no dataset; give a folder of images or a bundled dataset")
        ds = load_dataset(data, split=split, transform=tf)
        items = [f"{data}/{split}/{i}" for i in range(len(ds))]
        source = f"{data} {split} split ({len(ds)} images)"
    if progress:
        print(f"embedding {len(ds)} images from {source} with {model.pretrained_cfg.get('name', '')}",
              file=sys.stderr)
    out = extract_features(model, ds, batch_size=batch_size, progress=progress, cluster_probs=True)
    labels = np.asarray(getattr(ds, "targets", out["labels"]), np.int64)
    session = ClusterSession(
        model, ds, items, out["features"], out.get("cluster_probs"), labels,
        clusters=clusters, source=source, skipped=skipped, seed=seed, k_range=k_range,
    )
    if progress:
        print(f"{session.num_clusters} clusters: {session.method_text}", file=sys.stderr)
    return session


# ===================================================================== UI
