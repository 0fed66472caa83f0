"""The `zoo` command: list, info, train, eval, --help everywhere."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zoo.cli import build_parser, main


def test_every_command_has_help_with_example(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"list", "info", "eval", "train"} <= set(sub.choices)
    for name, p in sub.choices.items():
        assert "example" in (p.epilog or ""), f"zoo {name} --help has no example"


def test_list_and_info(capsys):
    assert main(["list", "resnet*"]) == 0
    out = capsys.readouterr().out
    assert "resnet18_cifar" in out and "convnet" not in out
    assert main(["info", "resnet18_cifar"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_size"] == [3, 32, 32] and info["arch_kwargs"] == {"cifar_stem": True}


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["info", "resnet_18"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_train_then_eval_a_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--method", "simclr", "--data", "digits", "--backbone", "convnet_tiny",
                 "--backbone-kwargs", '{"widths": [8, 16]}', "--method-kwargs", '{"proj_hidden_dim": 32}',
                 "--batch-size", "128", "--max-steps", "2", "--epochs", "1", "--out", str(out), "--quiet",
                 "--no-eval"])
    assert code == 0
    folder = out / "model"
    assert (folder / "model.safetensors").is_file()
    capsys.readouterr()
    metrics_file = tmp_path / "m.json"
    assert main(["eval", str(folder), "--protocol", "knn,kmeans", "--json", str(metrics_file), "--quiet",
                 "--write-metrics"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads(metrics_file.read_text())
    assert set(metrics) >= {"knn_top1", "kmeans_acc", "kmeans_nmi", "kmeans_ari"}
    assert f"{metrics['knn_top1']:.4f}" in printed
    config = json.loads((folder / "config.json").read_text())
    assert config["metrics"]["knn_top1"] == metrics["knn_top1"]
    assert "k-means ACC" in (folder / "README.md").read_text()


def _console_script() -> str | None:
    """The installed ``zoo`` script: beside this interpreter (``.venv/bin/python -m pytest`` with the venv
    not on PATH), else on PATH."""
    beside = Path(sys.executable).parent / ("zoo.exe" if os.name == "nt" else "zoo")
    return str(beside) if beside.is_file() else shutil.which("zoo")


@pytest.mark.skipif(_console_script() is None, reason="console script not installed (scripts/setup.sh installs it)")
def test_console_script():
    result = subprocess.run([_console_script(), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--resume" in result.stdout


def test_module_entry_runs():
    result = subprocess.run([sys.executable, "-m", "zoo.cli", "list", "--pretrained"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_train_help_lists_every_registered_method():
    from train.cli import METHOD_NAMES
    from train.methods import METHODS

    assert set(METHOD_NAMES) == set(METHODS)


def test_resolve_model_is_the_one_model_argument_resolver(tmp_path):
    import torch

    import zoo
    from zoo.cli import load_model_arg

    shipped = zoo.resolve_model("simclr_convnet_mnist5k")  # a registered name with weights: pretrained
    ref = zoo.create_model("simclr_convnet_mnist5k", pretrained=True)
    x = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(shipped.eval().forward_features(x), ref.eval().forward_features(x))
    assert zoo.resolve_model("convnet_tiny").pretrained_cfg["weights_source"] is None  # no weights: fresh init
    folder = zoo.save_model_folder(ref, tmp_path / "m")
    assert load_model_arg(str(folder)).pretrained_cfg["name"] == "simclr_convnet_mnist5k"  # the alias
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        zoo.resolve_model(tmp_path / "empty")
