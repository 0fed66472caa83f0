"""Model folders (HF layout), atomic writes, clear errors, pickle-free training states."""

import json
import pickle

import numpy as np
import pytest
import torch
import yaml

import zoo
from zoo.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_model_folder,
    load_state,
    save_model_folder,
    save_state,
)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = zoo.create_model("convnet_tiny", num_clusters=4).eval()
    m.pretrained_cfg["metrics"] = {"knn_top1": 0.91, "kmeans_acc": 0.5}
    m.pretrained_cfg["license"] = "Apache-2.0"
    return m


def test_roundtrip_same_outputs(model, tmp_path):
    folder = save_model_folder(model, tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = load_model_folder(folder)
    x = torch.randn(5, 3, 28, 28)
    torch.testing.assert_close(loaded.embed(x), model.embed(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded.predict_cluster(x), model.predict_cluster(x), rtol=0, atol=0)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "convnet_tiny" and config["num_clusters"] == 4
    assert config["metrics"]["knn_top1"] == 0.91
    # create_model / zoo.load accept a folder too
    torch.testing.assert_close(zoo.create_model(str(folder)).embed(x), model.embed(x))
    torch.testing.assert_close(zoo.load(str(folder)).embed(x), model.embed(x))


def test_model_card_metadata_and_metrics_table(model, tmp_path):
    folder = save_model_folder(model, tmp_path / "m")
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "selfsup-zoo" and meta["license"] == "apache-2.0"
    values = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert values == {"knn_top1": 0.91, "kmeans_acc": 0.5}
    assert "| kNN top-1 (`knn_top1`) | 0.9100 |" in text


def test_truncated_weights_named_in_error(model, tmp_path):
    folder = save_model_folder(model, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated or corrupt"):
        load_model_folder(folder)


def test_mismatched_weights_report_keys_and_shapes(model, tmp_path):
    folder = save_model_folder(model, tmp_path / "m")
    other = zoo.create_model("convnet_tiny", widths=(8, 16, 64))
    save_model_folder(other, tmp_path / "other")
    # weights of a wider model under this config
    (folder / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError) as err:
        load_model_folder(folder)
    msg = str(err.value)
    assert "model.safetensors" in msg and "shape mismatch" in msg and "missing keys" in msg
    assert "cluster_head.heads" in msg  # the missing cluster head, grouped by prefix


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="model folder not found"):
        load_model_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        load_model_folder(tmp_path / "empty")


def test_pickle_file_is_refused(model, tmp_path):
    folder = save_model_folder(model, tmp_path / "m")

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (folder / "model.safetensors").write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(CheckpointError):
        load_model_folder(folder)
    assert not (tmp_path / "pwned").exists()


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    from zoo.checkpoint import atomic_write

    def failing(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp file left behind


def test_training_state_roundtrip(tmp_path):
    import random

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "model": net.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 7,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "names": ("a", "b.c"),
    }
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert back["step"] == 7 and back["names"] == ("a", "b.c")
    torch.testing.assert_close(back["model"]["weight"], net.weight.detach())
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    opt2.load_state_dict(back["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    np.random.set_state(tuple(back["rng"]["numpy"]))
    expected = np.random.rand()
    np.random.set_state(state["rng"]["numpy"])
    assert np.random.rand() == expected


def test_strict_load_names_each_missing_key_not_its_group():
    import pytest
    import torch

    from zoo.checkpoint import CheckpointError, load_state_dict_strict

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = dict(model.state_dict())
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_strict(model, state, "f.safetensors")
    msg = str(e.value)
    assert "missing keys (1) 0.bias" in msg and "unexpected keys (1) extra.weight" in msg
