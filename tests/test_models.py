"""Every registered model: output shape, finite outputs, a gradient on every parameter."""

from collections import OrderedDict

import pytest
import torch
import torchvision

from pgbd_defense.formats.models import (
    DEFAULT_LAYERS,
    MODELS,
    ModelMismatchError,
    build_model,
    infer_architecture,
    load_weights,
    strip_module_prefix,
)
from pgbd_defense.util.hooks import last_conv_name


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_and_gradients(name, in_channels):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels, width=0.0625)
    x = torch.randn(2, in_channels, 32, 32)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert last_conv_name(model) == DEFAULT_LAYERS[name]


def test_full_width_defaults_are_the_standard_architectures():
    assert sum(p.numel() for p in build_model("resnet50", 10).parameters()) == \
        sum(p.numel() for p in torchvision.models.resnet50(num_classes=10).parameters())
    # BackdoorBench's preactresnet18 on CIFAR-10: 11,171,146 parameters.
    assert sum(p.numel() for p in build_model("preactresnet18", 10).parameters()) == 11171146
    narrow = build_model("resnet50", 10, width=0.25)
    assert set(narrow.state_dict()) == set(torchvision.models.resnet50(num_classes=10).state_dict())


def test_dataparallel_prefix_is_stripped_and_architecture_inferred():
    model = build_model("preactresnet18", 10, in_channels=1, width=0.125)
    prefixed = OrderedDict(("module." + k, v) for k, v in model.state_dict().items())
    assert list(strip_module_prefix(prefixed)) == list(model.state_dict())
    arch = infer_architecture("preactresnet18", prefixed)
    assert arch == {"in_channels": 1, "width": 0.125}
    fresh = build_model("preactresnet18", 10, **arch)
    load_weights(fresh, prefixed, "preactresnet18")
    assert torch.equal(fresh.linear.weight, model.linear.weight)


def test_wrong_architecture_is_named():
    sd = build_model("preactresnet18", 10, width=0.0625).state_dict()
    with pytest.raises(ModelMismatchError, match="model_name='vgg19_bn'"):
        load_weights(build_model("vgg19_bn", 10, width=0.0625), sd, "vgg19_bn")


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="preactresnet18"):
        build_model("resnet9000", 10)
