"""Every official ``url:`` entry through ``torch.hub.load``: its file in the official layout -> importer -> model.

For each entry the test writes a checkpoint with the entry's real architecture (random weights) in the
key layout of the official release, places it where torch.hub would have downloaded it, and loads
the entry by name through ``hubconf.py``. The real importer converts it once into the zoo cache and
the loaded model gives the source network's features. No network: a download attempt fails the test.
"""

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import zoo
from tests.test_convert import DinoViT, ScanClusteringModel, _prefixed, _randomize
from zoo.registry import hub_checkpoint_path

REPO = Path(__file__).resolve().parents[1]
# CLIP releases (TorchScript archives, open_clip state dicts) are covered by tests/test_clip_models.py
OFFICIAL = [n for n in zoo.list_models() if (zoo.model_info(n)["weights_source"] or "").startswith("url:")
            and zoo.model_info(n)["architecture"] not in zoo.clip.CLIP_ARCHES]


def _resnet50(seed: int) -> nn.Module:
    net = torchvision.models.resnet50()
    net.fc = nn.Identity()
    return _randomize(net, seed).eval()


def _mlp(dims: list[int], seed: int) -> dict:
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [nn.Linear(a, b)] + ([nn.BatchNorm1d(b), nn.ReLU()] if i < len(dims) - 2 else [])
    return _randomize(nn.Sequential(*layers), seed).state_dict()


def official_file(name: str, seed: int) -> tuple[object, nn.Module, int]:
    """(what the official file holds, the network whose features the zoo model must give, input size)."""
    fmt, arch = zoo.model_info(name)["convert_format"], zoo.model_info(name)["architecture"]
    if fmt == "moco":  # facebookresearch/moco: encoder_q under module., MLP fc, queue, optimizer state
        net = _resnet50(seed)
        state = _prefixed("module.encoder_q.", {k: v for k, v in net.state_dict().items() if not k.startswith("fc")})
        fc = {"0.weight": torch.randn(64, 2048), "0.bias": torch.zeros(64), "2.weight": torch.randn(16, 64),
              "2.bias": torch.zeros(16)}
        state.update(_prefixed("module.encoder_q.fc.", fc))
        state.update({"module.queue": torch.randn(16, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
        state.update(_prefixed("module.encoder_k.", {k: v.clone() for k, v in net.state_dict().items()}))
        return {"epoch": 800, "arch": "resnet50", "state_dict": state}, net, 64
    if fmt in ("swav", "deepcluster_v2", "sela_v2"):  # bare state dict, module. prefix, head + prototypes
        net = _resnet50(seed)
        state = _prefixed("module.", net.state_dict())
        state.update(_prefixed("module.projection_head.", _mlp([2048, 64, 16], seed + 1)))
        if fmt == "swav":
            state["module.prototypes.weight"] = torch.randn(30, 16)
        else:
            state.update({f"module.prototypes.prototypes{i}.weight": torch.randn(30, 16) for i in range(3)})
        return state, net, 64
    if fmt == "dino":  # plain backbone state dict with timm-style ViT keys
        dim, heads = {"vit_s16": (384, 6), "vit_b16": (768, 12)}[arch]
        torch.manual_seed(seed)
        net = _randomize(DinoViT(img_size=224, dim=dim, heads=heads), seed).eval()
        return net.state_dict(), net, 224
    if fmt == "scan":  # SCAN: backbone.* + cluster_head.N.*; scan step {"model", "head": best}, selflabel bare
        info = zoo.model_info(name)
        heads = 1 if "selflabel" in name else 3
        net = _randomize(ScanClusteringModel(nclusters=info["num_clusters"], nheads=heads), seed).eval()
        best = heads - 1
        net.forward = lambda x: net.backbone(x)
        net.cluster_probs = lambda x: net.cluster_head[best](net.backbone(x)).softmax(dim=1)
        if heads == 1:
            return net.state_dict(), net, 32
        return {"model": net.state_dict(), "head": best}, net, 32
    raise AssertionError(f"{name}: no official layout written for format {fmt!r}")


@pytest.fixture()
def offline_caches(monkeypatch, tmp_path):
    def refuse(url, dst, *args, **kwargs):
        raise AssertionError(f"download attempted: {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "zoo"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path


def test_all_official_entries_are_covered():
    assert len(OFFICIAL) == 10 and {zoo.model_info(n)["convert_format"] for n in OFFICIAL} == {
        "moco", "swav", "deepcluster_v2", "sela_v2", "dino", "scan"}


@pytest.mark.parametrize("name", OFFICIAL)
def test_torch_hub_load_official_entry(name, offline_caches):
    payload, net, size = official_file(name, seed=len(name))
    url = zoo.model_info(name)["weights_source"][len("url:"):]
    checkpoint = hub_checkpoint_path(url, zoo.model_info(name)["checkpoint_name"])
    checkpoint.parent.mkdir(parents=True)
    torch.save(payload, checkpoint)  # as torch.hub.download_url_to_file would have left it
    del payload

    model = torch.hub.load(str(REPO), name, source="local", trust_repo=True).eval()  # pretrained=True default
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(model.forward_features(x), expected, rtol=0, atol=1e-5)
    if hasattr(net, "cluster_probs"):  # SCAN: the file's best head predicts the clusters
        with torch.no_grad():
            torch.testing.assert_close(model.predict_cluster(x), net.cluster_probs(x), rtol=0, atol=1e-5)
    info = zoo.model_info(name)
    assert model.pretrained_cfg["license"] == info["license"] and model.pretrained_cfg["metrics"] == info["metrics"]
    folder = offline_caches / "zoo" / "models" / name
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()

    checkpoint.unlink()  # converted once: from now on the zoo cache alone is enough
    again = zoo.create_model(name, pretrained=True).eval()
    torch.testing.assert_close(again.forward_features(x), expected, rtol=0, atol=1e-5)
