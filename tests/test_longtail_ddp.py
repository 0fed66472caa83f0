"""The long-tailed methods under DDP: 2 CPU processes (gloo) against 1 process with the global batch.

TSC's class centres and Hungarian assignment, boosted contrastive learning's memorisation buffers and
CMO's minority draws are global state: two ranks with batch B must end where one process with 2B
does. OUPN's prototype memory must be the same on both ranks, built from both ranks' images.
ResCom's class-balanced queue must hold every rank's keys, in rank order, on every rank.
Tolerances as tests/test_distributed.py: 1e-5 for what is computed, exact for what is copied.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.methods.rescom import ResCom
from train.trainer import Trainer
from zoo.model import ZooModel

from .method_checks import tiny_cfg

WORLD = 2
GLOBAL_BATCH = 32
KW = {
    "tsc": {"proj_hidden_dim": 32, "proj_dim": 16, "target_steps": 50},
    "boosted": {"proj_hidden_dim": 32, "proj_dim": 16, "memo_momentum": 0.5},
    "supervised": {"cmo": 1.0},
    "oupn": {"proj_hidden_dim": 32, "proj_dim": 16, "max_prototypes": 20, "novelty_threshold": 0.5},
    "rescom": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_per_class": 4, "hard_positives": 2, "hard_negatives": 8},
}
SAME_AS_ONE_PROCESS = ("tsc", "boosted", "supervised")


def _cfg(method: str, **kw):
    base = dict(method=method, method_kwargs=KW[method], batch_size=GLOBAL_BATCH, optimizer="sgd", lr=0.5,
                sync_bn=True, max_steps=4, ckpt_every=100, channels_last=False)
    return tiny_cfg(**{**base, **kw})


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.method.state_dict().items()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res: dict = {}
    try:
        for method in SAME_AS_ONE_PROCESS:
            t = Trainer(_cfg(method), Path(out) / f"{method}_ddp", progress=False)
            t.fit()
            res[method] = {"loss": [h["loss"] for h in t.history], "state": _state(t)}
        t = Trainer(_cfg("rescom", max_steps=1), Path(out) / "rescom_ddp", progress=False)
        keys: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        embed_keys, batch_labels = t.method.embed_keys, t.method.batch_labels
        t.method.embed_keys = lambda x: keys.append(embed_keys(x)) or keys[-1]
        t.method.batch_labels = lambda i, c: labels.append(batch_labels(i, c)) or labels[-1]
        t.fit()
        res["rescom"] = {"keys": torch.cat(keys), "labels": labels[0], "queue": t.method.queue.clone(),
                         "filled": t.method.queue_filled.clone(), "ptr": t.method.queue_ptr.clone()}
        t = Trainer(_cfg("oupn", max_steps=3), Path(out) / "oupn_ddp", progress=False)
        seen: list[torch.Tensor] = []
        step = t.method.training_step
        t.method.training_step = lambda x, i, c: seen.append(i.clone()) or step(x, i, c)
        t.fit()
        res["oupn"] = {"state": _state(t), "indices": torch.cat(seen)}
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_lt")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("method", SAME_AS_ONE_PROCESS)
def test_two_ranks_with_batch_b_equal_one_process_with_2b(ranks, method, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = Trainer(_cfg(method), tmp_path, progress=False)
        one.fit()
    finally:
        torch.set_num_threads(before)
    ref = _state(one)
    ddp = ranks[0][method]
    np.testing.assert_allclose(ddp["loss"], [h["loss"] for h in one.history], rtol=1e-5, atol=1e-6)
    for key, value in ref.items():
        if value.dtype in (torch.long, torch.bool):  # assignment, seen flags: exactly
            assert torch.equal(ddp["state"][key], value), key
        else:
            torch.testing.assert_close(ddp["state"][key], value, rtol=1e-5, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        torch.testing.assert_close(ranks[1][method]["state"][key], ddp["state"][key], rtol=0, atol=0)  # in sync
    if method == "tsc":  # the global state is real: centres of several classes, a permutation
        assert (ref["centres"].abs().sum(dim=1) > 0).sum() >= 5
        assert sorted(ref["assignment"].tolist()) == list(range(10))
    if method == "boosted":
        assert int(ref["memo_seen"].sum()) == 4 * GLOBAL_BATCH  # every rank recorded the global batch


def test_rescom_queue_holds_the_keys_of_both_ranks(ranks):
    reference = ResCom(ZooModel("convnet_tiny", {"widths": [8, 16]}), num_classes=10, proj_hidden_dim=32,
                       proj_dim=16, queue_per_class=4)
    # each rank's keys: view 1 then view 2 of its batch; gathered in rank order
    keys = torch.cat([ranks[r]["rescom"]["keys"] for r in range(WORLD)])
    labels = torch.cat([torch.cat([ranks[r]["rescom"]["labels"]] * 2) for r in range(WORLD)])
    reference.enqueue(keys, labels)
    for r in range(WORLD):
        m = ranks[r]["rescom"]
        assert torch.equal(m["queue"], reference.queue) and torch.equal(m["filled"], reference.queue_filled)
        assert torch.equal(m["ptr"], reference.queue_ptr)
    assert int(reference.queue_filled.sum()) > 0
    assert not torch.equal(ranks[0]["rescom"]["labels"], ranks[1]["rescom"]["labels"])


def test_oupn_memory_is_global(ranks):
    a, b = ranks[0]["oupn"], ranks[1]["oupn"]
    for key in ("prototypes", "counts", "active", "online_pred", "stream_order"):
        assert torch.equal(a["state"][key], b["state"][key]), key
    both = torch.cat([a["indices"], b["indices"]])
    assert not set(a["indices"].tolist()) & set(b["indices"].tolist())  # the ranks saw different images
    pred = a["state"]["online_pred"]
    assert (pred[both] >= 0).all() and int((pred >= 0).sum()) == both.numel()  # every rank's arrivals recorded
