"""The benchmark scripts run (tiny settings) and write the JSON they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_vs_lightly_smoke(tmp_path):
    pytest.importorskip("lightly")
    out = tmp_path / "tp.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput_vs_lightly.py"), "--methods", "simclr,swav",
           "--backbone", "convnet_tiny", "--size", "16", "--batch", "8", "--rounds", "2", "--steps", "1",
           "--warmup", "0", "--amp", "--json", str(out)]  # bf16 autocast runs on the CPU too
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["simclr", "swav"]
    for r in rows:
        assert r["ours_img_s"] > 0 and r["lightly_img_s"] > 0
        assert r["ratio"] == pytest.approx(r["lightly_step_s"] / r["ours_step_s"])
    assert "| simclr |" in result.stdout


def test_memory_format_smoke(tmp_path):
    pytest.importorskip("lightly")  # the step builders live beside the lightly comparison
    out = tmp_path / "mf.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory_format.py"), "--methods", "simclr,swav",
           "--backbone", "convnet_tiny", "--size", "16", "--threads", "1", "--batches", "8", "--rounds", "2",
           "--steps", "1", "--warmup", "0", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["threads"], r["batch"]) for r in rows] == [("simclr", 1, 8), ("swav", 1, 8)]
    for r in rows:
        assert r["speedup"] == pytest.approx(r["nhwc_img_s"] / r["nchw_img_s"])
        assert r["speedup_ci95"][0] <= r["speedup_ci95"][1]
    assert "| 1 | 8 | swav |" in result.stdout


def test_method_table_rows_are_their_base_recipe_plus_the_overrides():
    """``benchmarks/methods.py``: a variant row is its base recipe with only the variant's keys changed,
    the shapes bgaug rows use their own recipe, a row without a recipe is reported, and the tables
    list every row."""
    import yaml

    sys.path.insert(0, str(ROOT))
    from benchmarks import methods as bench

    recipes = ROOT / "train" / "recipes"
    base = yaml.safe_load((recipes / "moco_mnist5k.yaml").read_text())
    cfg = bench.row_config("moco+unmix", "mnist5k", 3, None)
    assert cfg.method == "moco" and cfg.epochs == 3
    assert cfg.method_kwargs == {**base["method_kwargs"], "unmix": True} and cfg.augment == base["augment"]
    cfg = bench.row_config("byol+bgaug", "mnist5k", 3, None)
    assert cfg.augment == {**yaml.safe_load((recipes / "byol_mnist5k.yaml").read_text())["augment"],
                           "bg_remove_p": 0.2, "bg_swap_p": 0.6, "bg_masks": "saliency"}
    cfg = bench.row_config("byol+bgaug", "shapes", 3, None)
    assert cfg.augment == yaml.safe_load((recipes / "byol_shapes_bgaug.yaml").read_text())["augment"]
    assert bench.row_config("uic", "mnist5k", 3, "/runs/simclr/model").method_kwargs["pretext"] == "/runs/simclr/model"
    with pytest.raises(RuntimeError, match="pretext"):
        bench.row_config("scan", "mnist5k", 3, None)
    for name in bench.ALL:  # every row names a recipe that exists, or says why not
        for data in ("mnist5k", "shapes"):
            reason = bench.missing_reason(name, data)
            assert (reason is None) == bench.recipe_path(name, data).exists() or "method" in reason
    assert "unknown row" in bench.missing_reason("nope", "mnist5k")
    rows = [{"method": "simclr", "knn_top1": 0.9, "kmeans_nmi": 0.4, "linear_top1": 0.95, "kmeans_acc": 0.5},
            {"method": "simclr+unmix", "knn_top1": 0.8, "kmeans_nmi": 0.5, "linear_top1": 0.9, "kmeans_acc": 0.4},
            {"method": "ncc", "missing": "no recipe"}]
    table = bench.markdown(rows)
    assert len(table.splitlines()) == 2 + len(rows) and "not run: no recipe" in table
    assert "0.900 -> 0.800 (-0.100)" in bench.versus_base(rows) and "| ncc | byol | not run |" in bench.versus_base(rows)


def test_probe_pair_stats_match_a_brute_force_count():
    """``benchmarks/method_probes.py``: the pair counts from the contingency table equal an N x N count."""
    import numpy as np
    from sklearn.metrics import normalized_mutual_info_score

    sys.path.insert(0, str(ROOT))
    from benchmarks.method_probes import pair_stats

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 60)
    pseudo = np.where(rng.random(60) < 0.3, -1, (truth + (rng.random(60) < 0.3)) % 5)
    same_p = (pseudo[:, None] == pseudo[None, :]) & (pseudo[:, None] >= 0)
    same_t = truth[:, None] == truth[None, :]
    off = ~np.eye(60, dtype=bool)
    got = pair_stats(pseudo, truth)
    assert got["pair_precision"] == pytest.approx((same_p & same_t & off).sum() / (same_p & off).sum())
    assert got["pair_recall"] == pytest.approx((same_p & same_t & off).sum() / (same_t & off).sum())
    assert got["negatives_removed_share"] == pytest.approx((same_p & off).sum() / off.sum())
    assert got["labelled_share"] == pytest.approx((pseudo >= 0).mean())
    has = pseudo >= 0
    assert got["nmi_vs_truth"] == pytest.approx(normalized_mutual_info_score(truth[has], pseudo[has]))
