"""The leaderboard (table = `zoo eval` of each model, cache, docs block, cards) and the eval plots."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.cli import main

SHIPPED = ("carl_convnet_mnist5k", "clip_convnet_shapes", "scan_convnet_mnist5k", "simclr_convnet_mnist5k")
PNG = b"\x89PNG\r\n\x1a\n"


def _png_ok(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100


@pytest.fixture()
def offline_caches(tmp_path, monkeypatch):
    """Empty zoo and torch hub caches: no official checkpoint is available offline."""
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "zoo_cache"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_leaderboard_rows_equal_zoo_eval(tmp_path, offline_caches, capsys):
    import zoo

    out = tmp_path / "lb"
    shipped_configs = {n: Path(zoo.registry.WEIGHTS_DIR) / n / "config.json" for n in SHIPPED}
    before = {n: _sha(p) for n, p in shipped_configs.items()}
    docs = tmp_path / "bench.md"
    docs.write_text("# Bench\n\nintro\n\n<!-- leaderboard:digits start -->\nold table\n"
                    "<!-- leaderboard:digits end -->\n\n## After\n\nkept\n")
    args = ["leaderboard", "--data", "digits", "--protocols", "knn", "--out", str(out), "--quiet",
            "--update-docs", "--docs", str(docs), "--update-cards"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "skipped dino_vits16_in1k: official weights not available offline" in captured.err
    board = json.loads((out / "leaderboard_digits.json").read_text())
    assert [r["model"] for r in board["rows"]] and {r["model"] for r in board["rows"]} == set(SHIPPED)
    assert board["sort"] == "knn_top1"
    knn = [r["metrics"]["knn_top1"] for r in board["rows"]]
    assert knn == sorted(knn, reverse=True)
    assert {s["model"] for s in board["skipped"]} >= {"dino_vits16_in1k", "swav_resnet50_in1k"}

    md = (out / "leaderboard_digits.md").read_text()
    for row in board["rows"]:
        name = row["model"]
        f = tmp_path / f"{name}.json"
        assert main(["eval", name, "--data", "digits", "--protocol", "knn", "--json", str(f), "--quiet"]) == 0
        single = json.loads(f.read_text())
        numeric = {k: v for k, v in single.items() if isinstance(v, float)}
        assert numeric == {k: v for k, v in row["metrics"].items() if isinstance(v, float)}
        line = next(ln for ln in md.splitlines() if f"`{name}`" in ln)
        assert f"| {single['knn_top1']:.3f} |" in line
        if "head_acc" in single:
            assert f"| {single['head_acc']:.3f} |" in line

    # the docs block was replaced, the rest of the file kept; a second update is idempotent
    text = docs.read_text()
    assert "old table" not in text and text.startswith("# Bench\n\nintro\n\n<!-- leaderboard:digits start -->")
    assert text.endswith("<!-- leaderboard:digits end -->\n\n## After\n\nkept\n") and md.strip() in text
    # shipped folders are inside the installed package: never written
    assert {n: _sha(p) for n, p in shipped_configs.items()} == before
    assert "inside the installed package" in captured.out

    # resumable: the second run reads the per-model cache
    assert main(args) == 0
    err = capsys.readouterr().err
    assert all(f"{n}: cached" in err for n in SHIPPED)
    assert docs.read_text() == text


def test_leaderboard_model_folders_and_cards(tmp_path, offline_caches, capsys):
    import zoo
    from zoo.eval.leaderboard import find_models

    folder = tmp_path / "runs" / "a" / "model"
    shutil.copytree(Path(zoo.registry.WEIGHTS_DIR) / "simclr_convnet_mnist5k", folder)
    old_metrics = json.loads((folder / "config.json").read_text())["metrics"]
    available, skipped = find_models(f"{tmp_path}/runs/*/model")
    assert [c.id for c in available] == [str(folder)] and not skipped
    with pytest.raises(ValueError, match="no model folder"):
        find_models(f"{tmp_path}/nothing/*/model")
    with pytest.raises(ValueError, match="matches no registered model"):
        find_models("nosuchmodel_*")

    docs = tmp_path / "bench.md"
    docs.write_text("# Bench\n")
    assert main(["leaderboard", "--data", "digits", "--protocols", "knn,fewshot", "--episodes", "20",
                 "--models", f"{folder},simclr_*", "--out", str(tmp_path / "lb"), "--quiet", "--update-cards",
                 "--update-docs", "--docs", str(docs)]) == 0
    board = json.loads((tmp_path / "lb" / "leaderboard_digits.json").read_text())
    rows = {r["model"]: r["metrics"] for r in board["rows"]}
    assert set(rows) == {str(folder), "simclr_convnet_mnist5k"}
    # the same weights give the same numbers, folder or registered name
    for key in ("knn_top1", "fewshot_5way_1shot", "fewshot_5way_5shot_ci95"):
        assert rows[str(folder)][key] == rows["simclr_convnet_mnist5k"][key]
    config = json.loads((folder / "config.json").read_text())
    assert config["evaluations"]["digits"]["knn_top1"] == rows[str(folder)]["knn_top1"]
    assert config["metrics"] == old_metrics  # trained on mnist5k, evaluated on digits: own metrics untouched
    card = (folder / "README.md").read_text()
    assert "## Evaluations" in card and f"{rows[str(folder)]['knn_top1']:.4f}" in card
    zoo.create_model(str(folder))  # still a loadable model folder
    text = docs.read_text()
    assert text.startswith("# Bench\n\n## Leaderboard: digits\n\n<!-- leaderboard:digits start -->")
    assert "± " in text and text.rstrip().endswith("<!-- leaderboard:digits end -->")


def test_update_docs_errors(tmp_path):
    from zoo.eval.leaderboard import update_docs

    with pytest.raises(FileNotFoundError):
        update_docs(tmp_path / "missing.md", "digits", "x")
    p = tmp_path / "d.md"
    p.write_text("<!-- leaderboard:digits start -->\nno end\n")
    with pytest.raises(ValueError, match="no matching"):
        update_docs(p, "digits", "x")


# ----------------------------------------------------------------------------- plots


def test_plot_functions_write_pngs(tmp_path):
    from zoo.data.base import InMemoryImageDataset
    from zoo.eval.plots import plot_cluster_gallery, plot_embedding_2d, plot_training_curves, read_log_csv

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 255, (30, 3, 16, 16), dtype=np.uint8))
    labels = np.arange(30) % 3
    ds = InMemoryImageDataset("toy", "test", images, labels, ["a", "b", "c"], None)
    _png_ok(plot_cluster_gallery(ds, (np.arange(30) % 4) * 10, tmp_path / "g.png", labels=labels,
                                 class_names=ds.classes, per_cluster=5))
    with pytest.raises(ValueError, match="29 cluster assignments"):
        plot_cluster_gallery(ds, np.zeros(29, int), tmp_path / "bad.png")
    log = tmp_path / "run" / "log.csv"
    log.parent.mkdir()
    log.write_text("step,epoch,lr,time,loss,stage,loss_head0\n10,0,0.001,1.0,4.5,2,\n20,1,0.002,2.0,3.9,2,1.0\n"
                   "30,2,0.0015,3.0,3.1,3,0.5\n")
    assert np.isnan(read_log_csv(log)["loss_head0"][0])
    _png_ok(plot_training_curves(log, tmp_path / "curves.png"))
    x = rng.normal(size=(60, 8)) + np.repeat(np.eye(8)[:3] * 4, 20, axis=0)
    _png_ok(plot_embedding_2d(x, np.repeat(np.arange(3), 20), tmp_path / "tsne.png", method="tsne"))


def test_eval_cli_plots(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("step,epoch,lr,time,loss\n10,0,0.001,1.0,4.5\n20,1,0.002,2.0,3.9\n")
    out = tmp_path / "plots"
    assert main(["eval", "scan_convnet_mnist5k", "--data", "digits", "--protocol", "none", "--plots", str(out),
                 "--run", str(run), "--quiet"]) == 0
    printed = [Path(line.split(" ", 1)[1]) for line in capsys.readouterr().out.splitlines()
               if line.startswith("wrote ")]
    names = {p.name for p in printed}
    assert names == {"embedding_tsne.png", "confusion_kmeans.png", "gallery_kmeans.png", "confusion_head.png",
                     "gallery_head.png", "training_curves.png"}
    for p in printed:
        _png_ok(p)
    assert main(["eval", "scan_convnet_mnist5k", "--protocol", "none"]) == 2
    assert main(["eval", "scan_convnet_mnist5k", "--plots", str(out), "--run", str(tmp_path / "no_run"),
                 "--protocol", "none", "--data", "digits", "--quiet"]) == 2
    assert "no training log" in capsys.readouterr().err
