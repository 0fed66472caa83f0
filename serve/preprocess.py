"""Safe image decoding and the model's preprocessing, shared by the server, the index and the demo.

``decode_image`` turns untrusted bytes into a PIL image or raises :class:`ImageDecodeError` naming
the problem (not an image, truncated, too many pixels). ``Preprocessor`` applies the transform
``zoo.data.transform_for(model)`` applies (the PyTorch path), so features served over HTTP equal
in-process features for the same file.

Memory per image is bounded whatever its size or aspect ratio (:meth:`Preprocessor.bound`): an
image more than ``REDUCE_AT`` times larger per side than the model's resize target is first
box-reduced by an integer factor (``Image.reduce``), and an image whose resize would exceed
``RESIZE_BUDGET`` times the model input is first cropped to the central window that the center crop
keeps. Both steps leave images of ordinary size and shape untouched (bit-exact with the PyTorch path);
for the others they change the result only by interpolation rounding.
"""

from __future__ import annotations

import ctypes
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# 40 Mpx: a 20000x20000 PNG that declares 400 Mpx is refused before its pixels are decoded.
DEFAULT_MAX_PIXELS = 40_000_000
# An image more than REDUCE_AT x its resize target per side is box-reduced to 4-8x the target first.
REDUCE_AT = 8
# The resize step may produce at most RESIZE_BUDGET x the model input's pixels (thin images are
# cropped to the window the center crop keeps before they are resized).
RESIZE_BUDGET = 16
# Decoded images of at least this many pixels are followed by release_memory().
TRIM_AT = 4_000_000
_EXIF_ORIENTATION = 0x0112
_LIBC: Any = None
_REDUCIBLE = {"L", "LA", "La", "I", "F", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; the message says why (client error, HTTP 4xx)."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """Decode ``data`` fully into a PIL image, refusing non-images, truncated files and bombs.

    The declared size is checked against ``max_pixels`` from the header, before any pixel is
    decoded; then the whole image is decoded (``load()``) so truncation is found here and not later.
    PIL's own bomb guard (a warning above ``Image.MAX_IMAGE_PIXELS``, an error above twice that) is
    answered with the same :class:`ImageDecodeError`; no process-wide warning filter is changed
    (``warnings.catch_warnings`` is not thread-safe, and decoding runs in a thread pool).
    """
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise ImageDecodeError(
                f"{name}: image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels"
            )
        img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Raised from Image.open, before the size is known here (the warning when a caller's filter
        # turns warnings into errors).
        raise ImageDecodeError(f"{name}: refused as a decompression bomb, too many pixels "
                               f"(limit {max_pixels} pixels; {e})") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not an image PIL can read ({len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt streams
        raise ImageDecodeError(f"{name}: corrupt or truncated image ({e})") from None
    except (MemoryError, OverflowError) as e:  # absurd declared sizes in some decoders
        raise ImageDecodeError(f"{name}: image too large to decode ({type(e).__name__})") from None
    return img


class Preprocessor:
    """Model preprocessing from its pretrained config: PIL image -> float32 ``[3,H,W]`` numpy array.

    ``cfg`` is ``model.pretrained_cfg`` (or the config stored in an exported ONNX file / an index).
    It is the same :func:`zoo.data.transform_for` transform the PyTorch path uses, after
    :meth:`bound` has capped the pixels it works on.
    """

    def __init__(self, cfg: Mapping[str, Any]):
        from zoo.data import transform_for

        self.cfg = dict(cfg)
        self.transform = transform_for(self.cfg)
        self.input_shape: tuple[int, int, int] = (3, *self.transform.size)

    def bound(self, img: Image.Image) -> Image.Image:
        """``img`` with its working size capped: a constant times the model input, any aspect ratio.

        1. More than ``REDUCE_AT`` x the resize target on both sides: ``Image.reduce`` by an integer
           factor so the image is 4-8x the target (a box prefilter before the antialiased resize).
        2. EXIF orientation applied (on the reduced image) so the window below is in display coordinates.
        3. A resize larger than ``RESIZE_BUDGET`` x the model input (a thin image: 1x400000 would
           resize to 28x11200000): crop to the central window the center crop keeps, plus a margin for
           the interpolation filter. The short side, hence the resize scale, is unchanged.
        """
        orientation = _orientation(img)
        w, h = img.size
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        rh, rw = self.transform.resize_hw(h, w)
        ratio = min(h / rh, w / rw)
        if ratio >= REDUCE_AT:
            if img.mode not in _REDUCIBLE:  # palette / bilevel / 16-bit: reduce() would average indices
                img = img.convert("I" if img.mode.startswith("I;16") else
                                  ("L" if img.mode == "1" else "RGBA"))
            img = img.reduce(int(ratio // (REDUCE_AT // 2)))
            if orientation != 1:  # reduce() may not carry the EXIF (TIFF tags): rotate by the value read above
                img = _transpose(img, orientation)
        elif orientation != 1:
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - unreadable EXIF: the transform ignores it too
                pass
        w, h = img.size
        rh, rw = self.transform.resize_hw(h, w)
        ch, cw = self.transform.size
        if rh * rw <= RESIZE_BUDGET * ch * cw:
            return img
        # the center crop keeps ch x cw of the resized image: ch*h/rh x cw*w/rw source pixels
        sy, sx = h / rh, w / rw
        margin_y, margin_x = math.ceil(2 * max(sy, 1.0)) + 2, math.ceil(2 * max(sx, 1.0)) + 2
        short = min(h, w)
        win_h = min(h, max(short, math.ceil(ch * sy) + 2 * margin_y))
        win_w = min(w, max(short, math.ceil(cw * sx) + 2 * margin_x))
        win_h += (h - win_h) % 2  # same parity: the window is centred on the image's centre exactly
        win_w += (w - win_w) % 2
        top, left = (h - win_h) // 2, (w - win_w) // 2
        return img.crop((left, top, left + win_w, top + win_h))

    def __call__(self, img: Image.Image) -> np.ndarray:
        return self.transform(self.bound(img)).numpy()

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``[B,3,H,W]`` float32 C-contiguous batch."""
        if not images:
            return np.zeros((0, *self.input_shape), dtype=np.float32)
        return np.ascontiguousarray(np.stack([self(img) for img in images]), dtype=np.float32)

    def config(self) -> dict[str, Any]:
        """The preprocessing keys recorded with exported models and indexes."""
        return {k: self.cfg.get(k) for k in ("input_size", "mean", "std", "crop_pct", "interpolation")}


def decode_and_preprocess(data: bytes, pre: Preprocessor, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                          name: str = "image") -> np.ndarray:
    """Untrusted bytes -> float32 ``[3,H,W]`` model input, holding one decoded image at a time.

    The call every front end (HTTP uploads, gRPC, the demo) uses: ``decode_image`` (``max_pixels``,
    corrupt files, bombs -> :class:`ImageDecodeError`), then :meth:`Preprocessor.bound` and the
    transform. The decoded image is released before returning.
    """
    img = decode_image(data, max_pixels=max_pixels, name=name)
    big = img.width * img.height >= TRIM_AT
    try:
        return pre(img)
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # lazily-read parts (EXIF, palette) that are bad
        raise ImageDecodeError(f"{name}: corrupt image ({e})") from None
    finally:
        img.close()
        del img
        if big:
            release_memory()


def release_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Large decoded images are freed into malloc's arenas, which keep them: without this a server's RSS
    stays at its peak after one big upload.
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def _transpose(img: Image.Image, orientation: int) -> Image.Image:
    """``img`` shown upright for EXIF ``orientation``, with the orientation metadata dropped (so the
    transform does not rotate it a second time)."""
    method = _TRANSPOSE.get(orientation)
    if method is None:
        return img
    out = img.transpose(method)
    for key in ("exif", "Raw profile type exif", "xmp", "XML:com.adobe.xmp"):
        out.info.pop(key, None)
    return out


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: as the transform does, ignore it
        return 1
