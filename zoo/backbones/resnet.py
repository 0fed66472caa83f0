"""torchvision ResNets as encoders, with the optional CIFAR stem (3x3 conv, stride 1, no max-pool)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn


class ResNetEncoder(nn.Module):
    """torchvision ``resnet18`` / ``resnet50`` without the classifier: ``[B,3,H,W] -> [B,512|2048]``.

    ``cifar_stem=True`` swaps the 7x7/2 conv + max-pool for a 3x3/1 conv (padding ``stem_padding``),
    as SimCLR and solo-learn do for 32x32 inputs. Two variants of that small stem exist in official
    releases and have the same weights, so they are explicit arguments, never inferred:
    ``stem_pool=True`` keeps a ``MaxPool2d(2, 2, padding=1)`` after it (SCAN's STL-10 ResNet-18,
    ``models/resnet_stl.py``); ``stem_relu=False`` drops the ReLU after the stem's BatchNorm (lightly's
    ``ResNetGenerator`` used as ``nn.Sequential(*children[:-1])``, whose ReLU lives in ``forward``).
    Parameter names match torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean`` ...) so
    official checkpoints map one to one.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        cifar_stem: bool = False,
        zero_init_residual: bool = False,
        stem_padding: int = 1,
        stem_pool: bool = False,
        stem_relu: bool = True,
    ):
        super().__init__()
        if stem_pool and not cifar_stem:
            raise ValueError("stem_pool=True is a variant of the CIFAR stem: pass cifar_stem=True with it")
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
        if cifar_stem:
            # solo-learn's CIFAR stem pads by 2 (32x32 -> 34x34); SimCLR's and SCAN's by 1
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=stem_padding, bias=False)
            net.maxpool = nn.MaxPool2d(kernel_size=2, stride=2, padding=1) if stem_pool else nn.Identity()
        if not stem_relu:
            net.relu = nn.Identity()  # the stem's ReLU only: every block has its own
        self.num_features = net.fc.in_features
        net.fc = nn.Identity()
        # Keep torchvision's children as our own so state-dict keys stay torchvision's.
        for name, child in net.named_children():
            self.add_module(name, child)
        # non-default variants only, so configs written before they existed stay the same
        self.arch_kwargs = {"cifar_stem": cifar_stem}
        if stem_padding != 1:
            self.arch_kwargs["stem_padding"] = stem_padding
        if stem_pool:
            self.arch_kwargs["stem_pool"] = True
        if not stem_relu:
            self.arch_kwargs["stem_relu"] = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)
