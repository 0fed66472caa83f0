"""Reverse linear probing and few-shot episodes: synthetic representations, hand formulas, brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from zoo.eval import evaluate, evaluate_features
from zoo.eval.fewshot import confidence_interval, fewshot_eval, nearest_centroid_accuracy, sample_episodes
from zoo.eval.rlp import composition_codes, mutual_information, reverse_linear_probe, rlp_metrics

N_SHAPE, N_COLOUR, N_BG = 4, 6, 4


def concepts(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"shape": rng.integers(0, N_SHAPE, n), "colour": rng.integers(0, N_COLOUR, n),
            "background": rng.integers(0, N_BG, n)}


def one_hot_features(codes: np.ndarray, size: int, seed: int, noise: float = 0.05) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.eye(size)[codes] + noise * rng.normal(size=(codes.size, size))


# ----------------------------------------------------------------------------- reverse linear probing


def test_mutual_information_matches_sklearn():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 300)
    b = (a + (rng.random(300) < 0.3) * rng.integers(0, 3, 300)) * 7 - 2
    assert mutual_information(a, b) == pytest.approx(mutual_info_score(a, b), abs=1e-12)
    assert mutual_information(a, a) == pytest.approx(mutual_info_score(a, a), abs=1e-12)


def test_composition_codes_are_one_value_per_pair():
    c = {"shape": np.array([0, 1, 0, 1, 3]), "colour": np.array([2, 2, 0, 2, 5])}
    codes = composition_codes(c)
    assert list(codes) == ["shape", "colour", "shape&colour"]
    pairs = list(zip(c["shape"].tolist(), c["colour"].tolist()))
    # equal codes exactly for equal pairs
    for i in range(5):
        for j in range(5):
            assert (codes["shape&colour"][i] == codes["shape&colour"][j]) == (pairs[i] == pairs[j])
    with pytest.raises(ValueError, match="negative"):
        composition_codes({"shape": np.array([0, -1])})


def test_rlp_single_concept_representation():
    """Features = one-hot(shape) + noise: shape explains the clusters, colour and background do not."""
    train_c, test_c = concepts(1500, 0), concepts(600, 1)
    train_x = one_hot_features(train_c["shape"], N_SHAPE, 2)
    test_x = one_hot_features(test_c["shape"], N_SHAPE, 3)
    r = reverse_linear_probe(train_x, train_c, k=N_SHAPE, test_features=test_x, test_concepts=test_c)
    s = r["scores"]
    assert r["n_train"] == 1500 and r["n_test"] == 600 and r["k"] == N_SHAPE
    assert s["shape"]["nmi"] > 0.97 and s["shape"]["acc"] > 0.97
    assert s["shape"]["mi"] == pytest.approx(r["cluster_entropy"], rel=0.03)  # shape carries all of H(c)
    for unrelated in ("colour", "background", "colour&background"):
        assert s[unrelated]["nmi"] < 0.05, (unrelated, s[unrelated])
    # adding colour to shape explains nothing more: no composition gain
    assert abs(s["shape&colour"]["gain"]) < 0.03
    flat = rlp_metrics(r)
    assert flat["rlp_nmi[shape]"] == s["shape"]["nmi"] and flat["rlp_k"] == 4.0
    assert "rlp_gain[shape&colour]" in flat and "rlp_gain[shape]" not in flat


def test_rlp_composition_representation():
    """Features = one-hot of the (colour, shape) pair, K = number of pairs: only the pair explains them."""
    c = concepts(2400, 4)
    pair = c["colour"] * N_SHAPE + c["shape"]
    x = one_hot_features(pair, N_SHAPE * N_COLOUR, 5)
    r = reverse_linear_probe(x, c, k=N_SHAPE * N_COLOUR, test_fraction=0.3, seed=0)
    s = r["scores"]
    assert r["n_test"] == 720 and r["n_train"] == 1680
    assert s["shape&colour"]["nmi"] > 0.95 and s["shape&colour"]["acc"] > 0.9
    for single in ("shape", "colour"):
        assert s["shape&colour"]["nmi"] > s[single]["nmi"] + 0.2
        assert s[single]["acc"] < 0.35  # one attribute leaves 4 or 6 pairs to guess from
    assert s["shape&colour"]["gain"] > 0.2
    assert s["background"]["nmi"] < 0.1
    # the pair's information bounds the single attributes' (data processing)
    assert s["shape&colour"]["mi"] > max(s["shape"]["mi"], s["colour"]["mi"])


def test_rlp_bad_input():
    c = concepts(50, 0)
    with pytest.raises(ValueError, match="40 features but 50 concept values"):
        reverse_linear_probe(np.zeros((40, 3)), c, k=2)
    with pytest.raises(ValueError, match="both"):
        reverse_linear_probe(np.random.default_rng(0).normal(size=(50, 3)), c, k=2, test_features=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="integer"):
        reverse_linear_probe(np.zeros((2, 3)), {"size": np.array([0.5, 1.0])}, k=1)


# ----------------------------------------------------------------------------- few-shot


def test_confidence_interval_hand_formula():
    accs = [0.6, 0.8, 1.0, 0.4]
    # mean 0.7; population variance ((.1)^2 + (.1)^2 + (.3)^2 + (.3)^2) / 4 = 0.05
    mean, ci = confidence_interval(accs)
    assert mean == pytest.approx(0.7)
    assert ci == pytest.approx(1.96 * math.sqrt(0.05) / math.sqrt(4))
    assert confidence_interval([0.5] * 10) == (0.5, 0.0)


def test_episodes_are_valid_and_seeded():
    labels = np.repeat(np.arange(7), 25)
    labels[:3] = 9  # class 9: 3 images, too few for 5-shot + 15 queries; never drawn
    sup, qry = sample_episodes(labels, ways=5, shots=5, queries=15, episodes=40, seed=3)
    assert sup.shape == (40, 5, 5) and qry.shape == (40, 5, 15)
    for e in range(40):
        classes = [labels[sup[e, n, 0]] for n in range(5)]
        assert len(set(classes)) == 5 and 9 not in classes
        for n in range(5):
            idx = np.concatenate([sup[e, n], qry[e, n]])
            assert len(set(idx.tolist())) == 20 and (labels[idx] == classes[n]).all()
    again = sample_episodes(labels, 5, 5, 15, 40, seed=3)
    other = sample_episodes(labels, 5, 5, 15, 40, seed=4)
    assert (again[0] == sup).all() and (again[1] == qry).all() and not (other[0] == sup).all()
    with pytest.raises(ValueError, match="need 8 classes"):
        sample_episodes(labels, ways=8, shots=5)


def brute_force_accuracy(features, support, query):
    accs = []
    for e in range(support.shape[0]):
        protos = []
        for n in range(support.shape[1]):
            vs = [features[i] / np.linalg.norm(features[i]) for i in support[e, n]]
            m = np.mean(vs, axis=0)
            protos.append(m / np.linalg.norm(m))
        correct = total = 0
        for n in range(query.shape[1]):
            for i in query[e, n]:
                q = features[i] / np.linalg.norm(features[i])
                sims = [float(q @ p) for p in protos]
                correct += int(np.argmax(sims) == n)
                total += 1
        accs.append(correct / total)
    return np.array(accs)


@pytest.mark.parametrize("shots", [1, 3])
def test_nearest_centroid_matches_brute_force(shots):
    rng = np.random.default_rng(shots)
    labels = np.repeat(np.arange(6), 30)
    feats = rng.normal(size=(6, 16))[labels] * 0.8 + rng.normal(size=(180, 16))  # overlapping classes
    sup, qry = sample_episodes(labels, ways=4, shots=shots, queries=6, episodes=30, seed=0)
    fast = nearest_centroid_accuracy(feats, sup, qry, chunk=7)
    slow = brute_force_accuracy(feats, sup, qry)
    np.testing.assert_allclose(fast, slow, atol=1e-12)
    assert 0.3 < fast.mean() < 1.0  # neither trivial nor chance
    r = fewshot_eval(feats, labels, ways=4, shots=[shots], queries=6, episodes=30, seed=0)
    assert r[f"fewshot_4way_{shots}shot"] == pytest.approx(slow.mean())
    assert r[f"fewshot_4way_{shots}shot_ci95"] == pytest.approx(1.96 * slow.std() / math.sqrt(30))


# ----------------------------------------------------------------------------- through evaluate()


def test_evaluate_features_rlp_fewshot_keys():
    c_train, c_test = concepts(400, 0), concepts(200, 1)
    train = {"features": one_hot_features(c_train["colour"], N_COLOUR, 0), "labels": c_train["shape"],
             "concepts": c_train}
    test = {"features": one_hot_features(c_test["colour"], N_COLOUR, 1), "labels": c_test["shape"],
            "concepts": c_test}
    r = evaluate_features(train, test, protocols="rlp,fewshot", rlp_clusters=N_COLOUR, fewshot_episodes=50)
    assert r["rlp_k"] == 6 and r["rlp_nmi[colour]"] > 0.95 and r["rlp_nmi[shape]"] < 0.1
    assert {"fewshot_4way_1shot", "fewshot_4way_5shot_ci95"} <= set(r)  # ways = min(5, 4 classes)
    assert r["fewshot_4way_5shot"] < 0.5  # the features encode colour, not the shape labels
    with pytest.raises(ValueError, match="concept"):
        evaluate_features({k: v for k, v in train.items() if k != "concepts"}, test, protocols="rlp")


def test_evaluate_on_shapes_with_a_tiny_model():
    import torch

    from zoo import ZooModel

    torch.manual_seed(0)
    model = ZooModel("convnet_tiny", {"widths": [8, 16]},
                     pretrained_cfg={"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.25] * 3})
    r = evaluate(model, "shapes", protocols="rlp,fewshot", progress=False, rlp_clusters=6, fewshot_episodes=20,
                 fewshot_shots=(1,), n_train=240, n_test=120)
    assert r["rlp_k"] == 6 and "rlp_nmi[colour&background]" in r and "fewshot_4way_1shot" in r
    assert "RLP: k-means k=6" in r["protocol"] and "few-shot: 20 seeded 4way_1shot" in r["protocol"]
    assert all(0.0 <= r[f"rlp_nmi[{c}]"] <= 1.0 for c in ("shape", "colour", "background"))


def test_cli_rlp_needs_concepts_and_longtail_needs_lt(capsys):
    from zoo.cli import main

    assert main(["eval", "simclr_convnet_mnist5k", "--data", "digits", "--protocol", "rlp", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'digits' has no concept labels" in err and "shapes" in err
    assert main(["eval", "simclr_convnet_mnist5k", "--data", "digits", "--protocol", "longtail", "--quiet"]) == 2
    assert "long-tailed dataset" in capsys.readouterr().err


def test_evaluate_features_longtail_keys():
    from zoo.eval import knn_predict, shot_accuracy

    rng = np.random.default_rng(0)
    counts = [150, 60, 30, 10]
    y_train = np.repeat(np.arange(4), counts)
    y_test = np.repeat(np.arange(4), 25)
    centers = rng.normal(size=(4, 8)) * 1.5
    train = {"features": centers[y_train] + rng.normal(size=(y_train.size, 8)), "labels": y_train}
    test = {"features": centers[y_test] + rng.normal(size=(y_test.size, 8)), "labels": y_test}
    r = evaluate_features(train, test, protocols="longtail")
    expect = shot_accuracy(knn_predict(train["features"], y_train, test["features"]), y_test, counts)
    assert r["lt_knn_top1"] == expect["overall"] and r["lt_knn_few"] == expect["few"]
    assert (r["lt_num_many"], r["lt_num_medium"], r["lt_num_few"]) == (1, 2, 1)
    assert {"lt_linear_top1", "lt_linear_many", "lt_linear_medium", "lt_linear_few"} <= set(r)
