"""Gradio demo: images nobody labelled, sorted into clusters; search by example.

``zoo demo [--model M] [--images DIR | --data NAME] [--clusters K]`` embeds the images with a zoo
model, assigns every image to a cluster and opens a Gradio app on 127.0.0.1:

- **Clusters**: one gallery per cluster with its size, most typical images first; clusters can be
  renamed, and the names are used everywhere afterwards (galleries, map, confusion matrix,
  predictions, CSV).
- **Map**: a 2-D PCA or t-SNE projection (scikit-learn) of the embeddings, coloured by cluster.
- **Search**: upload an image -> its cluster with a confidence, and its ``k`` nearest neighbours
  (faiss index, :class:`serve.index.FeatureIndex`, cosine similarity).
- **Export**: the assignments as CSV (``item, cluster, cluster_name, confidence[, true_label]``).
- **Metrics** (datasets with ground-truth labels): Hungarian ACC, NMI, ARI
  (:func:`zoo.eval.cluster_metrics`) and the Hungarian-matched confusion matrix.

How clusters are assigned (stated in the app too):

- the model's **cluster head** when it has one (and ``clusters`` is not given or equals the head's
  number of clusters): cluster = argmax of the head's softmax, confidence = that probability;
  typical images = highest confidence first.
- otherwise **spherical k-means** (:func:`zoo.eval.kmeans`, faiss) on the L2-normalised features,
  with ``K = clusters`` when given, else chosen by the **silhouette criterion**: K in
  ``[2, 15]`` (at most N-1) maximising the mean silhouette coefficient (cosine distance,
  ``sklearn.metrics.silhouette_score``) of k-means on a seeded random subsample of at most 2,000
  images. Cluster = nearest centroid by cosine similarity; confidence = softmax over the cosine
  similarities to all centroids at temperature 0.1; typical images = highest cosine similarity to
  their centroid first.

All logic lives in :class:`ClusterSession` (testable without gradio); :func:`build_demo` is the
UI on top. Cluster names belong to the session, so with several browsers open a rename made in
one is seen by all (it is one shared analysis, not per-user state).
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from serve.demo_session import (  # noqa: F401 - re-exported: serve.demo is the demo's public module
    K_RANGE,
    KMEANS_TEMPERATURE,
    MAX_NAME_LEN,
    ClusterSession,
    build_session,
)

if TYPE_CHECKING:  # pragma: no cover
    import gradio as gr
    from fastapi import FastAPI


__all__ = [
    "KMEANS_TEMPERATURE",
    "K_RANGE",
    "ClusterSession",
    "build_demo",
    "build_session",
    "cli_demo",
    "launch_demo",
    "mount_demo",
]

log = logging.getLogger(__name__)


def _theme() -> Any:
    import gradio as gr

    # System fonts: the default theme fetches Google fonts, which an offline machine cannot reach.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors inside a handler become ``gr.Error`` messages in the app, never a crash."""
    import functools

    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, OSError) as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # noqa: BLE001 - shown to the user, logged with its traceback
            log.exception("demo handler %s failed", fn.__name__)
            raise gr.Error(f"internal error: {type(e).__name__}: {e}") from None

    return wrapper


def _load_query(payload: Any) -> Image.Image:
    """The uploaded query image, decoded safely; errors name the file the user gave.

    The search/classify events run with ``preprocess=False``: Gradio's image component would open the
    upload with PIL itself (its errors name ``/tmp/gradio/<hash>/...`` paths, and its bomb check is
    not ours), so ``payload`` is the raw upload ``{"path", "orig_name", ...}`` (or a path / PIL image
    when called directly).
    """
    from serve.preprocess import ImageDecodeError, decode_image

    if payload is None or payload == "":
        raise ValueError("upload an image first")
    if isinstance(payload, Image.Image):
        return payload
    if isinstance(payload, Mapping):
        path = payload.get("path")
        if not path:
            raise ValueError("upload an image first")
        name = str(payload.get("orig_name") or Path(str(path)).name)
    else:
        path = str(payload)
        name = Path(path).name
    try:
        data = Path(str(path)).read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"{name}: cannot read the upload ({e.strerror or type(e).__name__})") from None
    return decode_image(data, name=name)


def _header(session: ClusterSession) -> str:
    lines = [
        "# Unsupervised classification",
        f"**Model** `{session.model_name}` · **images** {session.source} · **clusters** {session.num_clusters}",
        "",
        f"**How clusters are assigned**: {session.method_text}.",
    ]
    if session.k_scores:
        scores = ", ".join(f"K={k}: {v:.3f}" for k, v in session.k_scores.items())
        lines.append(f"\nSilhouette by K: {scores}")
    if session.skipped:
        shown = "; ".join(f"`{p}` ({r})" for p, r in session.skipped[:10])
        more = f" and {len(session.skipped) - 10} more" if len(session.skipped) > 10 else ""
        lines.append(f"\n**Skipped {len(session.skipped)} unreadable file(s)**: {shown}{more}")
    return "\n".join(lines)


def _metrics_md(session: ClusterSession) -> str:
    m = session.metrics()
    if m is None:
        return "No ground-truth labels for these images: nothing to score."
    return (f"Against the ground truth ({len(session)} images, {len(set(session.labels.tolist()))} classes, "
            f"{session.num_clusters} clusters): **ACC** {m['acc']:.4f} (Hungarian) · **NMI** {m['nmi']:.4f} · "
            f"**ARI** {m['ari']:.4f}")


def build_demo(session: ClusterSession, gallery_size: int = 16, default_k: int = 8) -> gr.Blocks:
    """The Gradio app over ``session``. Event handlers carry ``api_name`` for ``gradio_client``:

    - ``/classify`` (image file) -> ``(result JSON {cluster, cluster_name, confidence, probs}, text, label)``
    - ``/search`` (image file, k) -> ``(neighbours JSON [{rank, id, item, score, cluster, cluster_name}], gallery)``
    - ``/rename`` (cluster id, new name) -> ``(JSON {cluster, name, names}, ...UI updates)``
    - ``/export`` () -> ``(CSV file, JSON {path, rows, sizes})``
    - ``/draw_map`` (``"pca"`` or ``"tsne"``) -> map PNG
    """
    import gradio as gr

    k_slider_max = max(1, min(50, len(session)))

    def gallery_value(c: int) -> list[tuple[str, str]]:
        idx = session.members(c)[:gallery_size]
        return [(session.thumbnail(i), f"{Path(session.items[i]).name} · {session.typicality[i]:.2f}") for i in idx]

    def gallery_label(c: int) -> str:
        n = int(session.sizes()[c])
        shown = min(n, gallery_size)
        return f"{session.names[c]} · {n} images" + (f" (showing the {shown} most typical)" if n > shown else "")

    def cluster_choices() -> list[tuple[str, int]]:
        return [(f"{c}: {session.names[c]}", c) for c in range(session.num_clusters)]

    with gr.Blocks(title="selfsup-zoo demo", analytics_enabled=False) as demo:
        gr.Markdown(_header(session), elem_id="header")
        with gr.Tab("Clusters"):
            summary = gr.Dataframe(value=session.summary(), headers=session.summary_headers(),
                                   interactive=False, label="Clusters", elem_id="summary")
            with gr.Row():
                rename_cluster = gr.Dropdown(choices=cluster_choices(), value=0, label="Cluster to rename",
                                             elem_id="rename-cluster")
                rename_name = gr.Textbox(label="New name", elem_id="rename-name")
                rename_btn = gr.Button("Rename", elem_id="rename-btn")
            rename_json = gr.JSON(label="Rename result", visible=False)
            rename_status = gr.Markdown(elem_id="rename-status")
            galleries = []
            for c in range(session.num_clusters):
                galleries.append(gr.Gallery(value=gallery_value(c), label=gallery_label(c), columns=8,
                                            height="auto", object_fit="contain", allow_preview=True,
                                            elem_id=f"cluster-{c}"))
        with gr.Tab("Search"):
            gr.Markdown("Upload an image: its cluster (by the method above) and its nearest neighbours "
                        "(cosine similarity of the embeddings, faiss index).")
            with gr.Row():
                with gr.Column(scale=1):
                    query = gr.Image(type="filepath", label="Query image", sources=["upload", "clipboard"],
                                     height=240, elem_id="query")
                    k = gr.Slider(1, k_slider_max, value=min(default_k, k_slider_max), step=1,
                                  label="neighbours k", elem_id="k")
                    go = gr.Button("Classify and search", variant="primary", elem_id="go")
                with gr.Column(scale=2):
                    cls_text = gr.Textbox(label="Predicted cluster", interactive=False, elem_id="predicted-cluster")
                    cls_label = gr.Label(num_top_classes=5, label="Cluster probabilities", elem_id="probs")
                    cls_json = gr.JSON(label="Classification", visible=False)
            neighbours = gr.Gallery(label="Nearest neighbours", columns=8, height="auto", object_fit="contain",
                                    elem_id="neighbours")
            nn_json = gr.JSON(label="Neighbours", max_height=240, elem_id="neighbours-json")
        if hasattr(session.model, "embed_text"):  # image-text model: search by words, name clusters (demo_text.py)
            from serve.demo_text import add_text_tab

            add_text_tab(session, summary, galleries, gallery_label, _guard)
        with gr.Tab("Map", elem_id="tab-map") as map_tab:
            with gr.Row():
                map_method = gr.Radio([("PCA", "pca"), ("t-SNE", "tsne")], value="pca", label="projection",
                                      elem_id="map-method")
                map_btn = gr.Button("Draw", elem_id="map-btn")
            # Plots are drawn when their tab is first opened: matplotlib (and t-SNE) stay off the start-up path.
            map_img = gr.Image(type="filepath", label="2-D map of the embeddings, coloured by cluster",
                               interactive=False, show_label=False, elem_id="map")
        with gr.Tab("Metrics", elem_id="tab-metrics") as metrics_tab:
            gr.Markdown(_metrics_md(session), elem_id="metrics")
            confusion = gr.Image(type="filepath", label="Hungarian-matched confusion matrix (columns: clusters)",
                                 interactive=False, show_label=False, visible=session.labels is not None,
                                 elem_id="confusion")
        with gr.Tab("Export"):
            gr.Markdown("Download the assignments: `item, cluster, cluster_name, confidence`"
                        + (", `true_label`" if session.labels is not None else "") + ".")
            export_btn = gr.Button("Export CSV", elem_id="export-btn")
            export_file = gr.File(label="assignments.csv", interactive=False, elem_id="export-file")
            export_json = gr.JSON(label="Export", visible=False)

        # ------------------------------------------------------------ handlers
        @_guard
        def do_classify(path: Any) -> tuple[dict, str, dict]:
            img = _load_query(path)
            c, p, probs = session.classify(img)
            name = session.names[c]
            result = {"cluster": c, "cluster_name": name, "confidence": p,
                      "probs": {session.names[j]: float(v) for j, v in enumerate(probs)}}
            text = (name if name == f"cluster {c}" else f"{name} (cluster {c})") + f", confidence {p:.3f}"
            return result, text, result["probs"]

        @_guard
        def do_search(path: Any, k_value: Any) -> tuple[list[dict], list[tuple[str, str]]]:
            img = _load_query(path)
            try:
                kk = int(k_value)
            except (TypeError, ValueError):
                raise ValueError(f"k must be an integer, got {k_value!r}") from None
            if kk > len(session):
                gr.Warning(f"k={kk} is more than the {len(session)} images: showing all of them")
            hits = [h for h in session.search(img, kk) if h["id"] is not None]
            gallery = [(session.thumbnail(h["id"]), f"{h['rank']}. {h['cluster_name']} · {h['score']:.3f}")
                       for h in hits]
            return hits, gallery

        @_guard
        def do_rename(cluster: Any, name: Any) -> tuple[Any, ...]:
            if cluster is None or cluster == "":
                raise ValueError("choose a cluster to rename")
            c = session._cluster(cluster)
            old = session.names[c]
            new = session.rename(c, name)
            status = f"Cluster {c}: **{old}** → **{new}**"
            # plots already drawn are redrawn with the new name (the projection itself is cached)
            map_png = str(session.map_png()) if session.map_drawn else gr.update()
            conf_png = session.confusion_png() if session.confusion_drawn else None
            return (
                {"cluster": c, "name": new, "names": list(session.names)},
                status,
                gr.update(value=session.summary()),
                gr.update(choices=cluster_choices(), value=c),
                map_png,
                gr.update() if conf_png is None else str(conf_png),
                *[gr.update(label=gallery_label(j)) for j in range(session.num_clusters)],
            )

        @_guard
        def do_export() -> tuple[str, dict]:
            path = session.to_csv()
            sizes = {session.names[c]: int(n) for c, n in enumerate(session.sizes())}
            return str(path), {"file_name": path.name, "rows": len(session), "sizes": sizes}

        @_guard
        def do_map(method: Any) -> str:
            return str(session.map_png(str(method or "pca")))

        @_guard
        def do_confusion() -> Any:
            png = session.confusion_png()
            return gr.update() if png is None else str(png)

        # preprocess=False: the handlers get the raw upload and decode it themselves (see _load_query)
        gr.on([go.click, query.upload], do_classify, inputs=[query], outputs=[cls_json, cls_text, cls_label],
              api_name="classify", preprocess=False)
        gr.on([go.click, query.upload], do_search, inputs=[query, k], outputs=[nn_json, neighbours],
              api_name="search", preprocess=False)
        rename_btn.click(do_rename, inputs=[rename_cluster, rename_name],
                         outputs=[rename_json, rename_status, summary, rename_cluster, map_img, confusion,
                                  *galleries],
                         api_name="rename")
        export_btn.click(do_export, inputs=None, outputs=[export_file, export_json], api_name="export")
        map_btn.click(do_map, inputs=[map_method], outputs=[map_img], api_name="draw_map")
        map_tab.select(do_map, inputs=[map_method], outputs=[map_img], api_visibility="private")
        metrics_tab.select(do_confusion, inputs=None, outputs=[confusion], api_name="confusion")
    return demo


def _gradio_kwargs(session: ClusterSession) -> dict[str, Any]:
    return {"allowed_paths": [str(session.workdir)], "theme": _theme(), "ssr_mode": False, "mcp_server": False}


def launch_demo(
    session: ClusterSession, host: str = "127.0.0.1", port: int = 7860, block: bool = True, **kwargs: Any
) -> gr.Blocks:
    """Build and launch the app on ``host:port`` (``block=False``: returns at once; call ``.close()``)."""
    demo = build_demo(session, **kwargs)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=int(port), prevent_thread_lock=not block, quiet=not block,
                show_error=True, footer_links=["api"], **_gradio_kwargs(session))
    return demo


def mount_demo(app: FastAPI, session: ClusterSession, path: str = "/demo") -> FastAPI:
    """Mount the demo over ``session`` on a FastAPI ``app`` at ``path`` (``gr.mount_gradio_app``)."""
    import gradio as gr

    demo = build_demo(session)
    demo.queue(default_concurrency_limit=4)
    return gr.mount_gradio_app(app, demo, path=path, show_error=True, footer_links=["api"],
                               **_gradio_kwargs(session))


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def cli_demo(args: argparse.Namespace) -> int:
    """``zoo demo``: build the session (progress on stderr), then serve the app until Ctrl-C."""
    host, port = args.host, int(args.port)
    if not 0 < port < 65536:
        print(f"zoo demo: error: port {port} is out of range 1..65535", file=sys.stderr)
        return 2
    if not _port_free(host, port):
        print(f"zoo demo: error: port {port} on {host} is already in use; pick another with --port",
              file=sys.stderr)
        return 2
    try:
        session = build_session(args.model, images=args.images, data=args.data, split=args.split,
                                clusters=args.clusters, progress=True)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"zoo demo: error: {e}", file=sys.stderr)
        return 2
    for path, reason in session.skipped:
        print(f"zoo demo: skipped unreadable file {path}: {reason}", file=sys.stderr)
    m = session.metrics()
    if m is not None:
        print(f"ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}", file=sys.stderr)
    print(f"zoo demo: http://{host}:{port}/ (Ctrl-C to stop)", file=sys.stderr)

    def _stop(signum: int, frame: Any) -> None:  # SIGTERM stops the app like Ctrl-C (cleanup runs)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
    try:
        launch_demo(session, host, port, block=True)
    except OSError as e:
        print(f"zoo demo: error: cannot listen on {host}:{port}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
    return 0
