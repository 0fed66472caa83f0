"""Words in the demo, for image-text models: search the gallery by text, and name the clusters.

- :func:`search_text`: the images nearest (cosine) to a text query's embedding, from the session's index.
- :func:`name_clusters`: each cluster gets the best-matching label of a user-given list: every image is
  classified zero-shot over the labels (label embedding = mean over a few prompt templates), and a
  cluster takes the label with the highest mean probability over its members. Several clusters may match one label; the
  second and later get ``label (2)``, ... so names stay unique. The clusters are renamed in the session.
- :func:`add_text_tab`: the "Text" tab of the Gradio app (only for models with ``embed_text``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_LABELS = 100
# prompt ensemble for a bare label (CLIP paper, section 3.1.4): the mean of these prompts' embeddings
LABEL_TEMPLATES = ("{}", "a {}", "a photo of a {}.", "a picture of a {}", "something {}")


def _text_embeddings(session: Any, texts: list[str]) -> np.ndarray:
    import torch

    with session._model_lock, torch.inference_mode():
        return session.model.embed_text(texts).float().cpu().numpy()


def search_text(session: Any, text: str, k: int = 8) -> list[dict[str, Any]]:
    """``[{rank, id, item, score, cluster, cluster_name}]`` of the ``k`` images nearest to ``text``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("type some words to search for")
    return session.nearest(_text_embeddings(session, [text.strip()]), max(1, int(k)))


def label_embeddings(session: Any, labels: list[str]) -> np.ndarray:
    """``[L, D]``: per label, the normalised mean of its :data:`LABEL_TEMPLATES` prompts' embeddings."""
    t = len(LABEL_TEMPLATES)
    emb = _text_embeddings(session, [tpl.format(label) for label in labels for tpl in LABEL_TEMPLATES])
    mean = emb.reshape(len(labels), t, -1).mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def parse_labels(text: str) -> list[str]:
    labels = [" ".join(p.split()) for p in str(text or "").replace("\n", ",").split(",")]
    labels = [p for p in labels if p]
    if not labels:
        raise ValueError("give a comma-separated list of labels, e.g. circle, square, triangle")
    if len(labels) > MAX_LABELS:
        raise ValueError(f"{len(labels)} labels; the limit is {MAX_LABELS}")
    from serve.demo import MAX_NAME_LEN

    for label in labels:
        if len(label) > MAX_NAME_LEN - 5:  # room for a " (2)" suffix
            raise ValueError(f"the label {label[:20]!r}... is longer than {MAX_NAME_LEN - 5} characters")
    return list(dict.fromkeys(labels))


def name_clusters(session: Any, labels: list[str]) -> list[dict[str, Any]]:
    """Rename every cluster after its best-matching label; ``[{cluster, label, name, score, share}]``.

    Every image is classified zero-shot over the labels (softmax of ``logit_scale`` x cosine to each
    label embedding); a cluster's score for a label is the mean probability over its members, and
    it takes the label with the highest score (``share``: the fraction of members whose top label it is).
    """
    emb = label_embeddings(session, labels)  # [L, D], unit norm
    scale = float(session.model.logit_scale.detach().exp())
    probs = _softmax_rows(scale * (session.embeddings @ emb.T))  # [N, L]
    top = probs.argmax(axis=1)
    scores = np.stack([probs[session.assignments == c].mean(axis=0) if np.any(session.assignments == c)
                       else np.zeros(len(labels)) for c in range(session.num_clusters)])  # [K, L]
    best = scores.argmax(axis=1)
    sims = scores
    used: dict[str, int] = {}
    rows = []
    for c in np.argsort(-sims.max(axis=1)):  # the most confident clusters take the plain names
        label = labels[int(best[c])]
        used[label] = used.get(label, 0) + 1
        members = session.assignments == c
        rows.append({"cluster": int(c), "label": label, "score": float(sims[c, best[c]]),
                     "share": float(np.mean(top[members] == best[c])) if members.any() else 0.0,
                     "name": label if used[label] == 1 else f"{label} ({used[label]})"})
    with session._lock:  # names are unique: clear first so a swap of two names cannot collide
        for r in rows:
            session.names[r["cluster"]] = f"\0{r['cluster']}"
        for r in rows:
            session.rename(r["cluster"], r["name"])
    return sorted(rows, key=lambda r: r["cluster"])


def add_text_tab(session: Any, summary: Any, galleries: list[Any], gallery_label: Any, guard: Any) -> None:
    """The "Text" tab; call inside the app's ``gr.Blocks``. Naming refreshes the summary and gallery labels."""
    import gradio as gr

    with gr.Tab("Text", elem_id="tab-text"):
        gr.Markdown("Search the images by words (the text tower's embedding, cosine similarity), or name the "
                    "clusters: each gets the best-matching label of your list.")
        with gr.Row():
            words = gr.Textbox(label="Search by text", placeholder="a red circle", elem_id="text-query")
            k = gr.Slider(1, max(1, min(50, len(session))), value=min(8, len(session)), step=1,
                          label="images", elem_id="text-k")
            go = gr.Button("Search", variant="primary", elem_id="text-go")
        hits_gallery = gr.Gallery(label="Images matching the text", columns=8, height="auto",
                                  object_fit="contain", elem_id="text-results")
        hits_json = gr.JSON(label="Matches", max_height=200, elem_id="text-results-json")
        with gr.Row():
            labels = gr.Textbox(label="Labels for the clusters (comma-separated)", elem_id="name-labels",
                                placeholder="circle, square, triangle, cross")
            name_btn = gr.Button("Name clusters", elem_id="name-btn")
        names_json = gr.JSON(label="Cluster names", elem_id="names-json")

        @guard
        def do_search(text: Any, k_value: Any) -> tuple[list[dict], list[tuple[str, str]]]:
            hits = [h for h in search_text(session, str(text or ""), int(k_value)) if h["id"] is not None]
            return hits, [(session.thumbnail(h["id"]), f"{h['rank']}. {h['cluster_name']} · {h['score']:.3f}")
                          for h in hits]

        @guard
        def do_name(text: Any) -> tuple[Any, ...]:
            rows = name_clusters(session, parse_labels(text))
            return (rows, gr.update(value=session.summary()),
                    *[gr.update(label=gallery_label(c)) for c in range(session.num_clusters)])

        gr.on([go.click, words.submit], do_search, inputs=[words, k], outputs=[hits_json, hits_gallery],
              api_name="search_text")
        name_btn.click(do_name, inputs=[labels], outputs=[names_json, summary, *galleries], api_name="name_clusters")
