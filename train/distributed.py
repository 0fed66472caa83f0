"""Training and embedding beyond one process, on PyTorch's own stack (torchrun, DDP, torch.distributed).

Launch: ``zoo train ... --nproc N`` (one machine) runs ``python -m torch.distributed.run --standalone
--nproc_per_node N -m train ...``; on several machines run torchrun yourself (docs/scaling.md):
``torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 -m train ...``.
Each worker finds RANK / WORLD_SIZE / LOCAL_RANK in its environment and :func:`setup` joins the
process group: NCCL when the worker trains on a GPU, gloo on the CPU.

Semantics (``train/trainer.py``):

- ``batch_size`` in a recipe is the *global* batch; each of the ``W`` ranks takes ``batch_size / W``
  rows of each global batch of the epoch's order, which is a pure function of ``(seed, epoch)``: the
  DistributedSampler equivalent. The learning rate scales with the global batch, as on one process.
- Randomness is rank-consistent: every rank holds the same generator and per-sample draws are made
  for the global batch (``train.augment.per_sample_shard``); with ``sync_bn`` (PyTorch's SyncBatchNorm
  on GPUs, :class:`GlobalBatchNorm` on the CPU) ``W`` ranks with batch ``B`` compute what one process
  with batch ``W*B`` computes, up to floating-point summation order.
- Methods gather what their loss needs (:func:`all_gather_with_grad`): SimCLR/DCL/SupCon negatives,
  NNCLR predictions; queues and support sets take every rank's rows (MoCo, MoCHi, PCL, PaCo, NNCLR); Sinkhorn sums are all-reduced (``train.sinkhorn``); dataset-wide steps
  (k-means, SeLa labels, SCAN neighbours) embed one shard per rank and gather (:func:`gather_dataset`).
- Only rank 0 writes checkpoints, logs and the model folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "GlobalBatchNorm",
    "StepModule",
    "all_gather_rows",
    "all_gather_with_grad",
    "all_reduce_mean",
    "all_reduce_sum",
    "all_reduce_with_grad",
    "argv_from_namespace",
    "barrier",
    "broadcast_object",
    "broadcast_tensor",
    "cleanup",
    "convert_sync_batchnorm",
    "gather_dataset",
    "gather_rows_to",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "is_main_process",
    "launch",
    "resume_requested",
    "revert_sync_batchnorm",
    "setup",
    "shard_range",
    "torchrun_command",
    "wrap_ddp",
]


# ----------------------------------------------------------------------------- process group
def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


_OWNS_GROUP = False


def setup(device: str = "auto") -> torch.device:
    """Join the process group torchrun describes in the environment (when ``WORLD_SIZE > 1``) and
    return this rank's device: ``cuda:LOCAL_RANK`` with NCCL when CUDA is there and ``device`` allows
    it, else the CPU with gloo. An already initialised group (tests spawn their own) is used as is."""
    global _OWNS_GROUP
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    want_cuda = not device.startswith("cpu") and torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        if want_cuda:
            torch.cuda.set_device(_local_rank() % torch.cuda.device_count())
        dist.init_process_group("nccl" if want_cuda else "gloo")
        _OWNS_GROUP = True
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            torch.cuda.set_device(_local_rank() % torch.cuda.device_count())
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu" if device == "auto" else device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cleanup() -> None:
    """Leave the process group if :func:`setup` created it."""
    global _OWNS_GROUP
    if _OWNS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_GROUP = False


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device(t: torch.Tensor) -> torch.device:
    """NCCL moves CUDA tensors only: CPU tensors travel through the current CUDA device."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


# ----------------------------------------------------------------------------- collectives
def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """``[n,...]`` of every rank concatenated in rank order ``[W*n,...]``; gradients flow back to each
    rank's rows (``torch.distributed.nn.functional.all_gather``: reduce-scatter on NCCL, all-to-all on
    gloo). Every rank must pass the same shape. ``t`` itself on one process."""
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of private functional collectives
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(t), dim=0)


def all_reduce_with_grad(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks; the gradient is summed back the same way
    (``torch.distributed.nn.functional.all_reduce``). ``t`` itself on one process."""
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(t)


def _padded_rows(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``t`` on the communication device, zero-padded to the largest row count of any rank, and every
    rank's row count (collectives need equal shapes)."""
    dev = _comm_device(t)
    x = t.to(dev)
    counts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(get_world_size())]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.long, device=dev))
    sizes = [int(c) for c in counts]
    if x.shape[0] < max(sizes):
        x = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))])
    return x.contiguous(), sizes


@torch.no_grad()
def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows of every rank concatenated in rank order (no gradient); ranks may hold different counts."""
    if not is_distributed():
        return t
    x, sizes = _padded_rows(t)
    out = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(out, x)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).to(t.device)


@torch.no_grad()
def gather_rows_to(t: torch.Tensor, dst: int = 0) -> torch.Tensor:
    """Rows of every rank concatenated in rank order on rank ``dst`` only (``t[:0]`` elsewhere), for data
    one rank processes alone; ranks may hold different counts. ``t`` itself on one process."""
    if not is_distributed():
        return t
    x, sizes = _padded_rows(t)
    if get_rank() != dst:
        dist.gather(x, None, dst=dst)
        return t[:0]
    out = [torch.empty_like(x) for _ in sizes]
    dist.gather(x, out, dst=dst)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).to(t.device)


@torch.no_grad()
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (a new tensor, the same on every rank); ``t`` on one process."""
    if not is_distributed():
        return t
    dev = _comm_device(t)
    out = t.detach().to(dev, copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


@torch.no_grad()
def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over ranks (a new tensor); ``t`` on one process."""
    if not is_distributed():
        return t
    return all_reduce_sum(t) / get_world_size()


@torch.no_grad()
def broadcast_tensor(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``t`` from rank ``src`` on every rank, in place; identity on one process."""
    if not is_distributed():
        return t
    dev = _comm_device(t)
    buf = t if dev == t.device else t.to(dev)
    dist.broadcast(buf, src)
    if buf is not t:
        t.copy_(buf.to(t.device))
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """A picklable object from rank ``src`` (in-memory, between our own ranks; nothing read from disk)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def shard_range(n: int, rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """The contiguous ``[lo, hi)`` of ``n`` items that ``rank`` of ``world`` handles (sizes differ by <= 1)."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    return rank * n // world, (rank + 1) * n // world


@torch.no_grad()
def gather_dataset(rows: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """Per-dataset-item rows computed on shards -> ``[n,...]`` in dataset order on every rank.

    ``rows[i]`` belongs to dataset index ``indices[i]``; every index must be covered by some rank.
    On one process: ``rows`` placed at ``indices``.
    """
    rows_all, idx_all = all_gather_rows(rows), all_gather_rows(indices.to(rows.device).long())
    if idx_all.numel() != n or torch.unique(idx_all).numel() != n:
        raise RuntimeError(f"gather_dataset: the ranks' shards cover {torch.unique(idx_all).numel()} of {n} items")
    out = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    out[idx_all.to(out.device)] = rows_all
    return out


# ----------------------------------------------------------------------------- BatchNorm over all ranks
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch of all ranks, on any backend.

    PyTorch's ``nn.SyncBatchNorm`` (used on GPUs) refuses CPU tensors; this is its CPU/gloo
    counterpart: per-channel mean and variance come from two differentiable all-reduces
    (``torch.distributed.nn.functional.all_reduce``: the sum, then the sum of squared deviations), so
    forward and backward equal one process's BatchNorm over the concatenated batch. Running
    statistics are updated as ``F.batch_norm`` does (unbiased variance). Outside a multi-rank group,
    or in eval mode, it is a plain BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        dist.all_reduce(count)
        mean = all_reduce_with_grad(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = all_reduce_with_grad(centred.pow(2).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                unbiased = var.detach() * count / (count - 1).clamp_min(1)
                self.running_var.mul_(1 - f).add_(unbiased, alpha=f)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def _swap_bn(module: nn.Module, make) -> nn.Module:
    """Replace BatchNorm layers by ``make(layer)``; the new layer takes over the very same parameter and
    buffer tensors, so optimizers, checkpoints and state-dict keys are unaffected."""
    out = make(module)
    if out is not module:
        out._parameters.update(module._parameters)  # noqa: SLF001 - share, do not copy
        out._buffers.update(module._buffers)  # noqa: SLF001
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _swap_bn(child, make))
    return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` normalises over all ranks: ``nn.SyncBatchNorm`` on CUDA,
    :class:`GlobalBatchNorm` elsewhere. Each converted layer remembers its class for
    :func:`revert_sync_batchnorm`. Returns the (possibly new) module."""

    def make(m: nn.Module) -> nn.Module:
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, (nn.SyncBatchNorm, GlobalBatchNorm)):
            return m
        cls = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
        new = cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        new._zoo_bn_class = type(m)  # type: ignore[attr-defined]
        return new

    return _swap_bn(module, make)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm` (same weights and statistics, the original classes)."""

    def make(m: nn.Module) -> nn.Module:
        cls = getattr(m, "_zoo_bn_class", None)
        if cls is None:
            return m
        return cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)

    return _swap_bn(module, make)


# ----------------------------------------------------------------------------- DDP
class StepModule(nn.Module):
    """Makes a method's ``training_step`` the ``forward`` that DDP wraps (DDP hooks ``forward``)."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor, indices: torch.Tensor, ctx: Any) -> dict[str, torch.Tensor]:
        return self.method.training_step(images, indices, ctx)


def wrap_ddp(method: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``StepModule(method)``.

    ``find_unused_parameters`` (an extra graph traversal per step) only for methods that declare
    ``ddp_find_unused_parameters = True`` because they leave parameters out of some steps (SCAN: frozen
    backbone epochs, one head while self-labelling); every other method uses all its trainable
    parameters in every step. ``broadcast_buffers=False``: queues and pseudo-labels are kept identical by the methods
    themselves, and re-sending a 65k-key queue every step would dominate the traffic; BatchNorm
    statistics are identical under ``sync_bn`` and otherwise rank 0's are the ones saved.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # Newer PyTorch renames the per-forward buffer sync (and deprecates the old name); both still sync at init.
    params = inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    find_unused = bool(getattr(method, "ddp_find_unused_parameters", False))
    return DistributedDataParallel(StepModule(method), device_ids=None, find_unused_parameters=find_unused,
                                   **no_sync)


# ----------------------------------------------------------------------------- launching and resuming
def torchrun_command(nproc: int, module_argv: Sequence[str], max_restarts: int = 0) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N [--max-restarts R] -m train ARGS``."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if max_restarts < 0:
        raise ValueError(f"--max-restarts must be >= 0, got {max_restarts}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "train", *module_argv]


def launch(nproc: int, module_argv: Sequence[str], max_restarts: int = 0) -> int:
    """Run ``python -m train MODULE_ARGV`` on ``nproc`` local processes under torchrun; its exit code."""
    return subprocess.call(torchrun_command(nproc, module_argv, max_restarts))


def resume_requested(mode: str | bool | None) -> bool:
    """``--resume``: ``yes``/True always, ``no``/False never, ``auto`` (the default) when torchrun
    restarted the workers (``TORCHELASTIC_RESTART_COUNT > 0``), so ``--max-restarts`` runs continue
    from their last checkpoint."""
    if isinstance(mode, bool):
        return mode
    mode = (mode or "auto").lower()
    if mode in ("yes", "true", "always"):
        return True
    if mode in ("no", "false", "never"):
        return False
    if mode == "auto":
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    raise ValueError(f"--resume takes yes, no or auto, got {mode!r}")


def argv_from_namespace(args: argparse.Namespace, parser: argparse.ArgumentParser,
                        drop: Sequence[str] = ("nproc", "max_restarts")) -> list[str]:
    """Re-create the command line of ``parser`` from parsed ``args`` (without ``drop``), for the workers."""
    import json

    positional: list[str] = []
    optional: list[str] = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public API for this
        if action.dest in drop or action.dest == "help" or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if not action.option_strings:
            positional.append(str(value))
            continue
        if value is None or value == action.default:
            continue
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):  # --x / --no-x
            optional.append(next(o for o in action.option_strings if o.startswith("--no-") != bool(value)))
        elif isinstance(action, argparse._StoreTrueAction):  # noqa: SLF001
            optional.append(flag)
        elif isinstance(action, argparse._StoreFalseAction):  # noqa: SLF001
            optional.append(flag)
        elif isinstance(value, (dict, list)):
            optional += [flag, json.dumps(value)]
        else:
            optional += [flag, str(value)]
    return positional + optional
