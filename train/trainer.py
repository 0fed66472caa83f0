"""The training loop shared by every method.

Deterministic by seed and resumable to the bit on CPU: the epoch's sample order is a pure
function of (seed, epoch), augmentation draws from a generator whose state is checkpointed,
and the learning rate is a pure function of the step. Checkpoints are safetensors (no pickle),
written atomically every ``ckpt_every`` steps, keeping the last ``keep_checkpoints``.

Beyond one process (``train/distributed.py``): under torchrun each rank takes its slice of every
global batch (``batch_size`` is the global batch), draws the same random numbers as one process
would for the global batch, steps through DistributedDataParallel, and only rank 0 writes
checkpoints, logs and the model. ``resume="auto"`` continues from the last checkpoint when torchrun
restarted the workers (``--max-restarts``).

Speed paths: ``channels_last`` (on by default: NHWC is faster with oneDNN on the CPU as well as on
tensor cores), ``amp: bf16``, ``torch_compile``, ``pin_memory``, ``loader_workers``. The GPU ones were
not run on a GPU here: treat them as untested on GPUs (AMP bf16 also runs on the CPU and is
smoke-tested there; loader workers are tested to give the same run).
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from train import distributed
from train.augment import AugmentConfig, ViewAugment, per_sample_shard
from train.methods import StepContext, get_method
from zoo.checkpoint import CheckpointError, load_state, save_model_folder, save_state
from zoo.model import ZooModel


@dataclass
class TrainConfig:
    """A training recipe. YAML recipes in ``train/recipes/`` hold exactly these fields."""

    method: str = "simclr"
    data: str = "mnist5k"
    data_root: str | None = None
    backbone: str = "convnet"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    augment: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 256  # the global batch: under DDP each of W ranks takes batch_size / W
    optimizer: str = "adamw"  # adamw | sgd | lars
    lr: float = 1e-3  # base rate for a global batch of 256, scaled linearly (Goyal et al. 2017)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    seed: int = 0
    device: str = "auto"
    ckpt_every: int = 0  # steps between checkpoints; 0 = once per epoch
    keep_checkpoints: int = 2
    log_every: int = 10
    max_steps: int | None = None  # stop early (tests, smoke runs)
    name: str | None = None  # name written into the exported model's config
    eval_protocols: list[str] = field(default_factory=lambda: ["knn", "linear", "kmeans"])
    expected_metrics: dict[str, float] = field(default_factory=dict)
    recipe: str | None = None
    # Beyond one process / GPU speed paths (see the module docstring).
    sync_bn: bool = False  # under DDP, BatchNorm statistics over the global batch
    amp: str | None = None  # "bf16": autocast the step to bfloat16 (no loss scaling needed)
    # NHWC activations: faster convolutions on tensor cores, and with oneDNN on the CPU (1.3-2x per step for
    # the convnets and ResNets here, docs/benchmarks.md); no effect on what is computed beyond rounding
    channels_last: bool = True
    torch_compile: bool = False  # torch.compile the backbone (nn.Module.compile: state-dict keys unchanged)
    pin_memory: bool = False  # page-locked host batches, copied to the GPU asynchronously
    loader_workers: int = 0  # DataLoader processes decoding images ahead (files on disk; in-memory sets skip it)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown recipe fields {sorted(unknown)}; known: {sorted(known)}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        data.setdefault("recipe", str(path))
        return cls(**data)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) over SGD with momentum; biases and norms skip adaptation and decay."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if p.ndim > 1:  # weights: decay + trust ratio
                    grad = grad.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.norm(p), torch.norm(grad)
                    trust = torch.where((p_norm > 0) & (g_norm > 0), group["eta"] * p_norm / g_norm, 1.0)
                    grad = grad.mul(trust)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``params``: tensors, or groups ``{"params": [...], "lr_mult": m}`` whose
    learning rate is ``m`` x the recipe's (``Method.param_groups``; the schedule scales every group alike)."""
    lr = cfg.lr * cfg.batch_size / 256
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "lr": lr * float(g.get("lr_mult", 1.0))} for g in params]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lars":
        return LARS(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use adamw, sgd or lars")


class RawImages:
    """The training split as raw float images ``[B,3,H,W]`` in [0,1] at the preset's size."""

    def __init__(self, name: str, root: str | None, size: tuple[int, int]):
        from zoo.data import load_dataset, raw_transform

        kwargs = {"root": root} if root else {}
        self.dataset = load_dataset(name, "train", transform=raw_transform((3, *size)), **kwargs)
        self.size = size
        self.in_memory = hasattr(self.dataset, "images")

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        if self.in_memory:  # fast path: slice the uint8 tensor, no PIL round trip
            x = self.dataset.images[indices].float().div_(255)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if tuple(x.shape[-2:]) != self.size:
                x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
            return x.contiguous()
        return torch.stack([self.dataset[int(i)][0] for i in indices])

    def foreground(self, indices: torch.Tensor, images: torch.Tensor, source: str = "auto") -> torch.Tensor:
        """Foreground masks ``[B,1,H,W]`` of the batch ``images`` (dataset ``indices``) for background
        augmentation: the dataset's exact ``.masks`` when it has them and ``source`` is "auto", else the
        saliency estimate of :func:`train.augment.saliency_masks`."""
        from train.augment import saliency_masks

        if source not in ("auto", "saliency"):
            raise ValueError(f"augment bg_masks must be 'auto' or 'saliency', got {source!r}")
        known = getattr(self.dataset, "masks", None)
        if source == "saliency" or known is None or len(known) != len(self.dataset):
            return saliency_masks(images)
        m = known[indices.cpu()].to(images.device, images.dtype)
        if tuple(m.shape[-2:]) != tuple(images.shape[-2:]):
            m = F.interpolate(m, size=images.shape[-2:], mode="nearest")
        return m


def _stack_images(items: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """DataLoader collate: the raw images of ``(image, label)`` items as one ``[B,3,H,W]`` batch."""
    return torch.stack([image for image, _ in items])


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The sample order of an epoch: depends only on (seed, epoch), so a resume sees the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class Trainer:
    """Runs a method over a dataset; writes ``checkpoints/``, ``log.csv`` and the final ``model/`` folder."""

    def __init__(self, cfg: TrainConfig, out_dir: str | os.PathLike, progress: bool = True):
        from zoo.data import DATASET_PRESETS

        self.cfg = cfg
        self.out = Path(out_dir)
        self.device = distributed.setup(cfg.device)  # joins the process group under torchrun
        self.rank, self.world = distributed.get_rank(), distributed.get_world_size()
        self.progress = progress and self.rank == 0
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} (the global batch) is not divisible by the "
                             f"{self.world} processes")
        self.local_batch = cfg.batch_size // self.world
        if cfg.amp not in (None, "bf16"):
            raise ValueError(f"amp must be 'bf16' or unset, got {cfg.amp!r} (float16 would need loss scaling)")
        preset = DATASET_PRESETS[cfg.data]
        self.preset = preset
        _, h, w = preset["input_size"]
        self.seed_everything(cfg.seed)
        self.data = RawImages(cfg.data, cfg.data_root, (h, w))
        aug = {"size": h, "mean": tuple(preset["mean"]), "std": tuple(preset["std"]), **cfg.augment}
        self.augment = ViewAugment(AugmentConfig.from_dict(aug))
        model = ZooModel(cfg.backbone, cfg.backbone_kwargs, pretrained_cfg=self.model_cfg())
        self.targets = self.training_targets()
        method_cls, method_kwargs = get_method(cfg.method), dict(cfg.method_kwargs)
        # Supervised methods with a classifier take num_classes; unless the recipe sets it, it comes from the data.
        if (self.targets is not None and method_kwargs.get("num_classes") is None
                and "num_classes" in inspect.signature(method_cls).parameters):
            classes = len(getattr(self.data.dataset, "classes", []) or [])
            method_kwargs["num_classes"] = max(classes, int(self.targets.max()) + 1)
        self.method = method_cls(model, **method_kwargs).to(self.device)
        self.optimizer = build_optimizer(cfg, self.method.param_groups())
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.steps_per_epoch = len(self.data) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch size {cfg.batch_size} exceeds the {len(self.data)} training images")
        # The schedule spans all epochs; max_steps only stops early (a smoke run, or a simulated kill).
        self.schedule_steps = self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.warmup_steps = int(cfg.warmup_epochs * self.steps_per_epoch)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.resumed_from: Path | None = None  # the checkpoint fit() resumed from, and its step
        self.resumed_step = 0

    # -- setup ---------------------------------------------------------------------------
    @staticmethod
    def seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def training_targets(self) -> torch.Tensor | None:
        """The training split's class labels ``[N]`` (long, CPU), or None when any image is unlabelled (-1)."""
        targets = getattr(self.data.dataset, "targets", None)
        if targets is None or len(targets) != len(self.data) or len(targets) == 0:
            return None
        t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        return t if bool((t >= 0).all()) else None

    def batch_labels(self, indices: torch.Tensor) -> torch.Tensor:
        """Labels ``[B]`` of training-set ``indices`` on the training device (``StepContext.labels``)."""
        return self.targets[indices.cpu()].to(self.device)

    def model_cfg(self) -> dict[str, Any]:
        cfg, preset = self.cfg, self.preset
        name = cfg.name or f"{cfg.method}_{cfg.backbone}_{cfg.data}"
        return {
            "name": name,
            "method": cfg.method,
            "dataset": cfg.data,
            "input_size": list(preset["input_size"]),
            "mean": list(preset["mean"]),
            "std": list(preset["std"]),
            "crop_pct": preset.get("crop_pct", 1.0),
            "interpolation": preset.get("interpolation", "bilinear"),
            "license": "Apache-2.0",
            "recipe": cfg.recipe,
            "training": {k: v for k, v in asdict(cfg).items() if k not in ("expected_metrics",)},
            "description": f"{cfg.method} {cfg.backbone} encoder trained on {cfg.data} by selfsup-zoo.",
            "metrics": {},
        }

    def context(self, epoch: int) -> StepContext:
        return StepContext(
            augment=self.augment,
            generator=self.generator,
            step=self.step,
            total_steps=self.schedule_steps,
            epoch=epoch,
            epochs=self.cfg.epochs,
            device=self.device,
            iterate_dataset=self.iterate_dataset,
            dataset_size=len(self.data),
            fetch=lambda idx: self.data.batch(idx).to(self.device),
            optimizer=self.optimizer,
            seed=self.cfg.seed,
            labels=self.batch_labels if self.targets is not None else None,
            layers=self.batch_layers if callable(getattr(self.data.dataset, "layers", None)) else None,
        )

    def batch_layers(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``StepContext.layers``: exact foreground masks and clean backgrounds of training-set ``indices``."""
        if getattr(self, "_layers", None) is None:  # built once, from the generator (shapes: ~1 s for 3,000)
            masks, backgrounds = self.data.dataset.layers()
            if tuple(masks.shape[-2:]) != self.data.size:
                raise ValueError(f"{self.cfg.data}: masks are {tuple(masks.shape[-2:])}, training size {self.data.size}")
            self._layers = masks, backgrounds
        masks, backgrounds = self._layers
        idx = indices.cpu()
        return masks[idx].to(self.device), backgrounds[idx].float().div_(255).to(self.device)

    def iterate_dataset(self, batch_size: int = 512, shard: bool = False):
        """The whole training set in index order, as (raw images, indices), for per-epoch clustering.

        ``shard=True``: only this rank's contiguous share (everything on one process); the caller
        gathers the results (``train.distributed.gather_dataset``).
        """
        lo, hi = distributed.shard_range(len(self.data)) if shard else (0, len(self.data))
        for start in range(lo, hi, batch_size):
            idx = torch.arange(start, min(hi, start + batch_size))
            yield self.data.batch(idx).to(self.device), idx

    def epoch_batches(self, order: torch.Tensor, first: int, last: int):
        """``(indices, images)`` of batches ``first..last-1`` of an epoch's ``order``: this rank's slice of
        each global batch (the DistributedSampler equivalent). With ``loader_workers`` and images that are
        not held in memory, DataLoader workers decode the next batches while the current one trains."""
        slices = []
        for b in range(first, last):
            start = b * self.cfg.batch_size + self.rank * self.local_batch
            slices.append(order[start : start + self.local_batch])
        if self.cfg.loader_workers <= 0 or self.data.in_memory:
            for idx in slices:
                yield idx, self.load_batch(idx)
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(self.data.dataset, batch_sampler=[idx.tolist() for idx in slices],
                            num_workers=self.cfg.loader_workers, collate_fn=_stack_images,
                            pin_memory=self.cfg.pin_memory and self.device.type == "cuda")
        for idx, x in zip(slices, loader):
            x = x.to(self.device, non_blocking=True)
            yield idx, (x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x)

    def load_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Raw images ``[B,3,H,W]`` of ``indices`` on the training device (pinned / channels-last when asked)."""
        x = self.data.batch(indices)
        if self.cfg.pin_memory and self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    # -- checkpoints -----------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng": {
                "torch": torch.get_rng_state(),
                "generator": self.generator.get_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        }

    def save_checkpoint(self) -> Path:
        path = self.ckpt_dir / f"step_{self.step:08d}.safetensors"
        save_state(path, self.checkpoint_state(), {"config": json.dumps(asdict(self.cfg))})
        for old in sorted(self.ckpt_dir.glob("step_*.safetensors"))[: -self.cfg.keep_checkpoints]:
            old.unlink()
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        state = load_state(path)
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        np.random.set_state(tuple(rng["numpy"]))
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))

    def resume(self) -> Path | None:
        """Load the newest readable checkpoint; a corrupt newest one falls back to the one before.

        Under DDP rank 0 picks the checkpoint and every rank loads that file (the run folder must be
        on a filesystem all nodes see).
        """
        found: Path | None = None
        if self.rank == 0:
            for path in sorted(self.ckpt_dir.glob("step_*.safetensors"), reverse=True):
                try:
                    self.load_checkpoint(path)
                    found = path
                    break
                except (CheckpointError, KeyError, ValueError, RuntimeError) as exc:
                    warnings.warn(f"skipping unreadable checkpoint {path}: {exc}", stacklevel=2)
        chosen = distributed.broadcast_object(str(found) if found is not None else None)
        if self.rank != 0 and chosen is not None:
            self.load_checkpoint(chosen)
        return Path(chosen) if chosen is not None else None

    # -- the loop --------------------------------------------------------------------------
    def set_lr(self) -> float:
        """Warm-up + cosine, restarted at the method's ``schedule_restarts`` epochs (a pure function of the step)."""
        starts = sorted({0, *self.method.schedule_restarts(self.cfg.epochs)}) + [self.cfg.epochs]
        epoch = self.step // self.steps_per_epoch
        seg = max(i for i in range(len(starts) - 1) if starts[i] <= epoch)
        first, end = starts[seg] * self.steps_per_epoch, starts[seg + 1] * self.steps_per_epoch
        warmup = self.warmup_steps if seg == 0 else 0
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr_at(self.step - first, end - first, warmup, base)
        return self.optimizer.param_groups[0]["lr"]  # the recipe's own rate (group 0 has no multiplier)

    def prepare_step(self):
        """The callable that runs one training step: the method itself, or its DDP wrapper under torchrun
        (after SyncBatchNorm conversion when ``sync_bn``); applies channels_last / torch.compile."""
        cfg = self.cfg
        if cfg.channels_last:
            self.method.to(memory_format=torch.channels_last)
        if cfg.torch_compile:
            self.method.model.backbone.compile()  # in place: parameter names (checkpoints) unchanged
        if self.world == 1:
            return self.method.training_step
        if cfg.sync_bn:
            self.method = distributed.convert_sync_batchnorm(self.method, self.device)
        return distributed.wrap_ddp(self.method, self.device)

    def reduce_outputs(self, out: dict[str, Any]) -> dict[str, float]:
        """The step's scalar outputs as floats, averaged over ranks (every rank gets the same values)."""
        keys = list(out)
        values = torch.stack([v.detach().float().reshape(()) if torch.is_tensor(v)
                              else torch.tensor(float(v)) for v in out.values()])
        values = distributed.all_reduce_mean(values.cpu())
        return dict(zip(keys, values.tolist()))

    def fit(self, resume: bool | str = False) -> ZooModel:
        """Train to ``total_steps``. ``resume``: True / "yes" continue from the newest good checkpoint,
        "auto" only when torchrun restarted the workers, False / "no" start afresh."""
        main = self.rank == 0
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        if distributed.resume_requested(resume):
            self.resumed_from = self.resume()
            self.resumed_step = self.step
            if self.resumed_from is not None and self.progress:
                print(f"resumed from {self.resumed_from} at step {self.step}")
        if main:
            (self.out / "config.yaml").write_text(yaml.safe_dump(asdict(self.cfg), sort_keys=False))
        ckpt_every = self.cfg.ckpt_every or self.steps_per_epoch
        log = LogWriter(self.out / "log.csv", append=self.step > 0) if main else None
        self.method.train()
        step_fn = self.prepare_step()
        self.method.on_train_start(self.context(self.step // self.steps_per_epoch))
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc=self.cfg.method)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.amp == "bf16"
                    else nullcontext())
        start_time = time.time()
        try:
            while self.step < self.total_steps:
                epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
                if in_epoch == 0:
                    self.method.on_epoch_start(self.context(epoch))
                order = self.method.sample_order(epoch, self.cfg.seed, len(self.data))
                if order is None:
                    order = epoch_order(self.cfg.seed, epoch, len(self.data))
                last = min(self.steps_per_epoch, in_epoch + self.total_steps - self.step)
                for idx, images in self.epoch_batches(order, in_epoch, last):
                    lr = self.set_lr()
                    ctx = self.context(epoch)
                    if self.augment.uses_background:  # every view-based method: views of this batch see masks
                        ctx.augment = self.augment.bind(images, self.data.foreground(idx, images, self.augment.cfg.bg_masks))
                    with per_sample_shard(self.rank, self.world), autocast:
                        out = step_fn(images, idx, ctx)
                    loss = out["loss"]
                    values = self.reduce_outputs(out)
                    if not math.isfinite(values["loss"]):
                        raise FloatingPointError(f"loss is {values['loss']} at step {self.step}; lower the lr")
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.method.on_before_optimizer_step(ctx)
                    self.optimizer.step()
                    self.method.on_after_optimizer_step(ctx)
                    self.step += 1
                    row = {"step": self.step, "epoch": epoch, "lr": lr, "time": time.time() - start_time}
                    row.update(values)
                    self.history.append(row)
                    if log is not None and (self.step % self.cfg.log_every == 0 or self.step == self.total_steps):
                        log.write(row)
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", epoch=epoch)
                    if main and (self.step % ckpt_every == 0 or self.step == self.total_steps):
                        self.save_checkpoint()
        finally:
            bar.close()
            if log is not None:
                log.close()
            if self.world > 1 and self.cfg.sync_bn:  # plain BatchNorm again for export and evaluation
                self.method = distributed.revert_sync_batchnorm(self.method)
            if self.cfg.channels_last:  # the exported model is the one a model folder loads into: NCHW
                self.method.to(memory_format=torch.contiguous_format)
        return self.method.export()

    def export(self, evaluate: bool = True) -> Path:
        """Save the trained encoder as a model folder ``out/model`` (with metrics when ``evaluate``).
        Under DDP only rank 0 writes (and evaluates); the others return the folder's path."""
        if self.rank != 0:
            return self.out / "model"
        model = self.method.export().eval()
        if evaluate and self.cfg.eval_protocols:
            from zoo.eval import evaluate as run_eval

            metrics = run_eval(model, self.cfg.data, protocols=tuple(self.cfg.eval_protocols), progress=self.progress,
                               **({"root": self.cfg.data_root} if self.cfg.data_root else {}))
            model.pretrained_cfg["metrics"] = metrics
        return save_model_folder(model, self.out / "model")


class LogWriter:
    """CSV log (always) and TensorBoard scalars (when tensorboard is installed).

    Columns grow when a later row brings new keys (SCAN's self-labelling stage logs more than its
    clustering stage): the file is then rewritten with the wider header.
    """

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        self.rows: list[dict[str, float]] = []
        self.fieldnames: list[str] = []
        if append and path.exists():
            with open(path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.fieldnames = list(reader.fieldnames or [])
                self.rows = [dict(r) for r in reader]
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tb"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        new = [k for k in row if k not in self.fieldnames]
        if new or not self.path.exists():
            self.fieldnames += new
            with open(self.path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=self.fieldnames)
                writer.writeheader()
                writer.writerows(self.rows)
        else:
            with open(self.path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.fieldnames).writerow(row)
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self.tb.add_scalar(key, value, int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
