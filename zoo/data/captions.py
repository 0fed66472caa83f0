"""``shapes_captions``: every ``shapes`` image with captions built from its concepts.

A caption fills a template ("a {colour} {shape} on a {background} background", ...) with one of
several synonyms per concept value ("square" / "box", "gray" / "grey", "noisy" / "speckled").
Some templates name every concept, some only the shape, only the colour or two of them, so that
text about one concept alone also means something (zero-shot classification prompts). The
``test`` split's captions also use :data:`HELD_OUT_TEMPLATES`, which training never sees.

Deterministic: the captions of an image depend only on (seed, split, index). Items are the
``shapes`` items; ``.captions[i]`` is the list of captions of image ``i``; ``.caption_concepts``
says which concepts each caption names (its relevant images are those that share them).
"""

from __future__ import annotations

import re

import numpy as np

from zoo.data.base import InMemoryImageDataset, Transform
from zoo.data.shapes import BACKGROUNDS, COLOURS, SHAPES, load_shapes

SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {"circle": ("circle", "disc", "round shape"), "square": ("square", "box"),
              "triangle": ("triangle",), "cross": ("cross", "plus sign")},
    "colour": {"red": ("red", "scarlet"), "green": ("green",), "blue": ("blue",), "yellow": ("yellow",),
               "magenta": ("magenta", "pink"), "cyan": ("cyan", "turquoise")},
    "background": {"black": ("black", "dark"), "white": ("white",), "gray": ("gray", "grey"),
                   "noise": ("noisy", "speckled")},
}
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} on a {background} background",
    "a {colour} {shape}",
    "a {shape} on a {background} background",
    "a picture of a {shape}",
    "a {colour} object on a {background} background",
    "something {colour}",
    "a {shape} coloured {colour} with a {background} background",
    "{colour} {shape}, {background} background",
)
HELD_OUT_TEMPLATES: tuple[str, ...] = (
    "an image of a {colour} {shape} in front of a {background} background",
    "a {background} background behind a {colour} {shape}",
)
_FIELD = re.compile(r"{(\w+)}")
_VALUES = {"shape": SHAPES, "colour": COLOURS, "background": BACKGROUNDS}


def template_concepts(template: str) -> tuple[str, ...]:
    """The concepts a template names, in the order shape, colour, background."""
    named = set(_FIELD.findall(template))
    return tuple(c for c in ("shape", "colour", "background") if c in named)


def vocabulary() -> list[str]:
    """Every word any caption (train or held out) can contain: the tokenizer's vocabulary."""
    words: set[str] = set()
    for template in (*TRAIN_TEMPLATES, *HELD_OUT_TEMPLATES):
        words.update(re.findall(r"[a-z0-9]+", _FIELD.sub(" ", template).lower()))
    for values in SYNONYMS.values():
        for names in values.values():
            for name in names:
                words.update(name.split())
    return sorted(words)


def caption(template: str, concepts: dict[str, int], rng: np.random.Generator) -> str:
    """Fill ``template`` for an image's concept codes, a random synonym per concept."""
    fill = {}
    for concept in template_concepts(template):
        names = SYNONYMS[concept][_VALUES[concept][int(concepts[concept])]]
        fill[concept] = names[int(rng.integers(len(names)))]
    return template.format(**fill)


def make_captions(
    concepts: dict[str, np.ndarray], split: str, seed: int = 0, per_image: int = 5
) -> tuple[list[list[str]], list[list[tuple[str, ...]]]]:
    """``per_image`` captions for each image, and the concepts each caption names."""
    templates = TRAIN_TEMPLATES + (HELD_OUT_TEMPLATES if split == "test" else ())
    rng = np.random.default_rng([int(seed), 7, {"train": 0, "test": 1}[split]])
    n = len(concepts["shape"])
    captions, named = [], []
    for i in range(n):
        codes = {c: int(concepts[c][i]) for c in ("shape", "colour", "background")}
        # the first caption of a test image is always held out; the rest are drawn from all templates
        picks = rng.integers(len(templates), size=per_image)
        if split == "test":
            picks[0] = len(TRAIN_TEMPLATES) + int(rng.integers(len(HELD_OUT_TEMPLATES)))
        captions.append([caption(templates[t], codes, rng) for t in picks])
        named.append([template_concepts(templates[t]) for t in picks])
    return captions, named


def load_shapes_captions(
    split: str, transform: Transform | None, seed: int = 0, n_train: int = 3000, n_test: int = 1000,
    captions_per_image: int = 5,
) -> InMemoryImageDataset:
    """The ``shapes`` split with ``.captions`` (list of lists of str) and ``.caption_concepts``."""
    ds = load_shapes(split, transform, seed=seed, n_train=n_train, n_test=n_test)
    ds.name = "shapes_captions"
    ds.captions, ds.caption_concepts = make_captions(ds.concepts, split, seed, captions_per_image)
    return ds
