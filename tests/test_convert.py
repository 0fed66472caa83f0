"""Importers of official checkpoints (zoo.convert): each format is rebuilt here in its official key
layout from a known model, converted, and the zoo model must give the source model's features
(and, for SCAN, its cluster probabilities with the file's best head)."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from zoo.checkpoint import CheckpointError, load_model_folder, read_tensors
from zoo.cli import main
from zoo.convert import FORMATS, convert, detect_format
from zoo.convert.common import load_checkpoint

TOL = 1e-5


# ----------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random BN / LayerNorm statistics and affine parameters, so a wrong mapping shows in the features."""
    g = _gen(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.LayerNorm) and m.weight is not None:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


@torch.no_grad()
def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    other = copy.deepcopy(model)
    g = _gen(seed)
    for p in other.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return other


def _resnet18(seed: int, cifar: bool = False, padding: int = 1, fc: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(seed)
    net = torchvision.models.resnet18()
    if cifar:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=padding, bias=False)
        net.maxpool = nn.Identity()
    net.fc = fc if fc is not None else nn.Identity()
    return _randomize(net, seed)


def _images(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=_gen(seed))


@torch.no_grad()
def _features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.eval()(x)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < TOL


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _fc_free(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


# ----------------------------------------------------------------------------- MoCo
def _moco_checkpoint(path: Path, v2: bool = True) -> nn.Module:
    """facebookresearch/moco's main_moco.py checkpoint; returns the query encoder without its head."""
    head = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128)) if v2 else nn.Linear(512, 128)
    query = _resnet18(1, fc=head)
    opt = torch.optim.SGD(query.parameters(), lr=0.03, momentum=0.9)
    query(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # a real optimizer state (momentum buffers) in the file
    key = _perturbed(query, 2)  # the momentum encoder differs: converting it instead must fail the test
    state = {
        **_prefixed("module.encoder_q.", query.state_dict()),
        **_prefixed("module.encoder_k.", key.state_dict()),
        "module.queue": torch.randn(128, 64),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": opt.state_dict()}, path)
    query.fc = nn.Identity()
    return query.eval()


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1"])
def test_moco_features_match(tmp_path, v2):
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    ref = _moco_checkpoint(path, v2=v2)
    model = convert(path)
    x = _images()
    _same(model.forward_features(x), _features(ref, x))
    cfg = model.config()
    assert cfg["method"] == "moco" and cfg["license"] == "MIT" and cfg["converted_from"] == "moco"
    assert cfg["architecture"] == "resnet18" and cfg["arch_kwargs"]["cifar_stem"] is False
    assert cfg["weights_source"] == path.name and cfg["name"] == "moco_v2_800ep_pretrain"
    assert cfg["input_size"] == [3, 224, 224] and cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert cfg["dropped_keys"]["encoder_q.fc"] == (4 if v2 else 2)
    assert cfg["dropped_keys"]["encoder_k"] == len(ref.state_dict()) + (4 if v2 else 2)
    assert cfg["dropped_keys"]["queue"] == 1 and cfg["dropped_keys"]["queue_ptr"] == 1
    assert "optimizer" in cfg["ignored_entries"]
    assert ("MoCo v2" if v2 else "MoCo v1") in cfg["description"]


# ----------------------------------------------------------------------------- SwAV / DeepCluster-v2 / SeLa-v2
def _swav_state(multi: bool) -> tuple[dict, nn.Module]:
    net = _resnet18(3)
    head = _randomize(nn.Sequential(nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16)), 4)
    state = {**_prefixed("module.", net.state_dict()), **_prefixed("module.projection_head.", head.state_dict())}
    if multi:
        for i in range(3):
            state[f"module.prototypes.prototypes{i}.weight"] = torch.randn(30, 16)
    else:
        state["module.prototypes.weight"] = torch.randn(30, 16)
    return state, net


@pytest.mark.parametrize(
    "filename,multi,method",
    [
        ("swav_800ep_pretrain.pth.tar", False, "swav"),
        ("deepclusterv2_800ep_pretrain.pth.tar", True, "deepcluster_v2"),
        ("selav2_400ep_pretrain.pth.tar", True, "sela_v2"),
    ],
)
def test_swav_family_features_match(tmp_path, filename, multi, method):
    state, ref = _swav_state(multi)
    path = tmp_path / filename
    torch.save(state, path)
    model = convert(path, arch="resnet18")
    x = _images(1)
    _same(model.forward_features(x), _features(ref, x))
    cfg = model.config()
    assert cfg["method"] == method and cfg["license"] == "CC BY-NC 4.0" and cfg["converted_from"] == "swav"
    assert cfg["dropped_keys"]["projection_head"] == 9  # 2 linears + BN (5 entries)
    assert cfg["dropped_keys"]["prototypes"] == (3 if multi else 1)


def test_swav_alias_and_safetensors_input(tmp_path):
    from safetensors.torch import save_file

    state, ref = _swav_state(True)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = convert(path, fmt="sela_v2")
    x = _images(2)
    _same(model.forward_features(x), _features(ref, x))
    assert model.config()["method"] == "sela_v2" and model.config()["name"] == "weights"


# ----------------------------------------------------------------------------- DINO
class _DinoAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _DinoMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _DinoBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _DinoAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _DinoMlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class DinoViT(nn.Module):
    """facebookresearch/dino's vision_transformer.VisionTransformer (num_classes=0), its key names exactly."""

    def __init__(self, img_size=32, patch=16, dim=384, depth=12, heads=6, mlp_ratio=4):
        super().__init__()
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.5)
        self.blocks = nn.ModuleList(_DinoBlock(dim, heads, dim * mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Identity()

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


@pytest.fixture(scope="module")
def dino_pair():
    torch.manual_seed(5)
    teacher = _randomize(DinoViT(), 5)
    student = _perturbed(teacher, 6)
    return teacher, student


def _dino_head_state(seed: int) -> dict:
    g = _gen(seed)
    return {
        "head.mlp.0.weight": torch.randn(64, 384, generator=g), "head.mlp.0.bias": torch.randn(64, generator=g),
        "head.mlp.2.weight": torch.randn(64, 64, generator=g), "head.mlp.2.bias": torch.randn(64, generator=g),
        "head.mlp.4.weight": torch.randn(32, 64, generator=g), "head.mlp.4.bias": torch.randn(32, generator=g),
        "head.last_layer.weight_g": torch.ones(100, 1), "head.last_layer.weight_v": torch.randn(100, 32, generator=g),
    }


def test_dino_backbone_features_match(tmp_path, dino_pair):
    teacher, _ = dino_pair
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(teacher.state_dict(), path)
    model = convert(path)
    x = _images(3)
    _same(model.forward_features(x), _features(teacher, x))
    cfg = model.config()
    assert cfg["architecture"] == "vit_s16" and cfg["arch_kwargs"] == {"image_size": 32, "patch_size": 16}
    assert cfg["method"] == "dino" and cfg["license"] == "Apache-2.0" and cfg["input_size"] == [3, 32, 32]
    assert cfg["dropped_keys"] == {}


def test_dino_full_checkpoint_prefers_teacher_and_keeps_head(tmp_path, dino_pair):
    teacher, student = dino_pair
    head = _dino_head_state(7)
    ckpt = {
        "student": {**_prefixed("module.backbone.", student.state_dict()), **_prefixed("module.", _dino_head_state(8))},
        "teacher": {**_prefixed("backbone.", teacher.state_dict()), **head},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=100),  # as main_dino.py saves it
        "dino_loss": {"center": torch.zeros(1, 100)},
        "fp16_scaler": {"scale": 65536.0},
    }
    path = tmp_path / "dino_deitsmall16_pretrain_full_checkpoint.pth"
    torch.save(ckpt, path)
    out = tmp_path / "dino_folder"
    model = convert(path, out=out, keep_head=True)
    x = _images(4)
    _same(model.forward_features(x), _features(teacher, x))
    assert (model.forward_features(x) - _features(student, x)).abs().max() > 1e-3
    cfg = model.config()
    assert cfg["dropped_keys"]["student"] == len(ckpt["student"])
    assert set(cfg["ignored_entries"]) >= {"args", "optimizer", "epoch", "dino_loss"}
    assert cfg["kept_heads"] == {"head": 8} and "head" not in cfg["dropped_keys"]
    check = cfg["conversion_check"]
    assert len(check["kept_in_heads_file"]) == 8 and "student/module.backbone" in check["left_behind"]
    assert check["file_tensors_used"] + sum(map(len, check["left_behind"].values())) == check["file_tensors"]
    assert check["format_inferred_from"].startswith("detected: a 'teacher' network")
    assert "teacher" in cfg["description"]
    heads, _ = read_tensors(out / "heads.safetensors")
    assert torch.equal(heads["head.last_layer.weight_v"], head["head.last_layer.weight_v"])
    assert json.loads((out / "config.json").read_text())["heads_file"] == "heads.safetensors"
    _same(load_model_folder(out).forward_features(x), _features(teacher, x))


# ----------------------------------------------------------------------------- SCAN
class _ScanBlock(nn.Module):
    """SCAN's models/resnet_cifar.py BasicBlock (from SupContrast): projection shortcut named ``shortcut``."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ScanResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin, layers = 64, []
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(_ScanBlock(cin, cout, stride), _ScanBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class ScanClusteringModel(nn.Module):
    def __init__(self, nclusters: int, nheads: int):
        super().__init__()
        self.backbone = ScanResNet18()
        self.cluster_head = nn.ModuleList(nn.Linear(512, nclusters) for _ in range(nheads))


@pytest.fixture(scope="module")
def scan_model():
    torch.manual_seed(9)
    return _randomize(ScanClusteringModel(nclusters=10, nheads=3), 9)


@pytest.mark.parametrize("best", [2, 0])
def test_scan_model_clusters_match_best_head(tmp_path, scan_model, best):
    path = tmp_path / "scan_model.pth.tar"
    # SCAN stores np.argmin(...) as the head: a numpy integer in the pickle
    torch.save({"model": scan_model.state_dict(), "head": np.int64(best)}, path,
               _use_new_zipfile_serialization=best != 2)
    if best == 2:  # as written in 2020: torch's legacy format, numpy 1's module names
        path.write_bytes(path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
        assert b"numpy.core.multiarray" in path.read_bytes()
    model = convert(path, dataset="cifar-10")  # the weights cannot tell SCAN's CIFAR ResNet from its STL-10 one
    x = _images(5)
    with torch.no_grad():
        feats = scan_model.backbone(x)
        probs = scan_model.cluster_head[best](feats).softmax(dim=1)
    _same(model.forward_features(x), feats)
    _same(model.predict_cluster(x), probs)
    cfg = model.config()
    assert cfg["architecture"] == "resnet18" and cfg["arch_kwargs"]["cifar_stem"] is True
    assert cfg["num_clusters"] == 10 and cfg["num_cluster_heads"] == 3 and int(model.cluster_head.best_head) == best
    assert cfg["method"] == "scan" and cfg["license"] == "CC BY-NC 4.0"
    assert cfg["input_size"] == [3, 32, 32] and cfg["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert cfg["dataset"] == "cifar-10"


def test_scan_pretext_and_selflabel(tmp_path, scan_model):
    x = _images(6)
    with torch.no_grad():
        feats = scan_model.backbone(x)
    backbone = _prefixed("backbone.", scan_model.backbone.state_dict())
    contrastive = {"contrastive_head.0.weight": torch.randn(512, 512), "contrastive_head.0.bias": torch.randn(512),
                   "contrastive_head.2.weight": torch.randn(128, 512), "contrastive_head.2.bias": torch.randn(128)}
    pretext = tmp_path / "pretext_checkpoint.pth.tar"
    torch.save({"model": {**backbone, **contrastive}, "optimizer": {"state": {}, "param_groups": []}, "epoch": 500}, pretext)
    model = convert(pretext, dataset="cifar-10")
    assert not model.has_cluster_head
    _same(model.forward_features(x), feats)
    assert model.config()["dropped_keys"] == {"contrastive_head": 4}

    head = scan_model.cluster_head[1]
    selflabel = tmp_path / "selflabel_model.pth.tar"
    torch.save({**backbone, "cluster_head.0.weight": head.weight.detach(), "cluster_head.0.bias": head.bias.detach()},
               selflabel)
    model = convert(selflabel, arch_kwargs={"cifar_stem": True, "stem_pool": False})
    assert model.config()["num_cluster_heads"] == 1
    with torch.no_grad():
        _same(model.predict_cluster(x), head(feats).softmax(dim=1))


def test_scan_bad_best_head(tmp_path, scan_model):
    path = tmp_path / "scan_model.pth.tar"
    torch.save({"model": scan_model.state_dict(), "head": 3}, path)
    with pytest.raises(CheckpointError, match="best head 3 but the file has 3 cluster heads"):
        convert(path)


# ----------------------------------------------------------------------------- solo-learn, lightly
def test_solo_learn_features_match(tmp_path):
    net = _resnet18(10)
    momentum = _perturbed(net, 11)
    state = {
        **_prefixed("backbone.", net.state_dict()),
        **_prefixed("momentum_backbone.", momentum.state_dict()),
        "projector.0.weight": torch.randn(64, 512), "projector.0.bias": torch.randn(64),
        "projector.2.weight": torch.randn(16, 64), "projector.2.bias": torch.randn(16),
        "classifier.weight": torch.randn(100, 512), "classifier.bias": torch.randn(100),
    }
    ckpt = {"epoch": 399, "global_step": 1000, "pytorch-lightning_version": "2.0.0", "state_dict": state,
            "hyper_parameters": {"cfg": {"method": "byol", "data": {"dataset": "imagenet100"}}}}
    path = tmp_path / "byol-imagenet100-abc123-ep=399.ckpt"
    torch.save(ckpt, path)
    model = convert(path)
    x = _images(7)
    _same(model.forward_features(x), _features(net, x))
    cfg = model.config()
    assert cfg["method"] == "solo-learn" and cfg["converted_from"] == "solo" and cfg["dataset"] == "imagenet100"
    assert cfg["dropped_keys"] == {"classifier": 2, "momentum_backbone": len(net.state_dict()), "projector": 4}


def test_solo_learn_cifar_stem(tmp_path):
    """solo-learn pads its CIFAR conv1 by 2: the zoo's ResNet reproduces it exactly (stem_padding=2)."""
    net = _resnet18(12, cifar=True, padding=2)
    path = tmp_path / "simclr-cifar10.ckpt"
    torch.save({"state_dict": {**_prefixed("backbone.", net.state_dict()), "classifier.weight": torch.randn(10, 512),
                               "classifier.bias": torch.randn(10)}}, path)
    model = convert(path)
    x = _images(8)
    _same(model.forward_features(x), _features(net, x))
    cfg = model.config()
    assert cfg["arch_kwargs"]["stem_padding"] == 2
    assert cfg["arch_kwargs"]["cifar_stem"] is True and cfg["input_size"] == [3, 32, 32]
    assert cfg["std"] == pytest.approx([0.2470, 0.2435, 0.2616])


def _lightly_sequential(net: nn.Module) -> nn.Module:
    return nn.Sequential(*list(net.children())[:-1])  # as lightly's examples build the backbone


@pytest.mark.parametrize("form", ["lightning-sequential", "bare-torchvision", "backbone-only-sequential"])
def test_lightly_features_match(tmp_path, form):
    net = _resnet18(13, cifar=form == "bare-torchvision")
    proj = {"projection_head.layers.0.weight": torch.randn(64, 512), "projection_head.layers.0.bias": torch.randn(64)}
    if form == "lightning-sequential":
        ckpt = {"state_dict": {**_prefixed("backbone.", _lightly_sequential(net).state_dict()), **proj,
                               **_prefixed("backbone_momentum.", _lightly_sequential(net).state_dict())},
                "epoch": 10, "hyper_parameters": {"lr": 0.06}}
    elif form == "bare-torchvision":
        ckpt = {**_prefixed("backbone.", net.state_dict()), **proj}
    else:
        ckpt = _lightly_sequential(net).state_dict()
    path = tmp_path / "lightly_model.pth"
    torch.save(ckpt, path)
    if form == "bare-torchvision":  # a user's torchvision ResNet with a 3x3 conv1: what follows it is not in the file
        with pytest.raises(CheckpointError, match="do not say whether a max-pool follows"):
            convert(path)
    model = convert(path, arch_kwargs={"cifar_stem": True} if form == "bare-torchvision" else None)
    x = _images(9)
    _same(model.forward_features(x), _features(net, x))
    cfg = model.config()
    assert cfg["method"] == "lightly" and cfg["arch_kwargs"]["cifar_stem"] is (form == "bare-torchvision")
    if form != "backbone-only-sequential":
        assert cfg["dropped_keys"]["projection_head"] == 2


# ----------------------------------------------------------------------------- detection, errors, safety
def test_detect_format_picks_each_format(tmp_path, dino_pair, scan_model):
    teacher, _ = dino_pair
    net = _resnet18(14)
    swav_state, _ = _swav_state(False)
    moco_path = tmp_path / "moco.pth.tar"
    _moco_checkpoint(moco_path)
    cases = {
        "moco": load_checkpoint(moco_path),
        "swav": swav_state,
        "dino": {"teacher": _prefixed("backbone.", teacher.state_dict()), "epoch": 1},
        "scan": {"model": scan_model.state_dict(), "head": 0},
        "solo": {"state_dict": {**_prefixed("backbone.", net.state_dict()), "projector.0.weight": torch.randn(2, 512)}},
        "lightly": {"state_dict": _prefixed("backbone.", _lightly_sequential(net).state_dict())},
    }
    assert set(cases) == set(FORMATS)
    for fmt, ckpt in cases.items():
        assert detect_format(ckpt) == fmt, fmt
    assert detect_format(teacher.state_dict()) == "dino"
    assert detect_format(_prefixed("backbone.", scan_model.backbone.state_dict()) | {"contrastive_head.0.weight": torch.ones(1)}) == "scan"
    with pytest.raises(CheckpointError, match="known formats: moco, swav, dino, scan, solo, lightly"):
        detect_format({"features.0.weight": torch.ones(1), "classifier.weight": torch.ones(1)})


def test_wrong_keys_name_missing_and_unexpected_prefixes(tmp_path):
    path = tmp_path / "moco.pth.tar"
    _moco_checkpoint(path)
    # the wrong architecture for the weights
    with pytest.raises(CheckpointError, match="missing .* tensor"):
        convert(path, arch="convnet_tiny")
    with pytest.raises(ValueError, match="unknown checkpoint format 'simclr'"):
        convert(path, fmt="simclr")
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["state_dict"]
    for key in [k for k in state if k.startswith("module.encoder_q.layer4.1.")]:
        del state[key]
    state["module.encoder_q.extra.weight"] = torch.ones(3)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as err:
        convert(path)
    msg = str(err.value)
    # every key is named, not its group
    assert "missing 10 tensor(s) of the model" in msg and "backbone.layer4.1.bn2.running_var" in msg
    assert "backbone.layer4.1.conv1.weight" in msg
    assert "1 tensor(s) the model does not have: backbone.extra.weight" in msg
    torch.save({"foo.weight": torch.ones(2)}, tmp_path / "unknown.pth")
    with pytest.raises(CheckpointError, match="known formats"):
        convert(tmp_path / "unknown.pth")


class _Payload:
    """Pickles to a call of ``open(marker, "w")``: loading it with full unpickling creates the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth.tar"
    state, _ = _swav_state(False)
    torch.save({"state_dict": state, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load: the file names the Python global `(io|_io|builtins).open`"):
        convert(path, fmt="swav")
    assert not marker.exists()
    # the payload is real: a full unpickle runs it
    loaded = torch.load(path, weights_only=False)
    loaded["extra"].close()
    assert marker.exists()


def test_cli_convert_writes_loadable_folder(tmp_path, capsys):
    state, ref = _swav_state(False)
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save(state, path)
    out = tmp_path / "folder"
    assert main(["convert", str(path), "--format", "swav", "--out", str(out), "--arch", "resnet18",
                 "--name", "swav_r18_test", "--keep-head"]) == 0
    assert "converted" in capsys.readouterr().out
    model = load_model_folder(out)
    x = _images(10)
    _same(model.forward_features(x), _features(ref, x))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["name"] == "swav_r18_test" and cfg["weights_source"] == path.name and cfg["converted_from"] == "swav"
    assert "CC BY-NC 4.0" in (out / "README.md").read_text() or "cc-by-nc-4.0" in (out / "README.md").read_text()
    heads, _ = read_tensors(out / "heads.safetensors")
    assert set(heads) == {k[len("module."):] for k in state if "projection_head" in k or "prototypes" in k}
    # errors are reported, not raised
    assert main(["convert", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x")]) == 1
    assert "file not found" in capsys.readouterr().err


def test_convert_from_url_records_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    state, ref = _swav_state(False)
    path = tmp_path / "src" / "swav_800ep_pretrain.pth.tar"
    path.parent.mkdir()
    torch.save(state, path)
    url = path.resolve().as_uri()
    model = convert(url, arch="resnet18")
    assert model.config()["weights_source"] == url
    assert (Path(torch.hub.get_dir()) / "checkpoints" / path.name).is_file()
    x = _images(11)
    _same(model.forward_features(x), _features(ref, x))
