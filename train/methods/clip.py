"""CLIP: Learning Transferable Visual Models From Natural Language Supervision (Radford et al., ICML 2021).

An image tower (a zoo backbone + linear projection) and a text tower (open_clip's
``TextTransformer``, configured small) map an image and one of its captions into one space;
the symmetric InfoNCE loss over the batch's image-text similarity matrix, scaled by a learnable
temperature (``logit_scale = log(1/T)``, clamped at 100 as in the paper), pulls matching pairs
together. The training data must carry captions (``data: shapes_captions``): each step draws one
caption per image. The exported model is a :class:`zoo.clip.ClipModel` with its tokenizer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from train.distributed import all_gather_with_grad, get_rank
from train.methods.base import Method, StepContext, register_method
from zoo.clip import ClipModel
from zoo.model import ZooModel
from zoo.tokenizers import WordTokenizer


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalised ``image`` / ``text`` ``[B,D]`` (row i of each is one pair).

    ``logits = exp(logit_scale) * image @ text.T``; the loss is the mean of the image->text and
    text->image cross entropies with the diagonal as targets. Under DDP the other ranks' embeddings
    (gathered with gradients) are negatives too, and the rows are this rank's pairs.
    """
    b = image.shape[0]
    all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)
    targets = torch.arange(b, device=image.device) + get_rank() * b
    scale = logit_scale.exp()
    logits_i = scale * image @ all_text.T  # [B, W*B]
    logits_t = scale * text @ all_image.T
    return 0.5 * (F.cross_entropy(logits_i, targets) + F.cross_entropy(logits_t, targets))


def _caption_data(model: ZooModel) -> tuple[list[list[str]], list[str]]:
    """The training split's captions and the vocabulary to tokenize them with."""
    from zoo.data import load_dataset, raw_transform

    name = model.pretrained_cfg.get("dataset")
    ds = load_dataset(name, "train", transform=raw_transform(tuple(model.pretrained_cfg["input_size"])))
    if not hasattr(ds, "captions"):
        raise ValueError(f"the clip method needs captioned training data (e.g. data: shapes_captions), got {name!r}")
    if name == "shapes_captions":
        from zoo.data.captions import vocabulary

        return ds.captions, vocabulary()  # every word a caption may hold, held-out templates included
    return ds.captions, WordTokenizer.fit([c for caps in ds.captions for c in caps]).vocab[2:-2]


@register_method("clip")
class CLIP(Method):
    """Image-text contrastive training; ``model`` gives the image backbone and the preprocessing."""

    def __init__(
        self,
        model: ZooModel,
        embed_dim: int = 64,
        context_length: int = 16,
        text_width: int = 64,
        text_layers: int = 2,
        text_heads: int = 4,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
    ):
        captions, vocab = _caption_data(model)
        tokenizer = WordTokenizer(vocab, context_length)
        cfg: dict[str, Any] = {**model.config(), "tokenizer": tokenizer.config()}
        cfg["description"] = (f"CLIP ({model.arch} image tower, {text_layers}-layer text transformer) trained on "
                              f"{cfg.get('dataset')} by selfsup-zoo")
        clip = ClipModel("clip_small", dict(
            vocab_size=tokenizer.vocab_size, image_arch=model.arch, image_kwargs=model.arch_kwargs,
            embed_dim=embed_dim, context_length=context_length, text_width=text_width, text_layers=text_layers,
            text_heads=text_heads, init_temperature=init_temperature,
        ), pretrained_cfg=cfg)
        super().__init__(clip)
        self.max_log_scale = math.log(max_logit_scale)
        per_image = {len(c) for c in captions}
        if len(per_image) != 1:
            raise ValueError("every training image needs the same number of captions")
        # [N, captions per image, L] token ids; derived from the data, so not part of the checkpoint
        flat = tokenizer([c for caps in captions for c in caps]).ids
        self.caption_ids = flat.view(len(captions), per_image.pop(), context_length)

    def training_step(self, images: torch.Tensor, indices: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
        x = ctx.augment(images, ctx.generator)
        pick = torch.randint(self.caption_ids.shape[1], (len(indices),), generator=ctx.generator)
        ids = self.caption_ids[indices.cpu(), pick].to(images.device)
        image = F.normalize(self.model.forward_features(x), dim=1)
        text = F.normalize(self.model.encode_text(ids), dim=1)
        loss = clip_loss(image, text, self.model.logit_scale)
        return {"loss": loss, "temperature": self.model.logit_scale.detach().neg().exp()}

    def on_after_optimizer_step(self, ctx: StepContext) -> None:
        with torch.no_grad():  # the paper clips the scale at 100 to keep training stable
            self.model.logit_scale.clamp_(0.0, self.max_log_scale)
