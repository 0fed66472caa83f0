"""ONNX export of a CLIP model's text tower, its onnxruntime encoder and parity check.

The image tower exports like every zoo encoder (:func:`serve.onnx.export_onnx`: ``images`` ->
``features``). The text tower becomes a second file: input ``tokens`` int64 ``[batch, L]`` (the
model's tokenizer output, ``L`` its context length), output ``text_features`` ``[batch, D]``
(``model.encode_text``, not normalised). Its ``zoo_config`` metadata carries the model's config with
``tower: "text"``, the name ``<model>_text`` and the tokenizer, so a server tokenises text itself
and runs from the ``.onnx`` file alone. :func:`export_clip` writes both and checks both.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from serve.onnx import (
    DEFAULT_OPSET,
    DEFAULT_TOLERANCE,
    METADATA_KEY,
    OnnxParityError,
    cache_root,
    export_mode,
    model_fingerprint,
)

if TYPE_CHECKING:
    from zoo.clip import ClipModel

TOKENS = "tokens"
TEXT_FEATURES = "text_features"
PARITY_TEXTS = ("a red circle", "a blue square on a white background", "something green", "a photo of a dog",
                "an image of a yellow cross in front of a noisy background", "a picture of a triangle")


def text_model_name(image_name: str) -> str:
    return f"{image_name}_text"


def text_config(model: ClipModel) -> dict[str, Any]:
    cfg = model.config()
    cfg.update(name=text_model_name(str(cfg.get("name") or model.arch)), tower="text",
               image_model=cfg.get("name"), logit_scale=float(model.logit_scale.detach().exp()))
    return cfg


def export_text_onnx(model: ClipModel, path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model``'s text tower to ``path`` (atomically): ``tokens`` int64 -> ``text_features``."""
    import onnx
    import torch

    from zoo.checkpoint import atomic_write

    class _Text(torch.nn.Module):
        def __init__(self, inner: ClipModel):
            super().__init__()
            self.inner = inner

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.inner.encode_text(tokens)

    dummy = model.tokenize(list(PARITY_TEXTS[:2])).ids
    buf = io.BytesIO()
    with export_mode(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Text(model), (dummy,), buf, input_names=[TOKENS], output_names=[TEXT_FEATURES],
                              dynamic_axes={TOKENS: {0: "batch"}, TEXT_FEATURES: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(text_config(model), sort_keys=True, default=str)
    proto.producer_name = "selfsup-zoo"
    onnx.checker.check_model(proto)
    return atomic_write(path, lambda tmp: onnx.save(proto, tmp))


class OnnxTextEncoder:
    """An exported text tower run by onnxruntime: ``run(tokens [B,L] int64) -> {"text_features": [B,D]}``.

    ``tokenize(texts)`` applies the model's own tokenizer (from the file's metadata). Attributes as
    :class:`serve.onnx.OnnxEncoder`: ``name``, ``pretrained_cfg``, ``input_name``, ``input_shape``
    ``(L,)``, ``output_names``, ``embed_dim``, ``context_length``, ``image_model``.
    """

    num_clusters = None

    def __init__(self, path: str | os.PathLike, threads: int = 0):
        import onnxruntime as ort

        from serve.onnx import default_providers
        from zoo.tokenizers import build_tokenizer

        self.path = Path(path)
        opts = ort.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=default_providers())
        self.pretrained_cfg: dict[str, Any] = json.loads(
            self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}"))
        if self.pretrained_cfg.get("tower") != "text":
            raise ValueError(f"{self.path}: not a text tower export (zoo_config has no tower='text')")
        self.name = str(self.pretrained_cfg["name"])
        self.image_model = str(self.pretrained_cfg.get("image_model") or "")
        self.logit_scale = float(self.pretrained_cfg.get("logit_scale") or 100.0)  # zero-shot softmax scale
        self.tokenizer = build_tokenizer(self.pretrained_cfg["tokenizer"])
        self.context_length = int(self.tokenizer.context_length)
        self.input_name = TOKENS
        self.input_shape = (self.context_length,)
        self.output_names = [TEXT_FEATURES]
        self.embed_dim = int(self.session.get_outputs()[0].shape[1])
        self.output_shapes = {TEXT_FEATURES: [-1, self.embed_dim]}
        self.providers = self.session.get_providers()

    def tokenize(self, texts: list[str]):
        return self.tokenizer(texts)

    def run(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens must be [B,{self.context_length}], got {list(tokens.shape)}")
        if tokens.shape[0] == 0:
            return {TEXT_FEATURES: np.zeros((0, self.embed_dim), np.float32)}
        return {TEXT_FEATURES: self.session.run([TEXT_FEATURES], {TOKENS: tokens})[0]}

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings ``[N, D]`` (like ``ClipModel.embed_text``)."""
        f = self.run(self.tokenize(texts).ids.numpy())[TEXT_FEATURES]
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def check_text_parity(model: ClipModel, enc: OnnxTextEncoder, texts: tuple[str, ...] = PARITY_TEXTS) -> float:
    """Max abs difference between PyTorch's and onnxruntime's ``text_features`` on ``texts``."""
    import torch

    ids = model.tokenize(list(texts)).ids
    model.eval()
    with torch.no_grad():
        ref = model.encode_text(ids.to(model.logit_scale.device)).float().cpu().numpy()
    got = enc.run(ids.numpy())[TEXT_FEATURES]
    return float(np.abs(ref.astype(np.float64) - got).max())


def text_onnx_for_model(model: ClipModel, opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE) -> Path:
    """The text tower's ``.onnx``, exported once into ``$ZOO_CACHE/onnx/`` and parity-checked."""
    name = str(model.pretrained_cfg.get("name") or model.arch).replace("/", "_")
    path = cache_root() / "onnx" / f"{text_model_name(name)}-{model_fingerprint(model, opset)}.onnx"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.onnx")
    try:
        export_text_onnx(model, tmp, opset=opset)
        diff = check_text_parity(model, OnnxTextEncoder(tmp))
        if diff > tolerance:
            raise OnnxParityError(f"{name}: text tower ONNX differs from PyTorch by {diff:.2e} (tolerance {tolerance:g})")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_clip_repository(model: ClipModel, out: str | os.PathLike, **kwargs: Any) -> list[Path]:
    """Both towers as two models of a Triton repository: ``out/<name>`` and ``out/<name>_text``."""
    from serve.onnx import onnx_for_model
    from serve.triton import write_model_repository

    image = write_model_repository(onnx_for_model(model), out, **kwargs)
    text = write_model_repository(text_onnx_for_model(model), out, **kwargs)
    return [image, text]
