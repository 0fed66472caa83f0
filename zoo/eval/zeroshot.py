"""Zero-shot classification and text-to-image retrieval for image-text models (:class:`zoo.clip.ClipModel`).

Zero-shot (Radford et al. 2021, section 3.1.4): each class's text embedding is the normalised mean
of the embeddings of its name in every prompt template of the dataset; an image gets the class
whose embedding is nearest (cosine). Class names and templates are kept per dataset in
:data:`PROMPTS` (the CLIP paper's prompt sets for CIFAR-10/100, STL-10, MNIST and its 80 ImageNet
templates; ``shapes`` classifies the shape, and its colour / background concepts as extra tasks).

Retrieval: for the held-out captions of ``shapes_captions`` (the test split's first caption of every
image, from templates training never saw), rank the test images by cosine similarity. A retrieved
image is relevant when it has every concept the caption names (the caption cannot tell apart images
that share them). ``t2i_recall@K``: fraction of captions with a relevant image in the top K;
``t2i_precision@10``: mean fraction of the top 10 that is relevant; ``t2i_exact_recall@10``: the
caption's own image in the top 10 (bounded below 1 by images that share all three concepts).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PROMPTS", "class_prompts", "retrieval_eval", "zeroshot_classifier", "zeroshot_eval"]

_CIFAR_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.", "a low contrast photo of a {}.",
    "a high contrast photo of a {}.", "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
    "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)
_SHAPE_TEMPLATES = ("a {}", "a picture of a {}", "an image of a {}", "a {} on a background")
_COLOUR_TEMPLATES = ("something {}", "a {} object", "a {} shape", "an image of something {}")
_BACKGROUND_TEMPLATES = ("something on a {} background", "an object with a {} background",
                         "a {} background behind an object")

# dataset -> task -> (class names or None for the dataset's own, templates); the first task is the label
PROMPTS: dict[str, dict[str, tuple[tuple[str, ...] | None, tuple[str, ...]]]] = {
    "mnist5k": {"label": (("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"), ('a photo of the number: "{}".',))},
    "digits": {"label": (("0", "1", "2", "3", "4", "5", "6", "7", "8", "9"), ('a photo of the number: "{}".',))},
    "cifar10": {"label": (None, _CIFAR_TEMPLATES)},
    "cifar100": {"label": (None, _CIFAR_TEMPLATES)},
    "stl10": {"label": (None, ("a photo of a {}.", "a photo of the {}."))},
    "shapes": {
        "shape": (None, _SHAPE_TEMPLATES),
        "colour": (None, _COLOUR_TEMPLATES),
        "background": (("black", "white", "gray", "noisy"), _BACKGROUND_TEMPLATES),
    },
    "imagenet": {"label": (None, ())},  # names and the 80 templates from open_clip's zero_shot_metadata
}
PROMPTS["shapes_captions"] = PROMPTS["shapes"]


def imagenet_prompts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The 1000 ImageNet class names and the CLIP paper's 80 templates (as open_clip ships them)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    return tuple(IMAGENET_CLASSNAMES), tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)


def class_prompts(dataset: str, ds: Any = None) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """``task -> (class names, templates)`` for ``dataset``; names default to the dataset's classes."""
    if dataset not in PROMPTS and dataset != "imagefolder":
        raise ValueError(f"no zero-shot prompts for dataset {dataset!r}; known: {', '.join(sorted(PROMPTS))}")
    if dataset == "imagenet" or (dataset == "imagefolder" and len(getattr(ds, "classes", [])) == 1000
                                 and all(str(c).startswith("n") for c in ds.classes)):
        names, templates = imagenet_prompts()  # an ImageNet val folder: wnid folders in sorted order
        return {"label": (list(names), templates)}
    if dataset == "imagefolder":  # any folder: its folder names, with ImageNet's generic photo templates
        _, templates = imagenet_prompts()
        return {"label": ([str(c).replace("_", " ") for c in ds.classes], templates)}
    tasks = {}
    for task, (names, templates) in PROMPTS[dataset].items():
        if names is None:
            names = (ds.concept_names[task] if task in getattr(ds, "concept_names", {}) else ds.classes)
        tasks[task] = ([str(n).replace("_", " ") for n in names], templates)
    return tasks


@torch.no_grad()
def zeroshot_classifier(model: Any, classnames: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """``[C, D]``: per class, the normalised mean of its prompts' normalised text embeddings."""
    weights = []
    for name in classnames:
        emb = model.embed_text([t.format(name) for t in templates])
        weights.append(F.normalize(emb.mean(dim=0), dim=0))
    return torch.stack(weights)


def _topk(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return float((logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).float().mean())


def _image_features(model: Any, ds: Any, batch_size: int, device: Any, progress: bool) -> torch.Tensor:
    from zoo.eval.features import extract_features

    feats = extract_features(model, ds, batch_size=batch_size, device=device, progress=progress)["features"]
    return F.normalize(torch.from_numpy(feats), dim=1)


def zeroshot_eval(
    model: Any, dataset: str, split: str = "test", batch_size: int = 256, device: Any = None,
    progress: bool = True, **dataset_kwargs: Any,
) -> dict[str, Any]:
    """Zero-shot top-1 / top-5 on ``dataset``: ``zeroshot_top1``, ``zeroshot_top5`` for the label task,
    ``zeroshot_top1[task]`` / ``zeroshot_top5[task]`` for every task (shapes: shape, colour, background)."""
    from zoo.data import load_dataset, transform_for

    if not hasattr(model, "embed_text"):
        raise ValueError(f"zero-shot classification needs an image-text model (embed_text); "
                         f"{model.pretrained_cfg.get('name', model.arch)!r} has no text tower")
    ds = load_dataset(dataset, split, transform=transform_for(model), **dataset_kwargs)
    tasks = class_prompts(dataset, ds)
    images = _image_features(model, ds, batch_size, device, progress)
    text_device = model.logit_scale.device
    results: dict[str, Any] = {}
    for i, (task, (names, templates)) in enumerate(tasks.items()):
        labels = torch.as_tensor(np.asarray(ds.concepts[task] if task in getattr(ds, "concepts", {})
                                            else ds.targets), dtype=torch.long)
        logits = images @ zeroshot_classifier(model, names, templates).to(text_device).cpu().T
        top1, top5 = _topk(logits, labels, 1), _topk(logits, labels, 5)
        results[f"zeroshot_top1[{task}]"], results[f"zeroshot_top5[{task}]"] = top1, top5
        if i == 0:
            results["zeroshot_top1"], results["zeroshot_top5"] = top1, top5
    return results


def retrieval_eval(
    model: Any, dataset: str = "shapes_captions", batch_size: int = 256, device: Any = None,
    progress: bool = True, **dataset_kwargs: Any,
) -> dict[str, float]:
    """Text-to-image retrieval of the test split's held-out captions (see the module docstring)."""
    from zoo.data import load_dataset, transform_for

    if dataset not in ("shapes", "shapes_captions"):
        raise ValueError(f"the retrieval protocol needs captioned data with concepts (shapes_captions), got {dataset!r}")
    ds = load_dataset("shapes_captions", "test", transform=transform_for(model), **dataset_kwargs)
    images = _image_features(model, ds, batch_size, device, progress)
    queries = [caps[0] for caps in ds.captions]
    named = [names[0] for names in ds.caption_concepts]
    text = torch.cat([model.embed_text(queries[i:i + 512]).cpu() for i in range(0, len(queries), 512)])
    top = (text @ images.T).topk(10, dim=1).indices  # [Q, 10]
    concepts = {c: torch.as_tensor(np.asarray(v)) for c, v in ds.concepts.items()}
    relevant = torch.ones_like(top, dtype=torch.bool)
    for c in ("shape", "colour", "background"):
        use = torch.tensor([c in n for n in named])[:, None]
        relevant &= ~use | (concepts[c][top] == concepts[c][:, None])
    own = top == torch.arange(len(queries))[:, None]
    return {
        "t2i_recall@1": float(relevant[:, :1].any(1).float().mean()),
        "t2i_recall@5": float(relevant[:, :5].any(1).float().mean()),
        "t2i_recall@10": float(relevant.any(1).float().mean()),
        "t2i_precision@10": float(relevant.float().mean()),
        "t2i_exact_recall@10": float(own.any(1).float().mean()),
    }
