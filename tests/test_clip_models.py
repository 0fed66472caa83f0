"""CLIP entries: each architecture with random weights, saved in its release's own file layout
(OpenAI: a TorchScript archive with fp16 weights; LAION: an open_clip safetensors state dict), loaded
through the registry's download-once path, must give open_clip's own features (atol 1e-5).

By default each registry entry is exercised with a narrow copy of its open_clip config (same family:
modified ResNet / ViT, QuickGELU or not; fewer, thinner layers) so the file stays fast on 2 cores.
``ZOO_TEST_FULL_CLIP=1`` runs the real RN50 / ViT-B/32 / ViT-B/16 architectures (about 3 minutes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

import zoo  # noqa: E402
from zoo.checkpoint import CheckpointError  # noqa: E402
from zoo.convert.clip import read_torchscript_tensors  # noqa: E402
from zoo.registry import CLIP_MODELS, get_entry, hub_checkpoint_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("ZOO_TEST_FULL_CLIP") == "1"
_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}
_NARROW = {  # open_clip configs of the same families, narrow; heads follow open_clip's 64-wide head rule
    "RN50-quickgelu": {"embed_dim": 32, "quick_gelu": True, "text_cfg": _TEXT,
                       "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None}},
    "ViT-B-32-quickgelu": {"embed_dim": 32, "quick_gelu": True, "text_cfg": _TEXT,
                           "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 32}},
    "ViT-B-16-quickgelu": {"embed_dim": 32, "quick_gelu": True, "text_cfg": _TEXT,
                           "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16}},
    "ViT-B-32": {"embed_dim": 32, "text_cfg": _TEXT,
                 "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 32}},
}
TEXTS = ["a photo of a dog", "a diagram", "two red triangles on a striped background"]


@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "zoo"))
    # torch.hub.set_dir(get_dir()) afterwards would pin the hub dir for the whole session (TORCH_HOME ignored)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    yield tmp_path


def _random_open_clip(model_name: str) -> torch.nn.Module:
    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None).eval()
    with torch.no_grad():  # non-trivial values for parameters that start as constants
        model.logit_scale.fill_(3.0)
    return model


def _image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size if isinstance(size, int) else size[0])


def _write_openai_archive(model: torch.nn.Module, path: Path) -> None:
    """OpenAI's layout: a scripted CLIP, weights in fp16, with its input resolution as a tensor."""
    from open_clip.model import convert_weights_to_lp

    convert_weights_to_lp(model, torch.float16)
    model.register_buffer("input_resolution", torch.tensor(_image_size(model)))
    mask = model._buffers.pop("attn_mask")  # OpenAI's causal mask is a plain attribute, not in the state dict
    object.__setattr__(model, "attn_mask", mask)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(model).save(str(path))


def _inputs(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, size, size, generator=g), open_clip.get_tokenizer("ViT-B-32")(TEXTS)


@pytest.fixture
def entry_for(tmp_path, monkeypatch):
    """The registry entry to exercise: the real one (FULL) or a copy whose open_clip config is narrow."""

    def make(spec: dict):
        entry = get_entry(spec["name"])
        if FULL:
            return entry, spec["model_name"]
        narrow = f"narrow-{spec['model_name']}"
        path = tmp_path / f"{narrow}.json"
        path.write_text(json.dumps(_NARROW[spec["model_name"]]))
        open_clip.add_model_config(path)
        copy = dataclasses.replace(entry, arch_kwargs={"model_name": narrow})
        monkeypatch.setitem(zoo.registry._REGISTRY, entry.name, copy)
        return copy, narrow

    return make


@pytest.mark.parametrize("spec", CLIP_MODELS, ids=[s["name"] for s in CLIP_MODELS])
def test_release_layout_loads_through_registry(spec, caches, entry_for):
    entry, model_name = entry_for(spec)
    checkpoint = hub_checkpoint_path(entry.weights[4:], entry.checkpoint_name)
    model = _random_open_clip(model_name)
    if spec["fmt"] == "openai_clip":
        _write_openai_archive(model, checkpoint)
        assert zipfile.is_zipfile(checkpoint) and "constants.pkl" in " ".join(zipfile.ZipFile(checkpoint).namelist())
        reference = open_clip.load_openai_model(str(checkpoint), precision="fp32", device="cpu")  # torch.jit.load
    else:
        from safetensors.torch import save_file

        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
        reference = open_clip.create_model(model_name, pretrained=str(checkpoint))
    reference.eval()

    ours = zoo.create_model(spec["name"], pretrained=True)  # converts once into $ZOO_CACHE/models/<name>
    folder = Path(caches / "zoo" / "models" / spec["name"])
    assert (folder / "model.safetensors").is_file()
    check = json.loads((folder / "config.json").read_text())["conversion_check"]  # the importers' self-check
    n_model = len(reference.state_dict())
    assert check["ok"] and check["from_file"] == check["target_tensors"] == n_model and not check["left_behind"]
    checkpoint.unlink()  # offline from now on: the converted folder is all that is needed
    again = zoo.create_model(spec["name"], pretrained=True)

    images, tokens = _inputs(_image_size(reference))
    with torch.no_grad():
        ref_img = reference.encode_image(images, normalize=True)
        ref_txt = reference.encode_text(tokens, normalize=True)
    for m in (ours, again):
        assert isinstance(m, zoo.clip.ClipModel)
        torch.testing.assert_close(m.embed(images), ref_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(m.embed_text(TEXTS), ref_txt, atol=1e-5, rtol=0)
        assert m.embed_text(TEXTS).norm(dim=1).sub(1).abs().max() < 1e-5
    cfg = again.pretrained_cfg
    assert cfg["license"] == spec["license"] and cfg["metrics"]["zeroshot_top1"] == spec["top1"]
    assert cfg["tokenizer"] == {"type": "open_clip", "context_length": 77}
    assert cfg["interpolation"] == "bicubic" and cfg["mean"] == list(zoo.clip.OPENAI_MEAN)
    saved = zoo.checkpoint.read_config(folder)  # the folder documents its tokenizer and preprocessing
    assert saved["tokenizer"]["type"] == "open_clip" and saved["input_size"] == [3, 224, 224]
    assert saved["arch_kwargs"] == {"model_name": model_name}


def test_torchscript_reader_names_match_state_dict(tmp_path, entry_for):
    _, model_name = entry_for(CLIP_MODELS[0])
    model = _random_open_clip(model_name)
    path = tmp_path / "RN50.pt"
    _write_openai_archive(model, path)
    tensors = read_torchscript_tensors(path)
    expected = torch.jit.load(str(path)).state_dict()  # the test may run the archive; the loader never does
    assert set(expected) <= set(tensors)
    for key, value in expected.items():
        assert tensors[key].dtype == value.dtype and torch.equal(tensors[key], value), key


def test_torchscript_reader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(Evil(), protocol=2))
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(CheckpointError, match="refused global .*print"):
        read_torchscript_tensors(path)
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a zip"):
        read_torchscript_tensors(tmp_path / "junk.pt")


def test_random_init_and_hub_entries(entry_for):
    _, name = entry_for(CLIP_MODELS[1])
    m = zoo.create_model("clip_vitb32_openai")  # architecture only: nothing downloads
    assert isinstance(m, zoo.clip.ClipModel) and m.num_features == (512 if FULL else 32)
    assert not m.pretrained_cfg["metrics"] and m.pretrained_cfg["arch_kwargs"] == {"model_name": name}
    _, name = entry_for(CLIP_MODELS[3])
    hub = torch.hub.load(str(ROOT), "clip_vitb32_laion2b", source="local", pretrained=False)
    assert isinstance(hub, zoo.clip.ClipModel) and hub.pretrained_cfg["arch_kwargs"]["model_name"] == name
    tok = m.tokenize(["word " * 100, "short"])
    assert tok.truncated == [True, False] and tok.ids.shape == (2, 77)
    with pytest.raises(ValueError, match="text 1 is empty"):
        m.embed_text(["ok", "  "])
