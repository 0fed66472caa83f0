"""Release layouts the importers must convert exactly, or refuse: rebuilt here from each release's documented
architecture with torchvision's building blocks, saved as the release's own code saves it.

- SCAN STL-10 (``models/resnet_stl.py``): 3x3 conv, ``MaxPool2d(2, 2, padding=1)``, ``AvgPool2d(7)`` at 96x96;
  the weights equal a CIFAR ResNet-18's, so the importer must be told (negative control: the wrong stem);
- DINO: a missing tensor fails naming it; the ResNet-50 plain backbone; ViT input sizes by DINO's interpolation;
- lightly: real lightly models (SwAV, ``ResNetGenerator``) and the tutorial file;
- security: a crafted numpy-scalar file (SIGSEGV under a real-numpy allowlist) is refused with a message;
- the self-check record in ``config.json`` and its printout.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

import zoo.convert
from tests.test_convert import DinoViT, _moco_checkpoint, _prefixed, _randomize, _resnet18
from zoo.checkpoint import CheckpointError
from zoo.cli import main
from zoo.convert import convert, detect_format
from zoo.convert.common import refused_global

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _x(size: int | tuple[int, int], seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() < TOL


# ----------------------------------------------------------------------------- SCAN STL-10
def _basic_stages() -> list[nn.Sequential]:
    """ResNet-18's four stages of torchvision BasicBlocks (projection shortcut where the shape changes)."""
    stages, cin = [], 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        stages.append(nn.Sequential(BasicBlock(cin, cout, stride, down), BasicBlock(cout, cout)))
        cin = cout
    return stages


class ScanStlResNet18(nn.Module):
    """SCAN's models/resnet_stl.py as documented: conv 3x3/1 pad 1, BN, ReLU, MaxPool2d(2, 2, padding=1),
    four BasicBlock stages, AvgPool2d(7, stride=1) (the global pool at 96x96 input), flatten."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2, padding=1)
        self.layer1, self.layer2, self.layer3, self.layer4 = _basic_stages()
        self.avgpool = nn.AvgPool2d(7, stride=1)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def _scan_keys(state: dict) -> dict:
    """SCAN's blocks name the projection shortcut ``shortcut`` (torchvision: ``downsample``)."""
    return {k.replace(".downsample.", ".shortcut."): v for k, v in state.items()}


@pytest.fixture(scope="module")
def stl_model():
    torch.manual_seed(21)
    net = nn.Module()
    net.backbone = ScanStlResNet18()
    net.cluster_head = nn.ModuleList(nn.Linear(512, 10) for _ in range(10))  # scan_stl10: 10 heads of 10
    return _randomize(net, 21)


def test_scan_stl10_converts_exactly_only_when_told(tmp_path, stl_model):
    best = 7
    path = tmp_path / "scan_stl-10.pth.tar"
    # scan.py: torch.save({'model': model.module.state_dict(), 'head': best_loss_head}, ...)
    torch.save({"model": _scan_keys(stl_model.state_dict()), "head": np.int64(best)}, path)
    assert detect_format(torch.load(path, weights_only=False)) == "scan"
    with pytest.raises(CheckpointError, match="--dataset cifar-10 or --dataset stl-10"):
        convert(path)  # the weights fit both SCAN ResNet-18s: never guessed
    model = convert(path, dataset="stl-10")
    x = _x(96, 1)
    with torch.no_grad():
        feats = stl_model.backbone(x)
        probs = stl_model.cluster_head[best](feats).softmax(dim=1)
    assert _close(model.forward_features(x), feats)
    assert _close(model.predict_cluster(x), probs)
    cfg = model.config()
    assert cfg["arch_kwargs"] == {"cifar_stem": True, "stem_pool": True} and cfg["input_size"] == [3, 96, 96]
    assert cfg["mean"] == pytest.approx([0.485, 0.456, 0.406]) and cfg["dataset"] == "stl-10"
    check = cfg["conversion_check"]
    assert any("stl-10" in r for r in check["architecture_inferred_from"])
    assert check["documented_absent"] == {"cluster_head.best_head": f"the file's best head entry ({best})"}

    # negative control: the CIFAR stem loads the same weights, and the comparison catches it
    wrong = convert(path, dataset="cifar-10")
    assert not _close(wrong.forward_features(x), feats)
    assert (wrong.forward_features(x) - feats).abs().max() > 1e-2

    # selflabel.py: torch.save(model.module.state_dict(), ...), one head; the explicit stem argument works too
    head = stl_model.cluster_head[3]
    selflabel = tmp_path / "selflabel_stl-10.pth.tar"
    torch.save({**_prefixed("backbone.", _scan_keys(stl_model.backbone.state_dict())),
                "cluster_head.0.weight": head.weight.detach(), "cluster_head.0.bias": head.bias.detach()}, selflabel)
    model = convert(selflabel, arch_kwargs={"cifar_stem": True, "stem_pool": True})
    with torch.no_grad():
        assert _close(model.predict_cluster(x), head(feats).softmax(dim=1))
    with pytest.raises(CheckpointError, match="20 clusters, but cifar-20|predict 10 clusters, but cifar-20 has 20"):
        convert(path, dataset="cifar-20")


def test_scan_imagenet50_resnet50(tmp_path):
    # SCAN's ImageNet models: models/resnet.py wraps torchvision's resnet50 with fc = Identity
    torch.manual_seed(22)
    net = nn.Module()
    net.backbone = torchvision.models.resnet50()
    net.backbone.fc = nn.Identity()
    net.cluster_head = nn.ModuleList([nn.Linear(2048, 50)])
    _randomize(net, 22)
    path = tmp_path / "scan_imagenet_50.pth.tar"
    torch.save({"model": net.state_dict(), "head": np.int64(0)}, path)
    model = convert(path)  # a 7x7 stem: no choice to make
    x = _x(64, 8)
    with torch.no_grad():
        feats = net.backbone(x)
        assert _close(model.forward_features(x), feats)
        assert _close(model.predict_cluster(x), net.cluster_head[0](feats).softmax(dim=1))
    assert model.config()["dataset"] == "imagenet-50" and model.config()["input_size"] == [3, 224, 224]


# ----------------------------------------------------------------------------- DINO
def test_dino_missing_tensor_fails_naming_it(tmp_path):
    torch.manual_seed(3)
    net = _randomize(DinoViT(img_size=32), 3)
    state = net.state_dict()
    del state["blocks.5.attn.qkv.bias"]
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        convert(path)
    msg = str(err.value)
    assert "missing 1 tensor(s) of the model: backbone.vit.encoder.layers.encoder_layer_5.self_attention.in_proj_bias" in msg


class DinoViTAnySize(DinoViT):
    """DINO's VisionTransformer at any input size: ``interpolate_pos_encoding`` as documented in its
    vision_transformer.py (bicubic, scale factor ``(grid + 0.1) / sqrt(N)``; unchanged for the trained grid)."""

    def forward(self, x):
        n, _, h, w = x.shape
        p = self.patch_embed.proj.kernel_size[0]
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat((self.cls_token.expand(n, -1, -1), tokens), dim=1)
        npos = self.pos_embed.shape[1] - 1
        if tokens.shape[1] - 1 == npos and h == w:
            pos = self.pos_embed
        else:
            side = math.sqrt(npos)
            grid = self.pos_embed[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
            grid = nn.functional.interpolate(grid, scale_factor=((h // p + 0.1) / side, (w // p + 0.1) / side),
                                             mode="bicubic")
            pos = torch.cat((self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])), dim=1)
        tokens = tokens + pos
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


def test_dino_vit_other_input_sizes_interpolate_as_dino(tmp_path):
    torch.manual_seed(4)
    net = _randomize(DinoViTAnySize(img_size=64), 4)  # a 4x4 position grid
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(net.state_dict(), path)
    model = convert(path)
    with torch.no_grad():
        for size in (64, 96, (48, 80)):
            x = _x(size, 2)
            assert _close(model.forward_features(x), net(x)), size
        with pytest.raises(ValueError, match="multiple of the patch size"):
            model.forward_features(_x(40))


def test_dino_resnet50_plain_backbone_is_detected(tmp_path):
    # hubconf.dino_resnet50: torchvision resnet50 with fc = Identity; the release is that state dict
    torch.manual_seed(5)
    net = torchvision.models.resnet50()
    net.fc = nn.Identity()
    _randomize(net, 5)
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(net.state_dict(), path)
    model = convert(path)
    x = _x(64, 3)
    with torch.no_grad():
        assert _close(model.forward_features(x), net(x))
    cfg = model.config()
    assert cfg["converted_from"] == "dino" and cfg["architecture"] == "resnet50" and cfg["arch_kwargs"] == {"cifar_stem": False}
    assert "dino_resnet50_pretrain.pth" in cfg["conversion_check"]["format_inferred_from"]
    other = tmp_path / "weights.pth"
    other.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="bare torchvision ResNet state dict does not say which release"):
        convert(other)


# ----------------------------------------------------------------------------- lightly
def _children_backbone(net: nn.Module, pool: bool = False) -> nn.Sequential:
    layers = list(net.children())[:-1]
    return nn.Sequential(*layers, *([nn.AdaptiveAvgPool2d(1)] if pool else []))


def test_lightly_swav_model_state_dict(tmp_path):
    pytest.importorskip("lightly")
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

    class SwaV(nn.Module):  # lightly's SwAV example
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = SwaVProjectionHead(512, 512, 128)
            self.prototypes = SwaVPrototypes(128, n_prototypes=512)

    net = _resnet18(6, fc=nn.Linear(512, 10))
    model_ = SwaV(_children_backbone(net)).eval()
    path = tmp_path / "swav_lightly.pth"
    torch.save(model_.state_dict(), path)
    assert detect_format(torch.load(path, weights_only=True)) == "lightly"
    model = convert(path)
    x = _x(64, 4)
    with torch.no_grad():
        assert _close(model.forward_features(x), model_.backbone(x).flatten(1))
    left = model.config()["conversion_check"]["left_behind"]
    assert set(left) == {"projection_head", "prototypes"}


def test_lightly_tutorial_file_and_resnet_generator(tmp_path):
    pytest.importorskip("lightly")
    from lightly.models import ResNetGenerator

    # tutorials: torch.save({"resnet18_parameters": backbone.state_dict()}, "model.pth")
    net = _resnet18(7)
    backbone = _children_backbone(net).eval()
    path = tmp_path / "model.pth"
    torch.save({"resnet18_parameters": backbone.state_dict()}, path)
    model = convert(path)
    x = _x(64, 5)
    with torch.no_grad():
        assert _close(model.forward_features(x), backbone(x).flatten(1))

    torch.manual_seed(8)
    gen = _randomize(ResNetGenerator("resnet-18"), 8)
    seq = _children_backbone(gen, pool=True).eval()  # as lightly's examples build it: no ReLU after bn1
    path = tmp_path / "generator_backbone.pth"
    torch.save(seq.state_dict(), path)
    model = convert(path)
    x = _x(32, 6)
    with torch.no_grad():
        assert _close(model.forward_features(x), seq(x).flatten(1))
    assert model.config()["arch_kwargs"] == {"cifar_stem": True, "stem_relu": False}
    # the generator module itself (its forward has the ReLU; its avg_pool2d(4) is global at 32x32)
    path = tmp_path / "generator.pth"
    torch.save(gen.state_dict(), path)
    model = convert(path)
    gen.linear = nn.Identity()
    with torch.no_grad():
        assert _close(model.forward_features(x), gen(x))
    assert model.config()["conversion_check"]["left_behind"] == {"linear": ["linear.bias", "linear.weight"]}


# ----------------------------------------------------------------------------- the self-check
def test_self_check_recorded_and_printed(tmp_path, capsys):
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    ref = _moco_checkpoint(path)
    out = tmp_path / "folder"
    assert main(["convert", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    check = json.loads((out / "config.json").read_text())["conversion_check"]
    n = len(ref.state_dict())
    assert check["target_tensors"] == check["from_file"] == n and check["documented_absent"] == {}
    assert check["taken_from"]["backbone.conv1.weight"] == "state_dict/module.encoder_q.conv1.weight"
    assert len(check["left_behind"]["state_dict/module.encoder_k"]) == n + 4
    assert check["left_behind"]["state_dict/module.queue"] == ["state_dict/module.queue"]
    assert len(check["left_behind"]["state_dict/module.encoder_q"]) == 4  # its MLP head
    assert "optimizer" in check["left_behind"]  # momentum buffers
    assert check["file_tensors_used"] + sum(map(len, check["left_behind"].values())) == check["file_tensors"]
    assert any("2-2-2-2 basic blocks: resnet18" in r for r in check["architecture_inferred_from"])
    assert f"check: {n} target tensors: {n} taken from the file, 0 documented absent" in printed
    assert "left behind: " in printed and "state_dict/module.encoder_k" in printed


def test_check_documents_absent_counters_and_refuses_made_up_tensors(tmp_path, monkeypatch):
    net = _resnet18(9)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save({**_prefixed("module.", state), "module.prototypes.weight": torch.randn(30, 512)}, path)
    model = convert(path)
    absent = model.config()["conversion_check"]["documented_absent"]
    assert len(absent) == 20 and all(k.endswith("num_batches_tracked") for k in absent)
    x = _x(32, 7)
    with torch.no_grad():
        assert _close(model.forward_features(x), net(x))

    from zoo.convert import swav

    real = swav.extract

    def forging(*args, **kwargs):
        ex = real(*args, **kwargs)
        ex.backbone["layer1.0.bn1.weight"] = ex.backbone["layer1.0.bn1.weight"].clone()  # not the file's tensor
        return ex

    monkeypatch.setitem(zoo.convert._FAMILIES, "swav", (swav.matches, forging))
    with pytest.raises(CheckpointError, match="tensors not taken from the file: backbone.layer1.0.bn1.weight"):
        convert(path)


# ----------------------------------------------------------------------------- security
class _Reduce:
    """Pickles as ``fn(*args)`` (then ``__setstate__(state)``): how a crafted file is written."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _crafted_scan_file(path: Path) -> None:
    """A SCAN file whose best head is a numpy record: a ``[('a', 'O')]`` dtype whose state clears the
    object flags, so numpy takes 8 raw bytes for an object pointer."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    inner = _Reduce(np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 63))
    record = _Reduce(np.dtype, ("V8", False, True), (3, "|", None, ("a",), {"a": (inner, 0)}, 8, 1, 0))
    torch.manual_seed(1)
    state = {"backbone.conv1.weight": torch.randn(64, 3, 3, 3), "cluster_head.0.weight": torch.randn(10, 512),
             "cluster_head.0.bias": torch.randn(10)}
    torch.save({"model": state, "head": _Reduce(scalar, (record, b"\x41" * 8))}, path)


_REAL_NUMPY_ALLOWLIST = """
import sys, numpy as np, torch
try:
    from numpy._core.multiarray import scalar
except ImportError:
    from numpy.core.multiarray import scalar
dtypes = [c for n in dir(np.dtypes) if isinstance(c := getattr(np.dtypes, n), type) and issubclass(c, np.dtype)]
with torch.serialization.safe_globals([np.dtype, scalar, *dtypes]):
    best = torch.load(sys.argv[1], weights_only=True)["head"]
int(best)
"""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def test_crafted_numpy_scalar_is_refused_without_crashing(tmp_path):
    path = tmp_path / "scan_model.pth.tar"
    _crafted_scan_file(path)
    # in a subprocess, so a crash fails the test instead of killing the test runner
    done = _run(["-m", "zoo.cli", "convert", str(path), "--out", str(tmp_path / "out"), "--dataset", "cifar-10"])
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "refused to load" in done.stderr and "numpy dtype 'V8'" in done.stderr
    assert not (tmp_path / "out").exists()
    # the file is a real attack: real numpy dtypes in the allowlist (what the importers used to allow) crash
    if hasattr(np, "dtypes") and hasattr(torch.serialization, "safe_globals"):
        control = _run(["-c", _REAL_NUMPY_ALLOWLIST, str(path)])
        assert control.returncode < 0, (control.returncode, control.stderr[-2000:])


@pytest.mark.parametrize(
    "message",
    [
        "Weights only load failed. ... Unsupported global: GLOBAL posix.system was not an allowed global by default. "
        "Please use `torch.serialization.add_safe_globals([posix.system])` ... Do it only if you got the file from a trusted source.",
        "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed, but it "
        "can result in arbitrary code execution. Do it only if you got the file from a trusted source. Please file an "
        "issue with the following so that we can make `weights_only=True` compatible with your use case: "
        "WeightsUnpickler error: Unsupported class posix.system",
        "WeightsUnpickler error: Trying to load unsupported GLOBAL posix.system whose module posix is blocked.",
    ],
    ids=["torch>=2.6", "torch<2.6", "blocked"],
)
def test_refused_global_parsed_from_each_wording(message):
    assert refused_global(message) == "posix.system"
