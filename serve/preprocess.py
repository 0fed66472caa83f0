"""Safe image decoding and the model's preprocessing, shared by the server, the index and the demo.

``decode_image`` turns untrusted bytes into a PIL image or raises :class:`ImageDecodeError` naming
the problem (not an image, truncated, too many pixels). ``Preprocessor`` applies exactly the
transform ``zoo.data.transform_for(model)`` applies (the PyTorch path), so features served over
HTTP equal in-process features for the same file.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

# 40 Mpx: a 20000x20000 PNG that declares 400 Mpx is refused before its pixels are decoded.
DEFAULT_MAX_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; the message says why (client error, HTTP 4xx)."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """Decode ``data`` fully into a PIL image, refusing non-images, truncated files and bombs.

    The declared size is checked against ``max_pixels`` from the header, before any pixel is
    decoded; then the whole image is decoded (``load()``) so truncation is found here and not later.
    """
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(
                    f"{name}: image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels"
                )
            img.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{name}: refused as a decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image PIL can read ({len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt streams
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({e})") from None
    return img


class Preprocessor:
    """Model preprocessing from its pretrained config: PIL image -> float32 ``[3,H,W]`` numpy array.

    ``cfg`` is ``model.pretrained_cfg`` (or the config stored in an exported ONNX file / an index).
    It is the same :func:`zoo.data.transform_for` transform the PyTorch path uses.
    """

    def __init__(self, cfg: Mapping[str, Any]):
        from zoo.data import transform_for

        self.cfg = dict(cfg)
        self.transform = transform_for(self.cfg)
        self.input_shape: tuple[int, int, int] = (3, *self.transform.size)

    def __call__(self, img: Image.Image) -> np.ndarray:
        return self.transform(img).numpy()

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``[B,3,H,W]`` float32 C-contiguous batch."""
        if not images:
            return np.zeros((0, *self.input_shape), dtype=np.float32)
        return np.ascontiguousarray(np.stack([self(img) for img in images]), dtype=np.float32)

    def config(self) -> dict[str, Any]:
        """The preprocessing keys recorded with exported models and indexes."""
        return {k: self.cfg.get(k) for k in ("input_size", "mean", "std", "crop_pct", "interpolation")}
