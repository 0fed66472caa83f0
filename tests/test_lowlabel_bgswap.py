"""The low-label protocol (zoo/eval/lowlabel.py) and the background-swap protocol (zoo/eval/bgswap.py)."""

import json
import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from zoo.checkpoint import save_model_folder
from zoo.cli import main
from zoo.data import load_dataset
from zoo.data.shapes import COLOUR_RGB, COLOURS, make_shapes, shape_layers
from zoo.eval import evaluate_features
from zoo.eval.bgswap import bgswap_partners, evaluate_bgswap, swap_backgrounds
from zoo.eval.lowlabel import evaluate_lowlabel, fraction_tag, lowlabel_indices
from zoo.model import ZooModel


# -- low-label subsets -----------------------------------------------------------------------
def test_subsets_are_stratified_nested_and_fixed_by_seed():
    targets = np.repeat(np.arange(4), [200, 100, 50, 7])
    small, large = lowlabel_indices(targets, 0.01), lowlabel_indices(targets, 0.1)
    assert np.bincount(targets[small]).tolist() == [2, 1, 1, 1]  # round(1 % of n_c), at least one
    assert np.bincount(targets[large]).tolist() == [20, 10, 5, 1]
    assert set(small) <= set(large) and np.all(np.diff(large) > 0)
    assert np.array_equal(large, lowlabel_indices(targets, 0.1, seed=0))
    assert not np.array_equal(large, lowlabel_indices(targets, 0.1, seed=1))
    # Class c's draw is numpy's permutation of its indices with default_rng([seed, c]).
    first = np.random.default_rng([0, 1]).permutation(np.arange(200, 300))[:10]
    assert set(large[targets[large] == 1]) == set(first)
    assert len(lowlabel_indices(targets, 1.0)) == len(targets)
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            lowlabel_indices(targets, bad)
    assert fraction_tag(0.01) == "1pct" and fraction_tag(0.1) == "10pct"


def _digits_features():
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    return {"features": x[:1400], "labels": y[:1400]}, {"features": x[1400:], "labels": y[1400:]}


def test_lowlabel_linear_probe_matches_sklearn_on_the_same_subset():
    train, test = _digits_features()
    wd = 1e-2  # a well-posed problem, so both solvers reach the same optimum
    got = evaluate_lowlabel(train, test, fractions=(0.05, 0.2), weight_decay=wd, epochs=500)
    for fraction in (0.05, 0.2):
        idx = lowlabel_indices(train["labels"], fraction)
        scaler = StandardScaler().fit(train["features"][idx])
        # mean CE + wd/2 ||W||^2  ==  (C * sum CE + 1/2 ||W||^2) / (C n)  with  C = 1 / (wd n)
        clf = LogisticRegression(C=1 / (wd * len(idx)), max_iter=5000, tol=1e-8)
        clf.fit(scaler.transform(train["features"][idx]), train["labels"][idx])
        ref = clf.score(scaler.transform(test["features"]), test["labels"])
        tag = fraction_tag(fraction)
        assert got[f"lowlabel_{tag}_n"] == len(idx)
        assert got[f"lowlabel_{tag}_linear"] == pytest.approx(ref, abs=0.006), tag  # at most 2 of 397 differ
    assert got["lowlabel_5pct_linear"] < got["lowlabel_20pct_linear"]  # more labels help
    # Through evaluate_features, the default fractions are 1 % and 10 %.
    keys = evaluate_features(train, test, protocols="lowlabel")
    assert {"lowlabel_1pct_linear", "lowlabel_10pct_knn", "lowlabel_10pct_n"} <= set(keys)
    assert keys["lowlabel_10pct_n"] == len(lowlabel_indices(train["labels"], 0.1))


# -- shapes layers and the swap --------------------------------------------------------------
def test_shape_layers_recompose_the_generated_images_exactly():
    for split in ("train", "test"):
        images, f = make_shapes(300, 2, split)
        masks, backgrounds = shape_layers(300, 2, split)
        colour = np.array([COLOUR_RGB[c] for c in COLOURS], dtype=np.uint8)[f["colour"]]
        assert np.array_equal(np.where(masks[..., None], colour[:, None, None], backgrounds), images)
        assert masks.sum(axis=(1, 2)).min() > 0 and not masks[:, 0].any() and not masks[:, :, -1].any()
        noise = f["background"] == 3
        # under a noise image's shape lies its noise, not a flat colour
        assert backgrounds[noise].std() > 50 and (backgrounds[~noise].std(axis=(1, 2)) == 0).all()
    ds = load_dataset("shapes", "test", n_train=50, n_test=40)
    m, bg = ds.layers()
    assert m.shape == (40, 1, 32, 32) and m.dtype == torch.bool and bg.shape == ds.images.shape
    lt = load_dataset("shapes_lt10", "train", n_train=200, n_test=40)
    base_m, base_bg = load_dataset("shapes", "train", n_train=200, n_test=40).layers()
    lt_m, lt_bg = lt.layers()
    assert torch.equal(lt_m, base_m[lt.indices]) and torch.equal(lt_bg, base_bg[lt.indices])
    pickle.loads(pickle.dumps(lt))  # the layers hook keeps datasets picklable


def test_partners_and_swap_by_hand():
    codes = np.array([0, 0, 1, 2, 1, 0])
    p = bgswap_partners(6, codes, seed=3)
    assert (codes[p] != codes).all() and (p != np.arange(6)).all()
    assert np.array_equal(p, bgswap_partners(6, codes, seed=3))
    assert (bgswap_partners(5, np.zeros(5), seed=0) != np.arange(5)).all()  # one background only: any other
    images = torch.tensor([[[[1, 2], [3, 4]]], [[[5, 6], [7, 8]]]], dtype=torch.uint8)  # [2,1,2,2]
    masks = torch.tensor([[[[True, False], [False, False]]], [[[False, False], [False, True]]]])
    backgrounds = torch.tensor([[[[10, 10], [10, 10]]], [[[20, 20], [20, 20]]]], dtype=torch.uint8)
    out = swap_backgrounds(images, masks, backgrounds, [1, 0])
    assert out.tolist() == [[[[1, 20], [20, 20]]], [[[10, 10], [10, 8]]]]
    with pytest.raises(ValueError, match="match"):
        swap_backgrounds(images, masks[:, :, :1], backgrounds, [1, 0])


def test_bgswap_gap_is_zero_for_shape_features_and_large_for_background_features():
    rng = np.random.default_rng(0)
    shape_tr, bg_tr = rng.integers(0, 4, 400), rng.integers(0, 4, 400)
    shape_te, bg_te = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    bg_swapped = (bg_te + 1 + rng.integers(0, 3, 200)) % 4  # a different background
    eye = np.eye(4, dtype=np.float32)

    def feats(s, b, w_bg):
        return np.concatenate([eye[s], w_bg * eye[b]], axis=1) + 0.01 * rng.standard_normal((len(s), 8))

    train = {"features": feats(shape_tr, bg_tr, 0.0), "labels": shape_tr}
    test = {"features": feats(shape_te, bg_te, 0.0), "labels": shape_te}
    robust = evaluate_bgswap(train, test, feats(shape_te, bg_swapped, 0.0))
    assert robust["bgswap_linear_orig"] == 1.0 and abs(robust["bgswap_linear_gap"]) < 0.02
    # A representation where the training labels equal the background (a spurious shortcut): the swap breaks it.
    train = {"features": feats(bg_tr, bg_tr, 1.0), "labels": bg_tr}
    shortcut_test = {"features": feats(shape_te, bg_te, 0.0) * 0 + feats(bg_te, bg_te, 1.0), "labels": bg_te}
    broken = evaluate_bgswap(train, shortcut_test, feats(bg_swapped, bg_swapped, 1.0))
    assert broken["bgswap_linear_orig"] == 1.0 and broken["bgswap_linear_swapped"] == 0.0
    assert broken["bgswap_linear_gap"] == 1.0 and broken["bgswap_knn_gap"] == 1.0
    with pytest.raises(ValueError, match="swapped features"):
        evaluate_bgswap(train, test, np.zeros((3, 8)))


def _shapes_model(path):
    torch.manual_seed(0)
    model = ZooModel("convnet_tiny", {"widths": [8, 16]}, pretrained_cfg={
        "name": "tiny_shapes", "dataset": "shapes", "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
        "crop_pct": 1.0, "interpolation": "bilinear"})
    return save_model_folder(model, path)


def test_cli_runs_lowlabel_and_bgswap(tmp_path, capsys):
    folder = _shapes_model(tmp_path / "model")
    out = tmp_path / "m.json"
    assert main(["eval", str(folder), "--data", "shapes", "--protocol", "lowlabel,bgswap", "--fractions",
                 "0.01,0.1", "--json", str(out), "--quiet"]) == 0
    metrics = json.loads(out.read_text())
    targets = load_dataset("shapes", "train").targets  # 3,000 images: 1 % / 10 %, rounded per class
    assert metrics["lowlabel_1pct_n"] == len(lowlabel_indices(targets, 0.01)) == 30
    assert metrics["lowlabel_10pct_n"] == len(lowlabel_indices(targets, 0.1)) in (299, 300, 301)
    assert 0 <= metrics["lowlabel_1pct_linear"] <= 1
    for p in ("linear", "knn"):
        assert metrics[f"bgswap_{p}_gap"] == pytest.approx(metrics[f"bgswap_{p}_orig"] - metrics[f"bgswap_{p}_swapped"])
    # A random tiny convnet leans on colour and background: swapping backgrounds costs it accuracy.
    assert metrics["bgswap_linear_gap"] > 0
    assert main(["eval", str(folder), "--data", "digits", "--protocol", "bgswap", "--quiet"]) == 2
    assert "exact foreground masks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(folder), "--protocol", "lowlabel", "--fractions", "2"])
