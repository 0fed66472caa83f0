"""Every official ``url:`` entry through ``torch.hub.load``: its file in the official layout -> importer -> model.

For each entry the test writes a checkpoint with the entry's real architecture (random weights) in the
key layout of the official release, places it where torch.hub would have downloaded it, and loads
the entry by name through ``hubconf.py``. The real importer converts it once into the zoo cache and
the loaded model gives the source network's features. No network: a download attempt fails the test.
"""

import json
from pathlib import Path

import numpy as np
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


class SwavResNet50(nn.Module):
    """facebookresearch/swav ``src/resnet50.py`` as documented, from torchvision's parts: a
    ``ConstantPad2d(1)`` layer, then a 7x7/2 conv padded by 2 (3 in all, as torchvision's), BN, ReLU,
    3x3/2 max-pool, torchvision's bottleneck stages, global average pool; the projection head
    ``Linear(2048, 2048) - BatchNorm1d - ReLU - Linear(2048, 128)`` and the prototypes
    ``Linear(128, 3000, bias=False)`` (``MultiPrototypes``: ``prototypes0..2`` for DeepCluster-v2 / SeLa-v2)."""

    def __init__(self, seed: int, multi: bool):
        super().__init__()
        torch.manual_seed(seed)
        tv = torchvision.models.resnet50()
        self.padding = nn.ConstantPad2d(1, 0.0)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=2, bias=False)
        self.bn1, self.relu, self.maxpool = tv.bn1, tv.relu, tv.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = tv.layer1, tv.layer2, tv.layer3, tv.layer4
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.projection_head = nn.Sequential(nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True),
                                             nn.Linear(2048, 128))
        if multi:
            self.prototypes = nn.Module()
            for i in range(3):
                self.prototypes.add_module(f"prototypes{i}", nn.Linear(128, 3000, bias=False))
        else:
            self.prototypes = nn.Linear(128, 3000, bias=False)
        _randomize(self, seed)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.padding(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def official_file(name: str, seed: int) -> tuple[object, nn.Module, int]:
    """(what the official file holds, the network whose features the zoo model must give, input size)."""
    fmt, arch = zoo.model_info(name)["convert_format"], zoo.model_info(name)["architecture"]
    if fmt == "moco":
        # facebookresearch/moco main_moco.py + moco/builder.py (--mlp): torchvision resnet50(num_classes=128)
        # with fc -> Linear(2048, 2048), ReLU, fc; the key encoder a copy; queue [128, K] (K is --moco-k,
        # smaller here), queue_ptr; saved from DDP ({"epoch", "arch", "state_dict": module.*, "optimizer"}).
        torch.manual_seed(seed)
        query = torchvision.models.resnet50(num_classes=128)
        query.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), query.fc)
        _randomize(query, seed)
        key = torchvision.models.resnet50(num_classes=128)
        key.fc = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), key.fc)
        state = {**_prefixed("module.encoder_q.", query.state_dict()), **_prefixed("module.encoder_k.", key.state_dict())}
        state.update({"module.queue": torch.randn(128, 1024), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
        optimizer = torch.optim.SGD(query.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
        query.fc = nn.Identity()
        return {"epoch": 800, "arch": "resnet50", "state_dict": state, "optimizer": optimizer.state_dict()}, query.eval(), 64
    if fmt in ("swav", "deepcluster_v2", "sela_v2"):
        # the released file is the DDP model's bare state dict (module.*), heads included
        net = SwavResNet50(seed, multi=fmt != "swav").eval()
        return _prefixed("module.", net.state_dict()), net, 64
    if fmt == "dino":  # dino_deit*/dino_vitbase*_pretrain.pth: the teacher backbone's bare state dict
        dim, heads = {"vit_s16": (384, 6), "vit_b16": (768, 12)}[arch]
        torch.manual_seed(seed)
        net = _randomize(DinoViT(img_size=224, dim=dim, heads=heads), seed).eval()
        return net.state_dict(), net, 224
    if fmt == "scan":
        # SCAN scan.py: {"model": model.module.state_dict(), "head": np.argmin(losses)} with 10 heads;
        # selflabel.py: model.module.state_dict() with one head
        info = zoo.model_info(name)
        heads = 1 if "selflabel" in name else 10
        net = _randomize(ScanClusteringModel(nclusters=info["num_clusters"], nheads=heads), seed).eval()
        best = heads - 3 if heads > 1 else 0
        net.forward = lambda x: net.backbone(x)
        net.cluster_probs = lambda x: net.cluster_head[best](net.backbone(x)).softmax(dim=1)
        if heads == 1:
            return net.state_dict(), net, 32
        return {"model": net.state_dict(), "head": np.int64(best)}, net, 32
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
    # the self-check: every tensor of the model is one of the file's (SCAN's best head index: documented)
    check = json.loads((folder / "config.json").read_text())["conversion_check"]
    assert check["ok"] and check["from_file"] == len(model.state_dict()) - len(check["documented_absent"])
    assert set(check["documented_absent"]) <= {"cluster_head.best_head"}
    assert check["file_tensors_used"] + sum(map(len, check["left_behind"].values())) == check["file_tensors"]

    checkpoint.unlink()  # converted once: from now on the zoo cache alone is enough
    again = zoo.create_model(name, pretrained=True).eval()
    torch.testing.assert_close(again.forward_features(x), expected, rtol=0, atol=1e-5)
