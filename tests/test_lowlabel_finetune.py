"""Low-label fine-tuning (zoo/eval/finetune.py) and ``zoo eval --protocol lowlabel --lowlabel-mode``."""

import json

import numpy as np
import pytest
import torch

from zoo.checkpoint import save_model_folder
from zoo.cli import main
from zoo.data import transform_for
from zoo.data.base import InMemoryImageDataset
from zoo.eval import extract_features
from zoo.eval import finetune as finetune_module
from zoo.eval.finetune import finetune, finetune_lowlabel
from zoo.eval.lowlabel import evaluate_lowlabel, lowlabel_indices
from zoo.model import ZooModel

CFG = {"name": "tiny_bars", "input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 1.0,
       "interpolation": "bilinear"}


def _model() -> ZooModel:
    torch.manual_seed(0)
    return ZooModel("convnet_tiny", {"widths": [8, 16]}, pretrained_cfg=CFG)


def _bars(n: int, seed: int, model: ZooModel) -> InMemoryImageDataset:
    """Separable by orientation: a horizontal (class 0) or vertical (class 1) bright bar, anywhere, on noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.integers(100, 156, (n, 3, 16, 16))
    for i in range(n):
        r, c = rng.integers(2, 12, 2)
        if y[i] == 0:
            x[i, :, r, c - 2:c + 3] += 80
        else:
            x[i, :, r - 2:r + 3, c] += 80
    images = torch.tensor(np.clip(x, 0, 255), dtype=torch.uint8)
    return InMemoryImageDataset("bars", "train", images, y, ["h", "v"], transform_for(model))


def test_finetune_trains_the_backbone_and_beats_the_frozen_random_probe_on_the_same_subset(monkeypatch):
    model = _model()
    train, test = _bars(1000, 0, model), _bars(400, 1, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stacked: list[np.ndarray] = []
    real_stack = finetune_module._stack
    monkeypatch.setattr(finetune_module, "_stack", lambda ds, idx: stacked.append(np.asarray(idx)) or real_stack(ds, idx))
    got = finetune_lowlabel(model, train, test, fractions=(0.1,), steps=60)
    # the subset the fine-tuning saw is the linear mode's, fixed by (labels, fraction, seed)
    assert len(stacked) == 1 and np.array_equal(stacked[0], lowlabel_indices(train.targets, 0.1, seed=0))
    frozen = evaluate_lowlabel(extract_features(model, train, progress=False),
                               extract_features(model, test, progress=False), fractions=(0.1,))
    assert got["lowlabel_10pct_n"] == frozen["lowlabel_10pct_n"] == 100
    # the random encoder's features carry part of the orientation; training the encoder takes it all
    assert got["lowlabel_10pct_finetune"] > 0.95 and got["lowlabel_10pct_finetune"] > frozen["lowlabel_10pct_linear"] + 0.05
    for key, value in model.state_dict().items():  # the model passed in is untouched ...
        assert torch.equal(value, before[key]), key
    images = torch.stack([train[i][0] for i in range(64)])
    labels = torch.as_tensor(train.targets[:64])
    encoder, head = finetune(model, images, labels, 2, steps=3)
    first = "backbone.features.0.weight"
    assert (encoder.state_dict()[first] - before[first]).abs().max() > 1e-4  # ... its copy's backbone moved
    assert head.weight.shape == (2, 16) and not encoder.training
    # deterministic by seed: the same call gives the same weights
    again, _ = finetune(model, images, labels, 2, steps=3)
    assert torch.equal(again.state_dict()[first], encoder.state_dict()[first])


def test_finetune_rejects_bad_options():
    model = _model()
    x, y = torch.zeros(4, 3, 16, 16), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="optimizer"):
        finetune(model, x, y, 2, optimizer="lbfgs")
    with pytest.raises(ValueError, match="steps"):
        finetune(model, x, y, 2, steps=0)
    with pytest.raises(ValueError, match="matching"):
        finetune(model, x, y[:2], 2)
    with pytest.raises(ValueError, match="unknown fine-tuning option"):
        finetune_lowlabel(model, None, None, epochs=3)


def test_cli_lowlabel_modes(tmp_path, capsys):
    folder = save_model_folder(_model(), tmp_path / "m")
    common = ["eval", str(folder), "--data", "digits", "--protocol", "lowlabel", "--fractions", "0.05", "--quiet"]
    assert main([*common, "--lowlabel-mode", "both", "--finetune-steps", "5", "--json", str(tmp_path / "b.json")]) == 0
    both = json.loads((tmp_path / "b.json").read_text())
    assert {"lowlabel_5pct_linear", "lowlabel_5pct_knn", "lowlabel_5pct_finetune"} <= set(both)
    assert 0 <= both["lowlabel_5pct_finetune"] <= 1 and "fine-tune" in both["protocol"]
    assert main([*common, "--lowlabel-mode", "finetune", "--finetune-steps", "5", "--json", str(tmp_path / "f.json")]) == 0
    ft = json.loads((tmp_path / "f.json").read_text())
    assert "lowlabel_5pct_linear" not in ft and ft["lowlabel_5pct_finetune"] == both["lowlabel_5pct_finetune"]
    assert ft["lowlabel_5pct_n"] == both["lowlabel_5pct_n"]
    with pytest.raises(SystemExit):
        main([*common, "--lowlabel-mode", "semi"])
    assert "invalid choice" in capsys.readouterr().err
