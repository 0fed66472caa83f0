"""The long-tailed methods under DDP: 2 CPU processes (gloo) against 1 process with the global batch.

TSC's class centres and Hungarian assignment, boosted contrastive learning's memorisation buffers and
CMO's minority draws are global state: two ranks with batch B must end where one process with 2B
does. OUPN's prototype memory must be the same on both ranks, built from both ranks' images.
ResCom's class-balanced queue must hold every rank's keys, in rank order, on every rank. NCD's adaptive
novel prototypes (k-means++ seeds from the global batch, then EMA updates with every rank's rows and the
Sinkhorn assignment over all ranks) must match one process with the global batch.
Tolerances as tests/test_distributed.py: 1e-5 for what is computed in float32 (1e-6 for NCD, run in float64
as there but with float32 Sinkhorn targets), exact for what is copied. The harness (spawning, configs, float64) is tests/ddp_harness.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from train.methods.rescom import ResCom
from train.trainer import Trainer
from zoo.model import ZooModel

from .ddp_harness import (
    GLOBAL_BATCH,
    WORLD,
    ddp_cfg,
    in_float64,
    one_thread,
    record_returns,
    spawn_ranks,
    state,
)

KW = {
    "tsc": {"proj_hidden_dim": 32, "proj_dim": 16, "target_steps": 50},
    "boosted": {"proj_hidden_dim": 32, "proj_dim": 16, "memo_momentum": 0.5},
    "supervised": {"cmo": 1.0},
    "oupn": {"proj_hidden_dim": 32, "proj_dim": 16, "max_prototypes": 20, "novelty_threshold": 0.5},
    "rescom": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_per_class": 4, "hard_positives": 2, "hard_negatives": 8},
    "ncd": {"proj_hidden_dim": 32, "proj_dim": 16, "momentum": 0.5},  # digits: classes 0-4 labelled, 5-9 novel
}
# NCD runs in float64 on both sides, but its Sinkhorn targets are computed in float32 (ncd.py casts the
# scores up for bf16 autocast, and so down from float64): 1e-7 relative per step, hence 1e-6.
NCD_TOL = 1e-6
SAME_AS_ONE_PROCESS = ("tsc", "boosted", "supervised")


def _cfg(method: str, **kw):
    return ddp_cfg(method, KW, **kw)


def _rank_body(rank: int, world: int, out: Path) -> dict:
    res: dict = {}
    for method in SAME_AS_ONE_PROCESS:
        t = Trainer(_cfg(method), Path(out) / f"{method}_ddp", progress=False)
        t.fit()
        res[method] = {"loss": [h["loss"] for h in t.history], "state": state(t)}
    t = Trainer(_cfg("rescom", max_steps=1), Path(out) / "rescom_ddp", progress=False)
    keys, labels = record_returns(t.method, "embed_keys"), record_returns(t.method, "batch_labels")
    t.fit()
    res["rescom"] = {"keys": torch.cat(keys), "labels": labels[0], "queue": t.method.queue.clone(),
                     "filled": t.method.queue_filled.clone(), "ptr": t.method.queue_ptr.clone()}
    t = Trainer(_cfg("oupn", max_steps=3), Path(out) / "oupn_ddp", progress=False)
    seen: list[torch.Tensor] = []
    step = t.method.training_step
    t.method.training_step = lambda x, i, c: seen.append(i.clone()) or step(x, i, c)
    t.fit()
    res["oupn"] = {"state": state(t), "indices": torch.cat(seen)}
    t = in_float64(Trainer(_cfg("ncd"), Path(out) / "ncd_ddp", progress=False))
    t.fit()
    res["ncd"] = {"loss": [h["loss"] for h in t.history], "state": state(t)}
    return res


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_lt")
    return spawn_ranks(_rank_body, out)


@pytest.mark.parametrize("method", SAME_AS_ONE_PROCESS)
def test_two_ranks_with_batch_b_equal_one_process_with_2b(ranks, method, tmp_path):
    with one_thread():
        one = Trainer(_cfg(method), tmp_path, progress=False)
        one.fit()
    ref = state(one)
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


def test_ncd_prototypes_two_ranks_with_batch_b_equal_one_process_with_2b(ranks, tmp_path):
    with one_thread():
        one = in_float64(Trainer(_cfg("ncd"), tmp_path / "one", progress=False))
        one.fit()
        alone = in_float64(Trainer(_cfg("ncd", batch_size=GLOBAL_BATCH // WORLD), tmp_path / "alone", progress=False))
        alone.fit()
    ref, ddp = state(one), ranks[0]["ncd"]
    np.testing.assert_allclose(ddp["loss"], [h["loss"] for h in one.history], rtol=1e-6, atol=1e-7)
    assert len(ddp["loss"]) == 4 and ddp["loss"][-1] != ddp["loss"][0]  # it trained
    for key, value in ref.items():
        if value.dtype == torch.bool:
            assert torch.equal(ddp["state"][key], value), key
        else:
            torch.testing.assert_close(ddp["state"][key], value, rtol=NCD_TOL, atol=NCD_TOL,
                                       msg=lambda m, k=key: f"{k}: {m}")
        assert torch.equal(ranks[1]["ncd"]["state"][key], ddp["state"][key]), key  # the same prototypes everywhere
    protos = ref["novel_prototypes"]
    assert bool(ref["initialised"]) and protos.norm(dim=1).min() > 0.1  # seeded and moved, not the zero buffer
    assert torch.cdist(protos, protos)[~torch.eye(len(protos), dtype=torch.bool)].min() > 1e-3  # 5 distinct ones
    # What the tolerance must catch: a rank on its own rows (one process with batch B) ends elsewhere.
    assert float((alone.method.novel_prototypes - protos).abs().max()) > 1e-3
