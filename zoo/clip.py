"""Image-text (CLIP) models: an image encoder and a text encoder into one L2-normalised space.

Two architectures, both built from open_clip (``open-clip-torch``, the maintained CLIP code):

- ``open_clip``: any open_clip model config by name (``arch_kwargs={"model_name": "ViT-B-32"}``);
  OpenAI's releases are the ``-quickgelu`` configs (OpenAI trained with QuickGELU).
- ``clip_small``: a zoo image backbone (e.g. the small convnet) with a linear projection, and
  open_clip's ``TextTransformer`` configured small; trained here by ``train.methods.clip``.

:class:`ClipModel` is a :class:`zoo.model.ZooModel`: ``embed(images)`` gives the image tower's
L2-normalised embeddings (the shared space), ``embed_text(list[str])`` the text tower's.
The tokenizer is described by the config's ``tokenizer`` block (saved in config.json).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.backbones import create_backbone
from zoo.model import ZooModel
from zoo.tokenizers import Tokenized, build_tokenizer

CLIP_ARCHES = ("open_clip", "clip_small")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "CLIP models need open_clip: pip install 'selfsup-zoo[clip]' (or pip install open_clip_torch)"
        ) from exc
    return open_clip


class ImageTower(nn.Module):
    """A zoo backbone followed by a linear projection into the shared space."""

    def __init__(self, arch: str, arch_kwargs: dict[str, Any], embed_dim: int):
        super().__init__()
        self.trunk = create_backbone(arch, **arch_kwargs)
        self.arch_kwargs = dict(getattr(self.trunk, "arch_kwargs", arch_kwargs))
        self.proj = nn.Linear(self.trunk.num_features, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(x))


class SmallClip(nn.Module):
    """Zoo image backbone + open_clip ``TextTransformer`` + learnable temperature (``logit_scale``)."""

    def __init__(
        self,
        vocab_size: int,
        image_arch: str = "convnet",
        image_kwargs: dict[str, Any] | None = None,
        embed_dim: int = 64,
        context_length: int = 16,
        text_width: int = 64,
        text_layers: int = 2,
        text_heads: int = 4,
        init_temperature: float = 0.07,
    ):
        super().__init__()
        from open_clip.transformer import TextTransformer

        _open_clip()
        self.visual = ImageTower(image_arch, dict(image_kwargs or {}), embed_dim)
        self.text = TextTransformer(
            context_length=context_length,
            vocab_size=vocab_size,
            width=text_width,
            heads=text_heads,
            layers=text_layers,
            output_dim=embed_dim,
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.context_length = context_length
        self.arch_kwargs = dict(
            vocab_size=vocab_size, image_arch=image_arch, image_kwargs=self.visual.arch_kwargs,
            embed_dim=embed_dim, context_length=context_length, text_width=text_width,
            text_layers=text_layers, text_heads=text_heads, init_temperature=init_temperature,
        )

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text(ids)


class ClipModel(ZooModel):
    """A CLIP model in the zoo: ``embed(images)`` and ``embed_text(texts)``, both L2-normalised.

    ``forward_features`` is the image tower's projected embedding (``[B, embed_dim]``);
    ``encode_text(ids)`` the text tower's. ``tokenize(texts)`` gives ids and truncation flags.
    """

    def __init__(
        self,
        arch: str,
        arch_kwargs: dict[str, Any] | None = None,
        num_clusters: int | None = None,
        num_cluster_heads: int = 1,
        pretrained_cfg: dict[str, Any] | None = None,
    ):
        nn.Module.__init__(self)  # not ZooModel.__init__: the towers are not a zoo backbone
        if num_clusters:
            raise ValueError("CLIP models have no cluster head")
        if arch not in CLIP_ARCHES:
            raise ValueError(f"unknown CLIP architecture {arch!r}; known: {', '.join(CLIP_ARCHES)}")
        kwargs = dict(arch_kwargs or {})
        cfg = copy.deepcopy(pretrained_cfg or {})
        if arch == "open_clip":
            if "model_name" not in kwargs:
                raise ValueError("the open_clip architecture needs arch_kwargs={'model_name': ...}")
            open_clip = _open_clip()
            logger = logging.getLogger()
            level = logger.level
            logger.setLevel(logging.ERROR)  # open_clip logs a warning for every model built without weights
            try:
                self.clip = open_clip.create_model(kwargs["model_name"], pretrained=None)
            finally:
                logger.setLevel(level)
            kwargs = {"model_name": kwargs["model_name"]}
            tokenizer_cfg = cfg.get("tokenizer") or {"type": "open_clip", "context_length": self.clip.context_length}
            embed_dim = int(self.clip.text_projection.shape[1])
        else:
            tokenizer_cfg = cfg.get("tokenizer")
            if not tokenizer_cfg:
                raise ValueError("a clip_small model needs its 'tokenizer' block (the vocabulary) in its config")
            self.clip = SmallClip(**kwargs)
            kwargs = dict(self.clip.arch_kwargs)
            embed_dim = int(kwargs["embed_dim"])
        self.tokenizer = build_tokenizer(tokenizer_cfg)
        self.arch, self.arch_kwargs = arch, kwargs
        self.num_features = embed_dim
        self.num_clusters = None
        self.cluster_head = None
        cfg.update(architecture=arch, arch_kwargs=kwargs, embed_dim=embed_dim,
                   tokenizer=self.tokenizer.config(), modalities=["image", "text"])
        cfg.setdefault("context_length", self.tokenizer.context_length)
        self.pretrained_cfg = cfg

    @property
    def backbone(self) -> nn.Module:  # the image tower, for code that freezes or compiles "the backbone"
        return self.clip.visual

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(x)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Text tower on token ids ``[N, L]`` -> ``[N, embed_dim]`` (not normalised)."""
        return self.clip.encode_text(ids)

    def tokenize(self, texts: list[str]) -> Tokenized:
        return self.tokenizer(texts)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[N, embed_dim]`` in the image embeddings' space."""
        ids = self.tokenize(texts).ids.to(self.clip.logit_scale.device)
        return F.normalize(self.encode_text(ids), dim=1)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    @torch.no_grad()
    def zero_shot_logits(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """``[B, N]`` scaled cosine similarities of images to texts (softmax gives class probabilities)."""
        return self.logit_scale.exp() * self.embed(images) @ self.embed_text(texts).T
