"""Training and embedding beyond one process: 2 CPU processes (gloo) against 1 process.

One module fixture spawns 2 ranks once (imports cost ~10 s per process on a 2-core machine) and runs
every distributed case there; the tests compare what the ranks saved with single-process runs made
here. Tolerances: weights and losses within 1e-5 (float32 summation order differs between one
process and two: all-reduced BatchNorm statistics, averaged gradients); everything that is copied
rather than computed (queues, labels, neighbours, embeddings' order) exactly.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from train import clustering, distributed
from train.augment import per_sample_shard, rand_per_sample
from train.clustering import embed_dataset
from train.embed import embed
from train.methods import scan as scan_module
from train.methods.scan import mine_neighbors
from train.sinkhorn import sinkhorn_knopp
from train.trainer import Trainer
from zoo.checkpoint import load_state, save_model_folder
from zoo.model import ZooModel

from .ddp_harness import GLOBAL_BATCH, WORLD, ddp_cfg, in_float64, record_returns, spawn_ranks
from .ddp_harness import one_thread as _one_thread
from .ddp_harness import state as _state
from .method_checks import tiny_cfg

SAME_AS_ONE_PROCESS = ("simclr", "swav", "nnclr", "mochi", "carl", "uic", "ifnd_simclr",
                       "ifnd_moco", "interclr", "ncc")  # 2 ranks x batch B == 1 process x 2B
TIGHT = 1e-9  # both sides run in float64 (in_float64)
# DeepCluster's E-step on shards: PCA-whitened (moments all-reduced), and k-means trained on a sample of
# 20 rows per cluster (200 of the 1,442 digits) before every rank assigns its own rows.
DC_VARIANTS = {"dc_pca": {"pca_dim": 8}, "dc_sampled": {"kmeans_sample_per_cluster": 20}}
KW = {
    "simclr": {"proj_hidden_dim": 32, "proj_dim": 16},
    "swav": {"proj_hidden_dim": 32, "proj_dim": 16, "num_prototypes": 10, "n_small_crops": 2, "queue_length": 64},
    "moco": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_length": 96},
    "nnclr": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32, "queue_length": 48},
    "mochi": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_length": 96, "num_hardest": 8, "num_synthetic": 4,
              "num_query_mix": 2},
    "paco": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_length": 96},
    "pcl": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_size": 64, "num_clusters": [5, 10],
            "kmeans_sample_per_cluster": 40},
    "deepcluster": {"num_clusters": 10},
    "carl": {"num_clusters": 6, "proj_dim": 16, "temperature": 0.5},  # uniform usage over the global batch
    "uic": {"num_clusters": 6},  # labels gathered from every rank's shard, one balanced order
    # pseudo-labels from k-means over both ranks' shards; the label queue takes every rank's keys
    "ifnd_simclr": {"proj_hidden_dim": 32, "proj_dim": 16, "num_clusters": 5, "kmeans_niter": 5},
    "ifnd_moco": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_length": 96, "num_clusters": 5, "kmeans_niter": 5},
    # memory bank, labels and centroids: global, updated with every rank's keys; per-query draws span both ranks
    "interclr": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_length": 96, "num_clusters": 10, "min_cluster": 5,
                 "num_negatives": 16, "pool_size": 100, "kmeans_niter": 5},
    # NCC: k-means pseudo-labels over both ranks' shards; prototypes are means over the global batch; noise per sample
    "ncc": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32, "tau_base": 0.99, "num_clusters": 5,
            "kmeans_niter": 5, "latent_std": 0.05, "cluster_weight": 0.5},
    "sela": {"num_clusters": 10, "num_heads": 2},
    "scan": {"num_clusters": 10, "num_heads": 1, "num_neighbors": 5},
}


MINING_X = torch.randn(50, 8, generator=torch.Generator().manual_seed(5))


def _cfg(method: str, **kw):
    return ddp_cfg(method, KW, **kw)


def _tiny_model_folder(path: Path) -> Path:
    torch.manual_seed(0)
    model = ZooModel("convnet_tiny", {"widths": [8, 16]}, pretrained_cfg={
        "name": "tiny_digits", "input_size": [3, 8, 8], "mean": [0.3] * 3, "std": [0.4] * 3,
        "crop_pct": 1.0, "interpolation": "bilinear"})
    return save_model_folder(model, path)


def _image_folder(path: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (path / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(path / c / f"{i}.png")
    (path / "dogs" / "2.png").write_bytes(b"not an image")  # unreadable: skipped by its rank
    return path


def _rank_body(rank: int, world: int, out: Path) -> dict:
    res: dict = {}
    for method in SAME_AS_ONE_PROCESS:
        t = in_float64(Trainer(_cfg(method), Path(out) / f"{method}_ddp", progress=False))
        t.fit()
        res[method] = {"loss": [h["loss"] for h in t.history], "state": _state(t)}
    # MoCo: after one step the queue holds the keys of both ranks.
    t = Trainer(_cfg("moco", max_steps=1, sync_bn=False), Path(out) / "moco_ddp", progress=False)  # shuffle BN
    keys = record_returns(t.method, "encode_keys")
    initial_queue = t.method.queue.clone()
    t.fit()
    res["moco"] = {"keys": keys[0], "queue": t.method.queue.clone(), "ptr": t.method.queue_ptr.clone(),
                   "initial_queue": initial_queue}
    # PaCo: its in-batch contrast is per rank (as the released code), its queue takes every rank's keys.
    t = Trainer(_cfg("paco", max_steps=1), Path(out) / "paco_ddp", progress=False)
    paco_keys, paco_labels = record_returns(t.method, "embed_keys"), record_returns(t.method, "batch_labels")
    t.fit()
    res["paco"] = {"keys": paco_keys[0], "batch_labels": paco_labels[0], "queue": t.method.queue.clone(),
                   "labels": t.method.queue_labels.clone(), "filled": t.method.queue_filled.clone()}
    # Sinkhorn over the rows of both ranks; rank-consistent per-sample draws.
    scores = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    res["sinkhorn"] = sinkhorn_knopp(scores[rank * 10 : (rank + 1) * 10], 0.05, 3)
    res["gather_to_0"] = distributed.gather_rows_to(torch.full((rank + 1, 2), float(rank)))
    with per_sample_shard(rank, world):
        res["draws"] = rand_per_sample(6, torch.Generator().manual_seed(1))
    # Dataset-wide steps: sharded embedding + gather, Sinkhorn labels, neighbours.
    t = Trainer(_cfg("deepcluster"), Path(out) / "dc", progress=False)
    res["dataset_features"] = embed_dataset(t.method.model, t.context(0))
    t = Trainer(_cfg("sela"), Path(out) / "sela", progress=False)
    t.method.update_labels(t.context(0))
    res["sela_labels"] = t.method.labels.clone()
    # DeepCluster / PCL E-steps on features kept in shards; record what k-means gathers.
    gathered: list[list[int]] = []
    real_gather = clustering.gather_rows_to
    clustering.gather_rows_to = lambda x: gathered.append(list(x.shape)) or real_gather(x)
    try:
        for key, kw in DC_VARIANTS.items():
            t = Trainer(_cfg("deepcluster", method_kwargs={**KW["deepcluster"], **kw}), Path(out) / key,
                        progress=False)
            res[key] = t.method.cluster(t.context(0))
        res["dc_gathered"] = [shape for shape in gathered if len(shape) == 2]  # features, not indices
        t = Trainer(_cfg("pcl"), Path(out) / "pcl", progress=False)
        t.method.on_epoch_start(t.context(0))
        res["pcl"] = {k: v.clone() for k, v in t.method.state_dict().items() if k.startswith(
            ("assignments", "prototypes", "phi"))}
    finally:
        clustering.gather_rows_to = real_gather
    t = Trainer(_cfg("scan"), Path(out) / "scan", progress=False)
    scan_gathers: list[tuple] = []
    real_scan_gather = scan_module.gather_dataset
    scan_module.gather_dataset = lambda r, i, n: scan_gathers.append((r.dtype, *r.shape)) or real_scan_gather(r, i, n)
    try:
        t.method.on_train_start(t.context(0))
    finally:
        scan_module.gather_dataset = real_scan_gather
    res["scan_neighbors"] = t.method.neighbors.clone()
    res["scan_gathers"] = scan_gathers
    lo, hi = distributed.shard_range(50)
    res["mined"] = scan_module.mine_neighbors_sharded(MINING_X[lo:hi], 50, 4)
    # Sharded embedding of a dataset and of a folder.
    embed(Path(out) / "model", Path(out) / "emb_data", data="digits", split="test", batch_size=100,
          progress=False)
    embed(Path(out) / "model", Path(out) / "emb_images", images=Path(out) / "images", batch_size=3,
          progress=False)
    embed(Path(out) / "model", Path(out) / "emb_shards", data="digits", split="test", merge=False,
          progress=False)
    return res


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ddp")
    _tiny_model_folder(out / "model")
    _image_folder(out / "images")
    return out, spawn_ranks(_rank_body, out)


@pytest.fixture
def one_thread():
    with _one_thread():
        yield


@pytest.mark.parametrize("method", SAME_AS_ONE_PROCESS)
def test_two_ranks_with_batch_b_equal_one_process_with_2b(ranks, method, tmp_path, one_thread):
    _, res = ranks
    one = in_float64(Trainer(_cfg(method), tmp_path, progress=False))
    one.fit()
    ref = _state(one)
    ddp = res[0][method]
    # the logged losses are float32 (reduce_outputs), so 1e-6 relative; the float64 state 1e-9 (in_float64)
    np.testing.assert_allclose(ddp["loss"], [h["loss"] for h in one.history], rtol=1e-6, atol=1e-7)
    assert len(ddp["loss"]) == 4 and ddp["loss"][-1] != ddp["loss"][0]  # it trained
    for key, value in ref.items():
        if method == "swav" and key.startswith("queue"):  # each rank keeps its half of the queue (below)
            continue
        torch.testing.assert_close(ddp["state"][key], value, rtol=TIGHT, atol=TIGHT, msg=lambda m, k=key: f"{k}: {m}")
        torch.testing.assert_close(res[1][method]["state"][key], ddp["state"][key], rtol=0, atol=0)  # DDP in sync
    # What the tolerance must catch: one process with batch B (a rank training on its own rows only)
    # parts from the 2B run by far more than TIGHT.
    alone = in_float64(Trainer(_cfg(method, batch_size=GLOBAL_BATCH // WORLD), tmp_path / "alone", progress=False))
    alone.fit()
    gap = max(float((alone.method.state_dict()[k] - v).abs().max()) for k, v in ref.items()
              if v.is_floating_point() and alone.method.state_dict()[k].shape == v.shape)
    assert gap > 1e-4, gap
    init = Trainer(_cfg(method), tmp_path / "init", progress=False).method.state_dict()
    first = "model.backbone.features.0.weight"
    assert (ref[first] - init[first]).abs().max() > 1e-3  # the weights compared are trained, not initial
    if method == "swav":  # queue [2 crops, L, D], newest step first: rank r holds rows r*B.. of each step
        q, b = ref["queue"], GLOBAL_BATCH // WORLD
        for r in range(WORLD):
            mine = torch.cat([q[:, s * GLOBAL_BATCH + r * b : s * GLOBAL_BATCH + (r + 1) * b] for s in range(2)], dim=1)
            torch.testing.assert_close(res[r][method]["state"]["queue"], mine, rtol=TIGHT, atol=TIGHT)
            assert int(res[r][method]["state"]["queue_count"]) == int(ref["queue_count"]) // WORLD


def test_moco_queue_holds_the_keys_of_both_ranks(ranks):
    _, res = ranks
    b = GLOBAL_BATCH // WORLD
    for r in range(WORLD):
        m = res[r]["moco"]
        assert m["keys"].shape == (b, 16)
        torch.testing.assert_close(m["keys"].norm(dim=1), torch.ones(b))
        assert int(m["ptr"]) == GLOBAL_BATCH
        assert torch.equal(m["queue"], res[0]["moco"]["queue"])  # the same global queue on every rank
        for s in range(WORLD):  # rank s's keys, in rank order
            assert torch.equal(m["queue"][s * b : (s + 1) * b], res[s]["moco"]["keys"])
        assert torch.equal(m["queue"][GLOBAL_BATCH:], m["initial_queue"][GLOBAL_BATCH:])  # the rest untouched
    assert not torch.allclose(res[0]["moco"]["keys"], res[1]["moco"]["keys"])


def test_paco_queue_holds_the_keys_and_labels_of_both_ranks(ranks):
    _, res = ranks
    b = GLOBAL_BATCH // WORLD
    for r in range(WORLD):
        m = res[r]["paco"]
        assert int(m["filled"]) == GLOBAL_BATCH and torch.equal(m["queue"], res[0]["paco"]["queue"])
        for s in range(WORLD):  # rank s's keys and labels, in rank order
            assert torch.equal(m["queue"][s * b : (s + 1) * b], res[s]["paco"]["keys"])
            assert torch.equal(m["labels"][s * b : (s + 1) * b], res[s]["paco"]["batch_labels"])
    assert not torch.equal(res[0]["paco"]["batch_labels"], res[1]["paco"]["batch_labels"])


def test_sinkhorn_and_draws_span_the_global_batch(ranks):
    _, res = ranks
    scores = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    full = sinkhorn_knopp(scores, 0.05, 3)
    torch.testing.assert_close(torch.cat([res[0]["sinkhorn"], res[1]["sinkhorn"]]), full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full[:10], sinkhorn_knopp(scores[:10], 0.05, 3), atol=1e-3)  # a global problem
    # rank 0 receives every rank's rows (1 of rank 0, 2 of rank 1); rank 1 keeps nothing
    assert torch.equal(res[0]["gather_to_0"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    assert res[1]["gather_to_0"].shape == (0, 2)
    draws = torch.rand(12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.cat([res[0]["draws"], res[1]["draws"]]), draws)


def test_dataset_wide_steps_cover_the_whole_dataset(ranks, tmp_path, one_thread):
    _, res = ranks
    t = Trainer(_cfg("deepcluster"), tmp_path / "dc", progress=False)
    feats = embed_dataset(t.method.model, t.context(0))
    for r in range(WORLD):
        assert res[r]["dataset_features"].shape == feats.shape == (len(t.data), 16)
        torch.testing.assert_close(res[r]["dataset_features"], feats, rtol=1e-5, atol=1e-6)
    s = Trainer(_cfg("sela"), tmp_path / "sela", progress=False)
    s.method.update_labels(s.context(0))
    assert torch.equal(res[0]["sela_labels"], res[1]["sela_labels"])
    assert (res[0]["sela_labels"] == s.method.labels).float().mean() > 0.99
    c = Trainer(_cfg("scan"), tmp_path / "scan", progress=False)
    c.method.on_train_start(c.context(0))
    assert torch.equal(res[0]["scan_neighbors"], res[1]["scan_neighbors"])
    assert (res[0]["scan_neighbors"] == c.method.neighbors).float().mean() > 0.99
    # SCAN's features stayed in shards: the only gather is of the ranks' [n_r, k] neighbour lists.
    for r in range(WORLD):
        assert res[r]["scan_gathers"] == [(torch.int64, 721, 5)]
    # Mining over shards (each rank's block broadcast in turn) equals mining over all rows.
    assert torch.equal(torch.cat([res[0]["mined"], res[1]["mined"]]), mine_neighbors(MINING_X, 4))


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


def test_deepcluster_and_pcl_cluster_shards_like_one_process(ranks, tmp_path, one_thread):
    """The E-steps keep each rank's features in its shard and still match one process holding them all."""
    _, res = ranks
    n = None
    for key, kw in DC_VARIANTS.items():
        one = Trainer(_cfg("deepcluster", method_kwargs={**KW["deepcluster"], **kw}), tmp_path / key, progress=False)
        labels = one.method.cluster(one.context(0))
        n = labels.numel()
        assert torch.equal(res[0][key], res[1][key])  # the same pseudo-labels on both ranks
        assert _agreement(res[0][key], labels) > 0.99, key  # (ties may differ in the last float bit)
        assert int(torch.bincount(res[0][key], minlength=10).min()) >= 1  # no empty pseudo-class
    # What each rank sent to rank 0's k-means (rows, dims): its whole shard only when the sample is the
    # dataset (the PCA variant: 1,442 rows < 256 x 10); 200 rows from both ranks together when sampled.
    # Nothing else gathers features: rank 1 never holds more than its own shard.
    (pca_0, sampled_0), (pca_1, sampled_1) = res[0]["dc_gathered"], res[1]["dc_gathered"]
    assert pca_0[1] == pca_1[1] == 8 and pca_0[0] + pca_1[0] == n, (pca_0, pca_1)
    assert sampled_0[1] == sampled_1[1] == 16 and sampled_0[0] + sampled_1[0] == 200, (sampled_0, sampled_1)
    one = Trainer(_cfg("pcl"), tmp_path / "pcl", progress=False)
    one.method.on_epoch_start(one.context(0))
    ref = one.method.state_dict()
    for key, value in res[0]["pcl"].items():
        assert torch.equal(res[1]["pcl"][key], value), key
        if key.startswith("assignments"):
            assert _agreement(value, ref[key]) > 0.99 and bool((value >= 0).all())
        else:
            torch.testing.assert_close(value, ref[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def test_sharded_embedding_equals_single_process_in_dataset_order(ranks, tmp_path, one_thread):
    from serve.index import build_index, read_features
    from serve.preprocess import Preprocessor
    from zoo.checkpoint import load_model_folder
    from zoo.data import load_dataset, transform_for
    from zoo.eval import extract_features

    out, _ = ranks
    single = embed(out / "model", tmp_path / "one", data="digits", split="test", progress=False)
    two = read_features(out / "emb_data")
    one = read_features(single)
    assert sorted(p.name for p in (out / "emb_data").iterdir()) == ["features.npy", "items.json", "labels.npy",
                                                                     "meta.json"]
    np.testing.assert_allclose(two["features"], one["features"], rtol=1e-5, atol=1e-6)
    assert two["items"] == one["items"] == [f"digits/test/{i}" for i in range(len(one["items"]))]
    model = load_model_folder(out / "model")
    ds = load_dataset("digits", "test", transform=transform_for(model))
    ref = extract_features(model, ds, progress=False)
    np.testing.assert_allclose(two["features"], ref["features"], rtol=1e-5, atol=1e-6)
    assert np.array_equal(two["labels"], ref["labels"])
    meta = two["meta"]
    assert meta["model_name"] == "tiny_digits" and meta["processes"] == 2 and meta["count"] == len(ds)
    assert meta["preprocess"] == Preprocessor(model.pretrained_cfg).config()
    # Kept shards read the same, in rank order.
    shards = read_features(out / "emb_shards")
    assert sorted(p.name for p in (out / "emb_shards").glob("features*")) == ["features-00000.npy",
                                                                               "features-00001.npy"]
    assert np.array_equal(shards["features"], two["features"]) and shards["items"] == two["items"]
    # A folder: items are relative paths in sorted order, the unreadable file skipped, classes as labels.
    folder = read_features(out / "emb_images")
    names = [f"{c}/{i}.png" for c in ("cats", "dogs") for i in range(5) if (c, i) != ("dogs", 2)]
    assert folder["items"] == names and folder["labels"].tolist() == [0] * 5 + [1] * 4
    assert folder["meta"]["source"]["skipped"] == 1
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        single_folder = read_features(embed(out / "model", tmp_path / "f1", images=out / "images", progress=False))
    np.testing.assert_allclose(folder["features"], single_folder["features"], rtol=1e-5, atol=1e-6)
    # The index builds from the folder, and refuses to overwrite silently.
    index = build_index(out / "model", features=out / "emb_data", index_type="flat", progress=False)
    assert index.ntotal == len(ds) and index.model_name == "tiny_digits"
    with pytest.raises(ValueError, match="--overwrite"):
        embed(out / "model", single, data="digits", split="test", progress=False)


def _worker_pids(marker: str) -> list[int]:
    """Training workers (torchrun children: LOCAL_RANK in their environment) whose command line has ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmd and any(e.startswith(b"LOCAL_RANK=") for e in env):
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker through /proc")
def test_sigkill_mid_epoch_then_torchrun_restart_resumes_to_identical_weights(tmp_path, one_thread):
    steps, every = 60, 4  # digits: 28 steps per epoch at batch 64; killed after step 4, mid-epoch 0
    cfg = tiny_cfg(method_kwargs=KW["simclr"], epochs=3, batch_size=64, max_steps=steps, ckpt_every=every)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(asdict(cfg)))
    args = ["--recipe", str(recipe), "--no-eval", "--quiet", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "train", *args, "--nproc", "1", "--max-restarts", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ckpts = tmp_path / "run" / "checkpoints"
        deadline = time.time() + 120
        while not list(ckpts.glob("step_*.safetensors")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        pids = _worker_pids(str(tmp_path / "run"))
        assert len(pids) == 1, f"expected one training worker, found {pids}: {proc.poll()}"
        os.kill(pids[0], signal.SIGKILL)
        at_kill = max(int(p.stem.split("_")[1]) for p in ckpts.glob("step_*.safetensors"))
        assert at_kill < steps, "the run finished before it was killed"
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "resumed from" in output, output  # torchrun restarted the worker, which resumed on its own
    final = tmp_path / "run" / "checkpoints" / f"step_{steps:08d}.safetensors"
    resumed = load_state(final)["method"]
    whole = Trainer(cfg, tmp_path / "whole", progress=False)
    whole.fit()
    reference = whole.method.state_dict()
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log[-1].startswith(f"{steps},")


def test_cli_resume_modes_and_argv_round_trip(monkeypatch):
    from train.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--method", "swav", "--backbone-kwargs", '{"widths": [8]}', "--sync-bn",
                              "--out", "x", "--nproc", "2", "--resume", "--no-channels-last"])
    argv = distributed.argv_from_namespace(args, args._parser)
    again = parser.parse_args(["train", *argv])
    assert {k: v for k, v in vars(again).items() if k not in ("nproc", "_parser")} == {
        k: v for k, v in vars(args).items() if k not in ("nproc", "_parser")}
    assert "--nproc" not in argv and again.resume == "yes" and again.sync_bn is True and again.channels_last is False
    on = parser.parse_args(["train", "--channels-last", "--out", "x"])
    assert "--channels-last" in distributed.argv_from_namespace(on, on._parser)
    cmd = distributed.torchrun_command(2, argv, max_restarts=3)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in cmd and "--max-restarts=3" in cmd
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert not distributed.resume_requested("auto") and distributed.resume_requested("yes")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert distributed.resume_requested("auto") and not distributed.resume_requested("no")
    with pytest.raises(ValueError, match="yes, no or auto"):
        distributed.resume_requested("maybe")
    embed_args = parser.parse_args(["embed", "m", "--data", "digits", "--out", "o", "--nproc", "2"])
    assert distributed.argv_from_namespace(embed_args, embed_args._parser) == ["m", "--data", "digits", "--out", "o"]


def test_global_batch_must_split_evenly_and_amp_is_checked(tmp_path):
    with pytest.raises(ValueError, match="amp must be 'bf16'"):
        Trainer(tiny_cfg(amp="fp16"), tmp_path, progress=False)
    assert distributed.shard_range(10, 0, 3) == (0, 3) and distributed.shard_range(10, 2, 3) == (6, 10)


def test_bf16_autocast_and_channels_last_smoke_on_cpu(tmp_path):
    """The GPU speed paths also run on the CPU: two steps train and stay finite (not a speed test)."""
    t = Trainer(tiny_cfg(max_steps=2, amp="bf16", method_kwargs=KW["simclr"]), tmp_path, progress=False)
    assert t.cfg.channels_last  # the default
    conv = t.method.model.backbone.features[0].weight
    formats: list[bool] = []
    step = t.method.training_step
    t.method.training_step = lambda *a: formats.append(conv.is_contiguous(memory_format=torch.channels_last)
                                                       and not conv.is_contiguous()) or step(*a)
    t.fit()
    assert len(t.history) == 2 and all(np.isfinite(h["loss"]) for h in t.history)
    assert formats == [True, True]  # NHWC while training ...
    assert all(p.is_contiguous() for p in t.method.parameters())  # ... NCHW again for export


def test_loader_workers_decode_ahead_without_changing_the_run(tmp_path, one_thread):
    """Images read from files: DataLoader workers give exactly the batches the in-process path gives."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    runs = []
    for workers in (0, 2):
        cfg = tiny_cfg(data="imagefolder", data_root=str(tmp_path), batch_size=8, max_steps=3, epochs=2,
                       method_kwargs=KW["simclr"], loader_workers=workers)
        t = Trainer(cfg, tmp_path / f"run{workers}", progress=False)
        t.fit()
        runs.append(t)
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]
    for key, value in runs[0].method.state_dict().items():
        assert torch.equal(value, runs[1].method.state_dict()[key]), key
