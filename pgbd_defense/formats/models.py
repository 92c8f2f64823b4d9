"""Model zoo keyed by BackdoorBench's model names.

``preactresnet18`` reproduces BackdoorBench's module names exactly (``conv1``,
``layer1..4`` of ``PreActBlock`` with ``bn1/conv1/bn2/conv2/shortcut``, ``avgpool``,
``linear``), so the benchmark's checkpoints load into it. ``vgg19_bn`` and
``resnet50`` are torchvision's architectures, whose module names the benchmark
also uses. Every model takes ``in_channels`` (1 for gray data) and ``width``
(a channel multiplier; 0.25 gives a CPU-sized network); the defaults are the
standard sizes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from ..errors import UserError
from ..util.registry import Registry

MODELS: Registry = Registry("model")

# The bottleneck layer PGBD manipulates: the last convolution of each network.
DEFAULT_LAYERS = {
    "preactresnet18": "layer4.1.conv2",
    "vgg19_bn": "features.49",
    "resnet50": "layer4.2.conv3",
}


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # Pre-activation: the projection shortcut sees the normalized input.
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        planes = [_scaled(c, width) for c in (64, 128, 256, 512)]
        self.in_planes = planes[0]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(planes[0], stride=1)
        self.layer2 = self._make_layer(planes[1], stride=2)
        self.layer3 = self._make_layer(planes[2], stride=2)
        self.layer4 = self._make_layer(planes[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(planes[3], num_classes)

    def _make_layer(self, planes: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in (stride, 1):
            blocks.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@MODELS.register("preactresnet18")
def preactresnet18(num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    return PreActResNet18(num_classes, in_channels, width)


@MODELS.register("vgg19_bn")
def vgg19_bn(num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    if width == 1.0 and in_channels == 3:
        return torchvision.models.vgg19_bn(weights=None, num_classes=num_classes)
    cfg = torchvision.models.vgg.cfgs["E"]
    layers, channels = [], in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out = _scaled(v, width)
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
    model = torchvision.models.VGG(nn.Sequential(*layers), num_classes=num_classes)
    hidden = _scaled(4096, width)
    # torchvision's classifier assumes 512 channels; rebuild it for the scaled width.
    model.classifier = nn.Sequential(
        nn.Linear(channels * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(),
        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
        nn.Linear(hidden, num_classes),
    )
    return model


class _ScaledResNet(torchvision.models.ResNet):
    """torchvision's ResNet with every stage's width multiplied; same module names."""

    def __init__(self, layers, num_classes: int, in_channels: int, width: float):
        nn.Module.__init__(self)
        block = torchvision.models.resnet.Bottleneck
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = _scaled(64, width), 1, 1, 64
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, _scaled(64, width), layers[0])
        self.layer2 = self._make_layer(block, _scaled(128, width), layers[1], stride=2)
        self.layer3 = self._make_layer(block, _scaled(256, width), layers[2], stride=2)
        self.layer4 = self._make_layer(block, _scaled(512, width), layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(_scaled(512, width) * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


@MODELS.register("resnet50")
def resnet50(num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    if width == 1.0 and in_channels == 3:
        return torchvision.models.resnet50(weights=None, num_classes=num_classes)
    return _ScaledResNet([3, 4, 6, 3], num_classes, in_channels, width)


def build_model(name: str, num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Build a zoo model by its BackdoorBench name, e.g. ``build_model("preactresnet18", 10)``."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, width=width)


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Drop the ``module.`` prefix that DataParallel adds to every key."""
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state_dict.items())


def infer_architecture(name: str, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Read ``in_channels`` and ``width`` off a checkpoint, so narrow CPU models load too."""
    sd = strip_module_prefix(state_dict)
    first = {"preactresnet18": "conv1.weight", "resnet50": "conv1.weight", "vgg19_bn": "features.0.weight"}
    key = first.get(name)
    if key is None or key not in sd:
        raise ModelMismatchError(f"checkpoint has no {key!r}: it is not a {name} state_dict")
    out_channels, in_channels = sd[key].shape[:2]
    return {"in_channels": int(in_channels), "width": int(out_channels) / 64.0}


class ModelMismatchError(UserError, ValueError):
    """A checkpoint that does not fit the architecture its record names."""


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], model_name: str) -> nn.Module:
    """Load a (possibly DataParallel-prefixed) state_dict, or say precisely why it does not fit."""
    sd = strip_module_prefix(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: saved {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ModelMismatchError(
            f"the saved weights do not fit model_name={model_name!r}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, shape mismatches {shapes[:3]}. "
            "Check the record's model_name (and --width / input channels for narrow models)."
        )
    model.load_state_dict(sd)
    return model
