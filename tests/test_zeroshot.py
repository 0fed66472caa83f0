"""The zero-shot protocol: per-dataset prompts, `zoo eval --protocol zeroshot`, JSON and model card."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

pytest.importorskip("open_clip")

import zoo  # noqa: E402
from zoo.cli import main  # noqa: E402
from zoo.eval.zeroshot import PROMPTS, class_prompts  # noqa: E402


def test_prompt_sets_per_dataset():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    for name in ("mnist5k", "shapes", "cifar10", "cifar100", "stl10", "imagenet"):
        assert name in PROMPTS
    cifar = class_prompts("cifar10", SimpleNamespace(classes=["airplane", "automobile"]))
    assert cifar["label"][0] == ["airplane", "automobile"] and len(cifar["label"][1]) == 18
    assert class_prompts("cifar100", SimpleNamespace(classes=["aquarium_fish"]))["label"][0] == ["aquarium fish"]
    assert class_prompts("mnist5k")["label"][1] == ('a photo of the number: "{}".',)
    names, templates = class_prompts("imagenet")["label"]
    assert len(names) == 1000 and len(templates) == 80 and templates[0] == "a bad photo of a {}."
    assert names[0] == IMAGENET_CLASSNAMES[0]
    wnids = SimpleNamespace(classes=[f"n{i:08d}" for i in range(1000)])  # an ImageNet val folder
    assert class_prompts("imagefolder", wnids)["label"][0][:2] == list(IMAGENET_CLASSNAMES[:2])
    pets = class_prompts("imagefolder", SimpleNamespace(classes=["golden_retriever", "tabby"]))["label"]
    assert pets[0] == ["golden retriever", "tabby"] and len(pets[1]) == 80
    from zoo.data import load_dataset

    shapes = class_prompts("shapes", load_dataset("shapes", "test", n_test=4))
    assert shapes["shape"][0] == ["circle", "square", "triangle", "cross"] and list(shapes)[0] == "shape"
    with pytest.raises(ValueError, match="no zero-shot prompts"):
        class_prompts("digitz")


def test_cli_writes_json_and_card(tmp_path, capsys):
    folder = tmp_path / "clip"
    shutil.copytree(zoo.registry.WEIGHTS_DIR / "clip_convnet_shapes", folder)
    out = tmp_path / "zs.json"
    assert main(["eval", str(folder), "--protocol", "zeroshot", "--data", "shapes", "--json", str(out),
                 "--write-metrics", "--quiet"]) == 0
    metrics = json.loads(out.read_text())
    recorded = zoo.create_model("clip_convnet_shapes", pretrained=True).pretrained_cfg["metrics"]
    assert metrics["zeroshot_top1"] == pytest.approx(recorded["zeroshot_top1[shape]"], abs=1e-6)
    assert 0 <= metrics["zeroshot_top1"] <= metrics["zeroshot_top5"] == 1.0  # 4 shapes: top-5 is every class
    assert "zero-shot" in metrics["protocol"] and "zeroshot_top1" in capsys.readouterr().out
    card = (folder / "README.md").read_text()
    assert "zero-shot top-1 (`zeroshot_top1`)" in card and f"{metrics['zeroshot_top1']:.4f}" in card
    assert json.loads((folder / "config.json").read_text())["metrics"]["zeroshot_top5"] == 1.0


def test_zeroshot_needs_a_text_tower(capsys):
    assert main(["eval", "simclr_convnet_mnist5k", "--protocol", "zeroshot", "--quiet"]) != 0
    assert "needs an image-text model" in capsys.readouterr().err
