"""SimCLR loss, augmentation, the trainer's determinism, resume and checkpoints."""

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from train.augment import AugmentConfig, ViewAugment, gaussian_blur, random_resized_crop
from train.methods import get_method
from train.methods.simclr import nt_xent_loss
from train.trainer import TrainConfig, Trainer, lr_at
from zoo.checkpoint import load_model_folder

from .method_checks import check_resume_bit_exact, check_two_steps_lower_loss, tiny_cfg


def nt_xent_reference(z1, z2, tau):
    """NT-Xent written out anchor by anchor (Chen et al. 2020, eq. 1)."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2])]
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        num = math.exp(float(z[i] @ z[pos]) / tau)
        den = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n) if k != i)
        total += -math.log(num / den)
    return total / n


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_reference(tau):
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    assert nt_xent_loss(z1, z2, tau).item() == pytest.approx(nt_xent_reference(z1, z2, tau), rel=1e-5)


def test_nt_xent_worked_number():
    # Two images, orthogonal unit embeddings, views identical: each anchor sees its positive at
    # cosine 1 and two negatives at cosine 0 -> loss = -log(e^(1/t) / (e^(1/t) + 2)).
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    tau = 0.5
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert nt_xent_loss(z1, z1.clone(), tau).item() == pytest.approx(expected, rel=1e-6)


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)


def test_augment_is_reproducible_and_random():
    x = torch.rand(6, 3, 16, 16)
    aug = ViewAugment(AugmentConfig(size=12, blur_p=0.5, solarize_p=0.3))
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 12, 12)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_full_crop_is_identity():
    # scale 1, ratio 1, no rotation or flip: the crop must give back the image itself.
    x = torch.rand(2, 3, 10, 10)
    cfg = AugmentConfig(size=10, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    out = random_resized_crop(x, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    flipped = random_resized_crop(x, AugmentConfig(size=10, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0),
                                  torch.Generator().manual_seed(0))
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)


def test_blur_preserves_constant_image_and_mean():
    x = torch.full((3, 3, 12, 12), 0.3)
    torch.testing.assert_close(gaussian_blur(x, 1.0, torch.Generator().manual_seed(0)), x)
    y = torch.rand(2, 3, 12, 12)
    blurred = gaussian_blur(y, 1.0, torch.Generator().manual_seed(0))
    assert blurred.std() < y.std()


def test_two_steps_lower_the_loss(tmp_path):
    check_two_steps_lower_loss(tmp_path, lr=0.05, method_kwargs={"proj_hidden_dim": 32, "proj_dim": 16})


def test_resume_is_bit_exact(tmp_path):
    check_resume_bit_exact(tmp_path, method_kwargs={"proj_hidden_dim": 32, "proj_dim": 16})


def test_keeps_last_checkpoints_and_falls_back_from_corrupt(tmp_path):
    trainer = Trainer(tiny_cfg(max_steps=4, ckpt_every=1, keep_checkpoints=2), tmp_path, progress=False)
    trainer.fit()
    ckpts = sorted((tmp_path / "checkpoints").glob("*.safetensors"))
    assert [p.name for p in ckpts] == ["step_00000003.safetensors", "step_00000004.safetensors"]
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:100])  # corrupt the newest
    again = Trainer(tiny_cfg(max_steps=4, ckpt_every=1), tmp_path, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = again.resume()
    assert path == ckpts[0] and again.step == 3
    assert any("step_00000004" in str(w.message) for w in caught)


def test_export_writes_loadable_model_folder_with_metrics(tmp_path):
    trainer = Trainer(tiny_cfg(max_steps=2, eval_protocols=["knn", "kmeans"]), tmp_path, progress=False)
    trainer.fit()
    folder = trainer.export(evaluate=True)
    model = load_model_folder(folder)
    cfg = model.pretrained_cfg
    assert cfg["method"] == "simclr" and cfg["dataset"] == "digits" and cfg["input_size"] == [3, 8, 8]
    assert 0.0 <= cfg["metrics"]["knn_top1"] <= 1.0 and "kmeans_nmi" in cfg["metrics"]
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(model.embed(x), trainer.method.model.eval().embed(x))
    assert (tmp_path / "log.csv").read_text().startswith("step,epoch,lr,time,loss")


def test_unknown_method_and_recipe_fields(tmp_path):
    with pytest.raises(ValueError, match="simclr"):
        get_method("simclrr")
    bad = tmp_path / "r.yaml"
    bad.write_text("method: simclr\nepoch: 3\n")
    with pytest.raises(ValueError, match="unknown recipe fields"):
        TrainConfig.from_yaml(bad)


def test_shipped_recipe_loads():
    from pathlib import Path

    recipe = Path(__file__).parents[1] / "train" / "recipes" / "simclr_mnist5k.yaml"
    cfg = TrainConfig.from_yaml(recipe)
    assert cfg.method == "simclr" and cfg.data == "mnist5k" and cfg.expected_metrics["knn_top1"] >= 0.95


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "train" / "recipes").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_recipe_is_valid(recipe):
    """Each recipe parses, names a registered method and dataset, and its kwargs fit the method."""
    import inspect

    from train.augment import AugmentConfig
    from zoo.data import list_datasets

    cfg = TrainConfig.from_yaml(recipe)
    # <method>_<data>.yaml, or a named variant of it: <method>_<data>_<variant>.yaml (e.g. _bgaug)
    assert recipe.stem == f"{cfg.method}_{cfg.data}" or recipe.stem.startswith(f"{cfg.method}_{cfg.data}_bgaug")
    assert cfg.data in list_datasets()
    inspect.signature(get_method(cfg.method)).bind(None, **cfg.method_kwargs)
    AugmentConfig.from_dict(cfg.augment)


def test_log_grows_columns_and_appends_on_resume(tmp_path):
    import csv

    from train.trainer import LogWriter

    log = LogWriter(tmp_path / "log.csv")
    log.write({"step": 1, "loss": 2.0})
    log.write({"step": 2, "loss": 1.5, "confident": 0.3})
    log.close()
    again = LogWriter(tmp_path / "log.csv", append=True)
    again.write({"step": 3, "loss": 1.0, "confident": 0.5})
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["confident"] == "" and rows[2]["confident"] == "0.5"


def test_schedule_restarts_at_method_segments(tmp_path):
    # SCAN restarts the cosine schedule when self-labelling begins (epoch 1 of 2 here).
    cfg = tiny_cfg(method="scan", epochs=2, batch_size=256, warmup_epochs=0, lr=0.04,
                   method_kwargs={"num_heads": 1, "num_neighbors": 3, "selflabel_epochs": 1, "restart_schedule": True})
    trainer = Trainer(cfg, tmp_path, progress=False)
    spe = trainer.steps_per_epoch
    lrs = []
    for step in range(2 * spe):
        trainer.step = step
        lrs.append(trainer.set_lr())
    base = 0.04 * 256 / 256
    expected = [lr_at(s, spe, 0, base) for s in range(spe)] * 2
    assert lrs == pytest.approx(expected)
    assert lrs[spe] == pytest.approx(base)  # back to the top after the restart
