"""torchvision Vision Transformers as encoders: the class token after the final norm."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

# (layers, heads, hidden, mlp): ViT-S/16 as in DeiT / DINO, ViT-B/16 as in torchvision.
_VIT_SIZES = {"vit_s16": (12, 6, 384, 1536), "vit_b16": (12, 12, 768, 3072)}


class ViTEncoder(nn.Module):
    """``[B,3,H,W] -> [B,hidden]``; trained at S = ``image_size`` (224 by default, any multiple of the patch).

    Other sizes (H and W multiples of the patch size) work as in DINO: the patch position
    embeddings are resized bicubically to the new grid (DINO's ``interpolate_pos_encoding``).
    """

    def __init__(self, arch: str = "vit_s16", image_size: int = 224, patch_size: int = 16):
        super().__init__()
        layers, heads, hidden, mlp = _VIT_SIZES[arch]
        self.vit = VisionTransformer(
            image_size=image_size,
            patch_size=patch_size,
            num_layers=layers,
            num_heads=heads,
            hidden_dim=hidden,
            mlp_dim=mlp,
        )
        self.vit.heads = nn.Identity()
        self.num_features = hidden
        self.arch_kwargs = {"image_size": image_size, "patch_size": patch_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.vit.image_size
        if x.shape[-2] == size and x.shape[-1] == size:
            return self.vit(x)
        return self._forward_any_size(x)

    def _forward_any_size(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.vit.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}")
        tokens = self.vit.conv_proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.vit.class_token.expand(n, -1, -1), tokens], dim=1)
        encoder = self.vit.encoder
        tokens = tokens + interpolate_pos_embedding(encoder.pos_embedding, h // p, w // p)
        return encoder.ln(encoder.layers(encoder.dropout(tokens)))[:, 0]


def interpolate_pos_embedding(pos: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``[1, 1+N, D]`` (class token first, N a square grid) -> ``[1, 1+rows*cols, D]``, as DINO resizes it.

    DINO scales by ``(rows + 0.1) / sqrt(N)`` (the 0.1 keeps the floor of the output size right)
    and interpolates with that scale factor, not the output size: both are kept so the values match.
    """
    n = pos.shape[1] - 1
    side = math.isqrt(n)
    if rows * cols == n and rows == cols:
        return pos
    dim = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(
        grid, scale_factor=((rows + 0.1) / math.sqrt(n), (cols + 0.1) / math.sqrt(n)), mode="bicubic"
    )
    if tuple(grid.shape[-2:]) != (rows, cols):
        raise ValueError(f"position embeddings resized to {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)
