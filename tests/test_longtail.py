"""Long-tailed datasets (zoo/data/longtail.py) and many/medium/few-shot accuracy (zoo/eval/longtail.py)."""

import pickle

import numpy as np
import pytest
import torch

from zoo.data import DATASET_PRESETS, list_datasets, load_dataset
from zoo.data.longtail import longtail_counts, longtail_indices, longtail_names, parse_longtail_name
from zoo.eval import knn_top1, linear_probe
from zoo.eval.longtail import evaluate_longtail, linear_probe_predict, shot_accuracy, shot_groups

# n_c = floor(400 * (1/imbalance)^(c/9)), computed by hand (and with 50-digit decimals) for mnist5k.
MNIST5K_LT = {
    10: [400, 309, 239, 185, 143, 111, 86, 66, 51, 40],
    50: [400, 258, 167, 108, 70, 45, 29, 19, 12, 8],
    100: [400, 239, 143, 86, 51, 30, 18, 11, 6, 4],
}


def test_counts_follow_the_exponential_profile():
    for imbalance, counts in MNIST5K_LT.items():
        assert longtail_counts(400, 10, imbalance) == counts
    # The published CIFAR-LT sizes (Cui et al. 2019; Cao et al. 2019): CIFAR-10-LT 12,406 / 13,996 / 20,431
    # and CIFAR-100-LT 10,847 / 12,608 / 19,573 training images at imbalance 100 / 50 / 10.
    assert longtail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert [sum(longtail_counts(5000, 10, r)) for r in (100, 50, 10)] == [12406, 13996, 20431]
    assert [sum(longtail_counts(500, 100, r)) for r in (100, 50, 10)] == [10847, 12608, 19573]
    assert longtail_counts(7, 3, 1) == [7, 7, 7]  # imbalance 1: balanced
    with pytest.raises(ValueError, match="imbalance"):
        longtail_counts(400, 10, 0.5)


def test_names_and_presets():
    assert parse_longtail_name("mnist5k_lt50") == ("mnist5k", 50)
    assert parse_longtail_name("mnist5k_lt") == ("mnist5k", 100)
    assert parse_longtail_name("digits_lt10") is None and parse_longtail_name("mnist5k") is None
    names = longtail_names()
    assert set(names) <= set(list_datasets()) and len(names) == 16
    assert "cifar100_lt10" in names and "shapes_lt" in names
    for name in names:
        assert DATASET_PRESETS[name] == DATASET_PRESETS[parse_longtail_name(name)[0]]
    with pytest.raises(ValueError, match="mnist5k_lt"):
        load_dataset("mnist5k_lt7")  # only 10, 50, 100; the error suggests the close names


def test_mnist5k_lt_split_counts_and_content():
    base = load_dataset("mnist5k", "train")
    for imbalance, counts in MNIST5K_LT.items():
        lt = load_dataset(f"mnist5k_lt{imbalance}", "train")
        assert np.bincount(lt.targets).tolist() == counts and lt.class_counts.tolist() == counts
        assert len(lt) == sum(counts) and lt.name == f"mnist5k_lt{imbalance}" and lt.imbalance == imbalance
        # The kept images are base train images, in base order, with their labels.
        assert np.all(np.diff(lt.indices) > 0)
        assert torch.equal(lt.images, base.images[torch.as_tensor(lt.indices)])
        assert np.array_equal(lt.targets, base.targets[lt.indices])
    default = load_dataset("mnist5k_lt", "train")
    assert np.array_equal(default.indices, load_dataset("mnist5k_lt100", "train").indices)
    test = load_dataset("mnist5k_lt100", "test")  # balanced and unchanged
    assert np.bincount(test.targets).tolist() == [100] * 10
    assert torch.equal(test.images, load_dataset("mnist5k", "test").images)
    x, y = load_dataset("mnist5k_lt10", "train")[0]
    assert x.shape == (3, 28, 28) and y == int(base.targets[load_dataset("mnist5k_lt10", "train").indices[0]])


def test_subset_is_fixed_by_seed():
    a = load_dataset("mnist5k_lt50", "train")
    b = load_dataset("mnist5k_lt50", "train", lt_seed=0)
    c = load_dataset("mnist5k_lt50", "train", lt_seed=1)
    assert np.array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    assert np.bincount(c.targets).tolist() == MNIST5K_LT[50]  # same profile, other images
    # Each class is drawn from its own stream: another imbalance keeps a prefix of the same draw.
    targets = np.repeat(np.arange(3), 10)
    small, large = longtail_indices(targets, 10, seed=4), longtail_indices(targets, 2, seed=4)
    assert set(small) <= set(large)


def test_shapes_lt_uses_its_smallest_class():
    base = load_dataset("shapes", "train", n_train=200, n_test=40)
    lt = load_dataset("shapes_lt10", "train", n_train=200, n_test=40)
    n_max = int(np.bincount(base.targets).min())
    assert np.bincount(lt.targets, minlength=4).tolist() == longtail_counts(n_max, 4, 10)
    assert len(load_dataset("shapes_lt10", "test", n_train=200, n_test=40)) == 40


def test_cifar10_lt_from_fake_files(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as tv_cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):  # 20 images per class in train, 2 per class in test
        labels = np.repeat(np.arange(10), 4)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (40, 3072), dtype=np.uint8), "labels": labels.tolist()}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                     "labels": np.repeat(np.arange(10), 2).tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    lt = load_dataset("cifar10_lt10", "train", root=tmp_path)
    assert np.bincount(lt.targets).tolist() == longtail_counts(20, 10, 10) == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]
    assert lt.images.shape == (sum(lt.class_counts), 3, 32, 32)
    assert len(load_dataset("cifar10_lt10", "test", root=tmp_path)) == 20


# -- many / medium / few --------------------------------------------------------------------------
def test_shot_groups_thresholds():
    groups = shot_groups([101, 100, 20, 19, 0, 500])
    assert groups["many"].tolist() == [0, 5]  # more than 100
    assert groups["medium"].tolist() == [1, 2]  # 20 to 100 inclusive
    assert groups["few"].tolist() == [3, 4]  # fewer than 20
    assert {g: len(c) for g, c in shot_groups(MNIST5K_LT[100]).items()} == {"many": 3, "medium": 3, "few": 4}
    assert {g: len(c) for g, c in shot_groups(MNIST5K_LT[10]).items()} == {"many": 6, "medium": 4, "few": 0}


def test_shot_accuracy_by_hand():
    # Train counts: class 0 many (150), class 1 medium (50), class 2 few (10), class 3 medium (20).
    counts = [150, 50, 10, 20]
    labels = [0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    pred = [0, 0, 0, 1, 1, 0, 0, 0, 1, 3, 3, 3, 3]
    acc = shot_accuracy(pred, labels, counts)
    # class accuracies: 0 -> 3/4, 1 -> 1/2, 2 -> 0/3, 3 -> 4/4; overall 8/13 correct images.
    assert acc["overall"] == pytest.approx(8 / 13)
    assert acc["many"] == pytest.approx(0.75)
    assert acc["medium"] == pytest.approx((0.5 + 1.0) / 2)  # mean of per-class accuracies
    assert acc["few"] == pytest.approx(0.0)
    assert (acc["num_many"], acc["num_medium"], acc["num_few"]) == (1, 2, 1)
    no_few = shot_accuracy([0, 1], [0, 1], [200, 30])
    assert no_few["few"] is None and no_few["num_few"] == 0
    assert shot_accuracy(pred, labels, counts, many=40, few=15)["many"] == pytest.approx((0.75 + 0.5) / 2)
    with pytest.raises(ValueError, match="labels"):
        shot_accuracy([0], [5], counts)


def test_evaluate_longtail_matches_the_standard_protocols():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 3
    train_counts = [120, 60, 30, 10]
    train_y = np.repeat(np.arange(4), train_counts)
    test_y = np.repeat(np.arange(4), 25)
    train = {"features": (centres[train_y] + rng.normal(size=(len(train_y), 8)) * 2.5).astype(np.float32),
             "labels": train_y}
    test = {"features": (centres[test_y] + rng.normal(size=(len(test_y), 8)) * 2.5).astype(np.float32),
            "labels": test_y}
    out = evaluate_longtail(train, test)
    assert out["knn_top1"] == pytest.approx(knn_top1(train["features"], train_y, test["features"], test_y))
    assert out["linear_top1"] == pytest.approx(linear_probe(train["features"], train_y, test["features"], test_y)["top1"])
    pred = linear_probe_predict(train["features"], train_y, test["features"])
    expected = shot_accuracy(pred, test_y, train_counts)
    assert [out[f"linear_{g}"] for g in ("many", "medium", "few")] == [expected[g] for g in ("many", "medium", "few")]
    assert (out["num_many"], out["num_medium"], out["num_few"]) == (1, 2, 1)
    assert 0 < out["linear_top1"] < 1  # the noise makes it a real check, not a trivially separable set


def test_trainer_runs_on_a_longtailed_set(tmp_path):
    from train.trainer import Trainer

    from .method_checks import tiny_cfg

    trainer = Trainer(tiny_cfg(method="supervised", data="mnist5k_lt100", max_steps=1, batch_size=32), tmp_path,
                      progress=False)
    assert len(trainer.data) == 988 and trainer.data.in_memory
    trainer.fit()
    assert trainer.method.class_counts.tolist() == MNIST5K_LT[100]


def test_longtail_benchmark_smoke(tmp_path):
    """benchmarks/longtail.py end to end with one method, one step: the JSON and PNG it promises."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "lt.json"
    cmd = [sys.executable, str(root / "benchmarks" / "longtail.py"), "--methods", "bcl", "--imbalances", "100",
           "--max-steps", "1", "--out", str(tmp_path / "runs"), "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-2000:]
    payload = json.loads(out.read_text())
    (row,) = payload["rows"]
    assert row["method"] == "bcl" and row["imbalance"] == 100 and row["steps"] == 1
    for protocol in ("linear", "knn", "head"):
        assert 0 <= row[f"{protocol}_top1"] <= 1 and 0 <= row[f"{protocol}_few"] <= 1
    assert (row["num_many"], row["num_medium"], row["num_few"]) == (3, 3, 4)
    assert out.with_suffix(".png").stat().st_size > 0 and "| 100 | bcl |" in result.stdout
