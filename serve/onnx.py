"""ONNX export of zoo encoders, an onnxruntime encoder, and the PyTorch-vs-onnxruntime parity check.

An exported file has one input ``images`` float32 ``[batch,3,H,W]`` (dynamic batch axis) and the
outputs ``features`` ``[batch,D]`` (``model.forward_features``, not normalised) and, for a model
with a cluster head, ``cluster_probs`` ``[batch,K]`` (``model.predict_cluster``). Its metadata
``zoo_config`` holds the model's config (name, preprocessing, embed dim, ...), so a server can run
from the ``.onnx`` file alone.

>>> path = export_onnx(zoo.create_model("scan_convnet_mnist5k", pretrained=True), "scan.onnx")
>>> enc = OnnxEncoder(path)
>>> enc.run(images)["features"].shape            # images: float32 [B,3,28,28]
(B, 256)

The export uses the TorchScript-based exporter (``dynamo=False``): it needs no ``onnxscript``
and handles the convnet, ResNet and ViT backbones with a dynamic batch axis.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: an OnnxEncoder runs without it
    import torch

    from zoo.model import ZooModel

INPUT_NAME = "images"
FEATURES = "features"
CLUSTER_PROBS = "cluster_probs"
METADATA_KEY = "zoo_config"
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4
# Bump when the exported graph changes for the same weights (invalidates the onnx_for_model cache).
EXPORT_FORMAT = 1
# Datasets available with no network, used for the real-image parity check.
BUNDLED_DATASETS = ("mnist5k", "digits", "shapes")
REAL_CHECK_IMAGES = 256


class OnnxParityError(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance."""


# ----------------------------------------------------------------------------- export
def _export_module(model: ZooModel) -> torch.nn.Module:
    import torch

    class _Export(torch.nn.Module):
        def __init__(self, inner: ZooModel):
            super().__init__()
            self.inner = inner

        def forward(self, images: torch.Tensor):
            features = self.inner.forward_features(images)
            if self.inner.cluster_head is None:
                return features
            return features, self.inner.forward_head(features).softmax(dim=1)

    return _Export(model)


def output_names_for(model: ZooModel) -> list[str]:
    return [FEATURES, CLUSTER_PROBS] if model.has_cluster_head else [FEATURES]


def _input_hw(model: ZooModel) -> tuple[int, int]:
    size = model.pretrained_cfg.get("input_size")
    if not size or len(size) != 3:
        raise ValueError(
            f"model {model.pretrained_cfg.get('name', model.arch)!r} has no input_size [3,H,W] in its "
            f"pretrained config (got {size!r}); the ONNX input needs a fixed H and W"
        )
    if int(size[0]) != 3:
        raise ValueError(f"input_size {list(size)}: zoo encoders take 3-channel images")
    return int(size[1]), int(size[2])



@contextlib.contextmanager
def export_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no fused attention while ``torch.onnx.export`` traces ``model``; both restored after.

    nn.MultiheadAttention's inference fast path (aten::_native_multi_head_attention) has no ONNX export.
    """
    import torch

    was_training = model.training
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha is not None else None
    model.eval()
    try:
        if mha is not None:
            mha.set_fastpath_enabled(False)
        yield
    finally:
        model.train(was_training)
        if mha is not None:
            mha.set_fastpath_enabled(fastpath)


def export_onnx(model: ZooModel, path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``model`` to ``path`` (written atomically) with a dynamic batch axis and ``zoo_config`` metadata."""
    import onnx
    import torch

    from zoo.checkpoint import atomic_write

    h, w = _input_hw(model)
    names = output_names_for(model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dummy = torch.randn(2, 3, h, w, device=device)
    dynamic_axes = {n: {0: "batch"} for n in [INPUT_NAME, *names]}
    kwargs: dict[str, Any] = {}
    import inspect

    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the torch.export-based exporter needs onnxscript
    buf = io.BytesIO()
    with export_mode(model):
        with warnings.catch_warnings():
            # torchvision's ViT checks the image size in Python (constant under tracing: H, W are fixed).
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=".*feature will be removed.*")
            torch.onnx.export(
                _export_module(model),
                (dummy,),
                buf,
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                **kwargs,
            )
    proto = onnx.load_from_string(buf.getvalue())
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(model.config(), sort_keys=True, default=str)
    proto.producer_name = "selfsup-zoo"
    proto.doc_string = f"zoo model {model.pretrained_cfg.get('name', model.arch)!r}: {INPUT_NAME} -> {', '.join(names)}"
    onnx.checker.check_model(proto)
    return atomic_write(path, lambda tmp: onnx.save(proto, tmp))


# ----------------------------------------------------------------------------- onnxruntime encoder
def default_providers() -> list[str]:
    """onnxruntime execution providers to use: CUDA first when this onnxruntime has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxEncoder:
    """An exported zoo encoder run by onnxruntime: ``run(images [B,3,H,W] float32) -> {output: array}``.

    Attributes: ``name``, ``pretrained_cfg`` (the ``zoo_config`` metadata), ``input_shape`` (3,H,W),
    ``output_names``, ``embed_dim``, ``num_clusters`` (None without a cluster head), ``providers``.
    ``spin=True`` restores onnxruntime's default of idle intra-op threads busy-waiting for work.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0,
                 spin: bool = False):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX file not found")
        opts = ort.SessionOptions()
        if threads > 0:
            opts.intra_op_num_threads = int(threads)
        if not spin:
            # Idle intra-op threads busy-wait for work by default. Between a server's batches (and on a
            # shared machine) that burns the cores the request handling needs; measured: more img/s off.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=opts, providers=list(providers or default_providers())
            )
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise ValueError(f"{self.path}: onnxruntime cannot load it: {exc}") from exc
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.pretrained_cfg: dict[str, Any] = json.loads(meta.get(METADATA_KEY, "{}"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.path}: metadata {METADATA_KEY!r} is not valid JSON: {exc}") from exc
        self.name: str = str(self.pretrained_cfg.get("name") or self.path.stem)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(
                f"{self.path}: expected one input [batch,3,H,W], got "
                f"{[(i.name, i.shape) for i in inputs]}"
            )
        self.input_name: str = inputs[0].name
        dims = inputs[0].shape[1:]
        if not all(isinstance(d, int) for d in dims):
            raise ValueError(f"{self.path}: input {self.input_name!r} needs fixed C,H,W, got {inputs[0].shape}")
        self.input_shape: tuple[int, int, int] = (int(dims[0]), int(dims[1]), int(dims[2]))
        outputs = self.session.get_outputs()
        self.output_names: list[str] = [o.name for o in outputs]
        shapes = {o.name: o.shape for o in outputs}
        self.output_shapes: dict[str, list] = shapes
        self.embed_dim: int = int(shapes[FEATURES][1]) if FEATURES in shapes else int(outputs[0].shape[1])
        self.num_clusters: int | None = int(shapes[CLUSTER_PROBS][1]) if CLUSTER_PROBS in shapes else None
        self.providers: list[str] = self.session.get_providers()

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """All outputs for a float32 ``[B,*input_shape]`` batch; anything else raises ValueError."""
        if not isinstance(images, np.ndarray):
            raise ValueError(f"images must be a numpy array, got {type(images).__name__}")
        if images.dtype != np.float32:
            raise ValueError(f"images must be float32, got dtype {images.dtype}")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(
                f"images must have shape [B,{','.join(map(str, self.input_shape))}] for model {self.name!r}, "
                f"got {list(images.shape)}"
            )
        if images.shape[0] == 0:
            return {n: np.zeros((0, *self.output_shapes[n][1:]), dtype=np.float32) for n in self.output_names}
        results = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(images)})
        return dict(zip(self.output_names, results))

    def __repr__(self) -> str:
        return (
            f"OnnxEncoder(name={self.name!r}, input_shape={self.input_shape}, outputs={self.output_names}, "
            f"providers={self.providers})"
        )


def read_zoo_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``zoo_config`` metadata of an exported file (without starting onnxruntime)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    raise ValueError(f"{path}: no {METADATA_KEY!r} metadata (not exported by selfsup-zoo)")


# ----------------------------------------------------------------------------- parity
def _torch_outputs(model: ZooModel, x: torch.Tensor) -> dict[str, np.ndarray]:
    import torch

    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(param.device)
    with torch.no_grad():
        features = model.forward_features(x)
        out = {FEATURES: features}
        if model.has_cluster_head:
            out[CLUSTER_PROBS] = model.forward_head(features).softmax(dim=1)
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def check_parity(
    model: ZooModel,
    onnx_path: str | os.PathLike | OnnxEncoder,
    real_images: torch.Tensor | None = None,
    n_random: int = 8,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Max abs difference between PyTorch and onnxruntime, per output, on random and on real inputs.

    Random inputs are standard normal (the scale of normalised images). Returns
    ``{"random": {output: diff}, "real": {output: diff} | None, "scale": {output: max |PyTorch|},
    "max_abs_diff": float, "max_rel_diff": float (diff / scale), "n_random": int, "n_real": int,
    "providers": [...]}``.
    """
    import torch

    enc = onnx_path if isinstance(onnx_path, OnnxEncoder) else OnnxEncoder(onnx_path)
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator().manual_seed(seed)
        random = torch.randn(n_random, *enc.input_shape, generator=gen)
        scale = {n: 0.0 for n in enc.output_names}
        result: dict[str, Any] = {"random": _max_diffs(model, enc, random, batch_size, scale), "real": None}
        if real_images is not None:
            if real_images.ndim != 4 or tuple(real_images.shape[1:]) != enc.input_shape:
                raise ValueError(f"real_images must be [N,{','.join(map(str, enc.input_shape))}], "
                                 f"got {list(real_images.shape)}")
            result["real"] = _max_diffs(model, enc, real_images.float(), batch_size, scale)
    finally:
        model.train(was_training)
    diffs = [v for part in ("random", "real") for v in (result[part] or {}).values()]
    rel = [v / max(scale[n], 1e-12) for part in ("random", "real") for n, v in (result[part] or {}).items()]
    result.update(
        scale=scale,
        max_abs_diff=max(diffs),
        max_rel_diff=max(rel),
        n_random=n_random,
        n_real=0 if real_images is None else int(real_images.shape[0]),
        providers=enc.providers,
    )
    return result


def _max_diffs(
    model: ZooModel, enc: OnnxEncoder, images: torch.Tensor, batch_size: int, scale: dict[str, float]
) -> dict[str, float]:
    worst = {n: 0.0 for n in enc.output_names}
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].contiguous()
        ref = _torch_outputs(model, x)
        got = enc.run(x.cpu().numpy().astype(np.float32))
        if set(ref) != set(got):
            raise OnnxParityError(f"outputs differ: PyTorch {sorted(ref)} vs ONNX {sorted(got)}")
        for n in enc.output_names:
            if ref[n].shape != got[n].shape:
                raise OnnxParityError(f"{n}: PyTorch shape {ref[n].shape} vs ONNX {got[n].shape}")
            worst[n] = max(worst[n], float(np.abs(ref[n].astype(np.float64) - got[n]).max()))
            scale[n] = max(scale[n], float(np.abs(ref[n]).max()))
    return worst


def real_images_for(
    model: ZooModel, dataset: str | None = None, n: int = REAL_CHECK_IMAGES
) -> tuple[torch.Tensor | None, str]:
    """Up to ``n`` test images of ``dataset`` (default: the model's) with the model's transform, and a note.

    Returns ``(None, reason)`` when the model's dataset is not bundled (no network needed).
    """
    import torch

    from zoo.data import load_dataset, transform_for

    name = dataset or model.pretrained_cfg.get("dataset")
    if not name:
        return None, "the model records no dataset (use --check-data)"
    if dataset is None and name not in BUNDLED_DATASETS:
        return None, f"its dataset {name!r} is not bundled (use --check-data {'|'.join(BUNDLED_DATASETS)})"
    ds = load_dataset(name, "test", transform_for(model))
    count = min(n, len(ds))
    images = torch.stack([ds[i][0] for i in range(count)])
    return images, f"{count} {name}/test images"


def _fmt_diffs(diffs: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.2e}" for k, v in diffs.items())


# ----------------------------------------------------------------------------- cache
def cache_root() -> Path:
    """``$ZOO_CACHE`` (default ``~/.cache/selfsup-zoo``), the root of the zoo's caches."""
    from zoo.registry import zoo_cache_dir

    return zoo_cache_dir().parent


def model_fingerprint(model: ZooModel, opset: int = DEFAULT_OPSET) -> str:
    """sha256 over the weights, the config and the export settings (16 hex digits)."""
    import torch

    h = hashlib.sha256()
    h.update(json.dumps(model.config(), sort_keys=True, default=str).encode())
    h.update(f"opset={opset};format={EXPORT_FORMAT};torch={torch.__version__.split('+')[0]}".encode())
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def load_model(spec: str) -> ZooModel:
    """A model argument: registered name (pretrained when it has weights), model folder or hf-hub:."""
    from zoo import resolve_model

    return resolve_model(spec).eval()


def onnx_for_model(
    spec: str | ZooModel, opset: int = DEFAULT_OPSET, check: bool = True, tolerance: float = DEFAULT_TOLERANCE
) -> Path:
    """The exported ``.onnx`` of a model, made once into ``$ZOO_CACHE/onnx/<name>-<fingerprint>.onnx``.

    ``spec`` is a model, a registered name, a model folder, ``hf-hub:ORG/NAME`` or an existing
    ``.onnx`` file (returned as is). A fresh export is parity-checked on random inputs first. The cache
    keeps the newest ``KEEP_EXPORTS`` exports per model name (other weights of the same name, e.g. a
    retrained run or a random-weight model started again), so it does not grow without bound.
    """
    if isinstance(spec, (str, os.PathLike)) and str(spec).endswith(".onnx"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"{spec}: ONNX file not found")
        return Path(spec)
    model = load_model(str(spec)) if isinstance(spec, (str, os.PathLike)) else spec
    name = str(model.pretrained_cfg.get("name") or model.arch).replace("/", "_")
    path = cache_root() / "onnx" / f"{name}-{model_fingerprint(model, opset)}.onnx"
    if path.is_file():
        return path
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.onnx")
    try:
        export_onnx(model, tmp, opset=opset)
        if check:
            report = check_parity(model, tmp)
            # absolute OR relative: deep random-init / large-magnitude features accumulate float32 rounding
            if not (report["max_abs_diff"] <= tolerance or report["max_rel_diff"] <= tolerance):
                raise OnnxParityError(
                    f"{name}: ONNX export differs from PyTorch by {report['max_abs_diff']:.2e} "
                    f"(relative {report['max_rel_diff']:.2e}; tolerance {tolerance:g}): "
                    f"{_fmt_diffs(report['random'])}"
                )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    prune_exports(path.parent, name)
    return path


KEEP_EXPORTS = 3


def prune_exports(directory: Path, name: str, keep: int = KEEP_EXPORTS) -> list[Path]:
    """Delete all but the ``keep`` newest ``<name>-<16 hex>.onnx`` files in ``directory``; returns the deleted.

    A server that already loaded a deleted file keeps serving: onnxruntime holds the model in memory.
    """
    pattern = re.compile(re.escape(name) + r"-[0-9a-f]{16}\.onnx")
    exports = sorted((p for p in directory.iterdir() if pattern.fullmatch(p.name)),
                     key=lambda p: p.stat().st_mtime_ns, reverse=True)
    removed = []
    for old in exports[keep:]:
        old.unlink(missing_ok=True)
        removed.append(old)
    return removed


# ----------------------------------------------------------------------------- CLI
def cli_export(args: argparse.Namespace) -> int:
    """``zoo export MODEL --onnx OUT``: export, then check onnxruntime against PyTorch (exit 1 above tolerance)."""
    model = load_model(args.model)
    out = Path(args.onnx)
    name = model.pretrained_cfg.get("name") or model.arch
    # Export next to the target; it only takes the target's name once the parity check passes.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.checking")
    try:
        export_onnx(model, tmp, opset=args.opset)
        enc = OnnxEncoder(tmp)
        outs = ", ".join(f"{n} [batch,{','.join(map(str, enc.output_shapes[n][1:]))}]" for n in enc.output_names)
        print(f"exported {name}: {INPUT_NAME} [batch,{','.join(map(str, enc.input_shape))}] float32 -> {outs} "
              f"(opset {args.opset})")
        if not args.no_check:
            real, note = real_images_for(model, getattr(args, "check_data", None))
            report = check_parity(model, enc, real_images=real)
            print(f"parity, onnxruntime ({enc.providers[0]}) vs PyTorch, max abs diff:")
            print(f"  random inputs ({report['n_random']}): {_fmt_diffs(report['random'])}")
            if report["real"] is None:
                print(f"  real images: skipped: {note}")
            else:
                print(f"  real images ({note}): {_fmt_diffs(report['real'])}")
            print(f"  (output scale, max |PyTorch|: {_fmt_diffs(report['scale'])})")
            if not report["max_abs_diff"] <= args.tolerance:  # NaN fails too
                print(f"FAILED: max abs diff {report['max_abs_diff']:.2e} exceeds the tolerance "
                      f"{args.tolerance:g} (relative to the output scale: {report['max_rel_diff']:.2e}); "
                      f"{out} not written", file=sys.stderr)
                return 1
            print(f"parity OK (tolerance {args.tolerance:g})")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0
