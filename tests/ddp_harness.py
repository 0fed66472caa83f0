"""The DDP test harness shared by tests/test_distributed.py and tests/test_longtail_ddp.py.

Two CPU processes (gloo) run a module-level *body* once per test module (imports cost ~10 s per
process on a 2-core machine); each rank saves what its body returns, and the tests compare the ranks'
results with single-process runs. The semantics checked everywhere: 2 ranks with batch B end where
1 process with the global batch 2B ends.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.trainer import TrainConfig, Trainer

from .method_checks import tiny_cfg

WORLD = 2
GLOBAL_BATCH = 32  # 16 per rank


def ddp_cfg(method: str, kwargs: Mapping[str, Mapping[str, Any]], **kw: Any) -> TrainConfig:
    """The tiny recipe of the DDP tests: ``method`` with ``kwargs[method]``, global batch 32, 4 SGD steps.

    NCHW: oneDNN's NHWC convolutions pick their kernels by batch size, so batch 16 and batch 32 round
    differently (3e-5 relative after 4 SwAV steps, whose Sinkhorn amplifies it); these tests are about
    the distributed semantics, which the memory format does not touch.
    """
    base = dict(method=method, method_kwargs=dict(kwargs[method]), batch_size=GLOBAL_BATCH, optimizer="sgd", lr=0.5,
                sync_bn=True, max_steps=4, ckpt_every=100, channels_last=False)
    return tiny_cfg(**{**base, **kw})


def state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """A detached copy of the method's state dict (weights and buffers)."""
    return {k: v.detach().clone() for k, v in trainer.method.state_dict().items()}


def in_float64(trainer: Trainer) -> Trainer:
    """The trainer's method (weights, buffers, so the optimizer's tensors too) and its batches in float64.

    2 ranks x batch B and 1 process x 2B sum the same terms in a different order (per-rank partial sums,
    then the all-reduce), so in float32 they part by a few ulps per reduction, and 4 SGD steps at lr 0.5
    amplify that to ~1e-5 (NNCLR's queue: 1.39e-5 on torch 2.15). In float64 the same amplification
    leaves ~1e-13, so comparisons can be 1e-9 tight: any real difference in the distributed semantics
    (a missing gather, a per-rank queue, local BatchNorm statistics) is orders above it.
    """
    trainer.method.double()  # in place: the optimizer built in __init__ keeps the same Parameter objects
    batch = trainer.data.batch
    trainer.data.batch = lambda indices: batch(indices).double()
    return trainer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, body: Callable[[int, int, Path], dict], world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(body(rank, world, Path(out)), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_ranks(body: Callable[[int, int, Path], dict], out: Path, world: int = WORLD) -> list[dict]:
    """Run ``body(rank, world, out)`` (a module-level function: it is pickled by name) on ``world`` gloo
    ranks and return what each rank's call returned (tensors, lists, dicts), rank order."""
    mp.spawn(_rank_main, args=(body, world, free_port(), str(out)), nprocs=world)
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in range(world)]


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread, as every rank has: the single-process reference sums in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def record_returns(obj: Any, name: str) -> list:
    """Wrap ``obj.name`` so every value it returns is also appended to the returned list (a spy)."""
    fn, seen = getattr(obj, name), []
    setattr(obj, name, lambda *args: seen.append(fn(*args)) or seen[-1])
    return seen
