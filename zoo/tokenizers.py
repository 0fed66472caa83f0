"""Text tokenizers for image-text models, built from the ``tokenizer`` block of a model's config.json.

Two kinds:

- ``open_clip``: open_clip's byte-pair tokenizer (the vocabulary file ships inside open_clip), as
  every OpenAI / LAION CLIP uses it. Config: ``{"type": "open_clip", "context_length": 77}``.
- ``words``: a word-level vocabulary stored in the config itself, for small models trained here
  (a 49k-token BPE embedding would dwarf a model with a 40-word vocabulary). Config:
  ``{"type": "words", "vocab": [...], "context_length": 16}``; id 0 pads, 1 is unknown, the last two
  ids open and close a text (the closing id is the largest, so open_clip's argmax pooling finds it).

Both give ``[N, context_length]`` int64 ids and say which texts were cut to fit the context.
Empty (or whitespace-only) text raises ValueError: it has no meaning to embed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

PAD, UNK = "<pad>", "<unk>"
SOT, EOT = "<start_of_text>", "<end_of_text>"
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class Tokenized:
    """Token ids ``[N, L]`` and, per text, whether it was longer than the context and cut."""

    ids: torch.Tensor
    truncated: list[bool]


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string (wrap it: [text])")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts given")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(f"text {i} is empty")
    return texts


class WordTokenizer:
    """Lower-cased word-level tokenizer over a fixed vocabulary (``words`` in a model config)."""

    def __init__(self, vocab: list[str], context_length: int = 16):
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3 (start, one word, end), got {context_length}")
        words = [w for w in vocab if w not in (PAD, UNK, SOT, EOT)]
        if len(set(words)) != len(words):
            raise ValueError("the vocabulary has repeated words")
        self.vocab = [PAD, UNK, *words, SOT, EOT]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = int(context_length)
        self.sot_id, self.eot_id = len(self.vocab) - 2, len(self.vocab) - 1

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def config(self) -> dict[str, Any]:
        return {"type": "words", "vocab": self.vocab[2:-2], "context_length": self.context_length}

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, 1) for w in _WORD.findall(text.lower())]

    def __call__(self, texts: list[str]) -> Tokenized:
        texts = _check_texts(texts)
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        room = self.context_length - 2
        truncated = []
        for row, text in enumerate(texts):
            tokens = self.encode(text)
            truncated.append(len(tokens) > room)
            tokens = [self.sot_id, *tokens[:room], self.eot_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return Tokenized(ids, truncated)

    @classmethod
    def fit(cls, texts: list[str], context_length: int = 16) -> WordTokenizer:
        """A vocabulary of every word in ``texts`` (sorted, so the ids do not depend on text order)."""
        return cls(sorted({w for t in texts for w in _WORD.findall(t.lower())}), context_length)


class OpenClipTokenizer:
    """open_clip's BPE tokenizer (``open_clip.tokenizer.SimpleTokenizer``) with truncation reported."""

    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = int(context_length)
        self._tok = SimpleTokenizer(context_length=self.context_length)

    def config(self) -> dict[str, Any]:
        return {"type": "open_clip", "context_length": self.context_length}

    def __call__(self, texts: list[str]) -> Tokenized:
        texts = _check_texts(texts)
        # the library's own call pads and cuts (keeping the end token); encode() tells whether it had to cut
        truncated = [len(self._tok.encode(t)) > self.context_length - 2 for t in texts]
        return Tokenized(self._tok(texts).long(), truncated)


def build_tokenizer(cfg: dict[str, Any]) -> WordTokenizer | OpenClipTokenizer:
    """The tokenizer a config's ``tokenizer`` block describes."""
    kind = cfg.get("type")
    if kind == "words":
        return WordTokenizer(list(cfg["vocab"]), int(cfg.get("context_length", 16)))
    if kind == "open_clip":
        return OpenClipTokenizer(int(cfg.get("context_length", 77)))
    raise ValueError(f"unknown tokenizer type {kind!r}; known: 'open_clip', 'words'")
