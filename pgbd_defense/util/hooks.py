"""Layers by name, the model's mode, and activations captured with hooks that are always
removed (timm's ``FeatureHooks`` idea as two context managers)."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Sequence, Tuple, Union

import torch

from ..errors import UserError


class LayerNotFoundError(UserError, ValueError):
    """A layer name the model does not have; the message lists the valid ones."""


def find_layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        convs = [n for n, m in modules.items() if isinstance(m, torch.nn.Conv2d)]
        raise LayerNotFoundError(
            f"model has no layer {name!r}. Convolutions: {', '.join(convs)}. "
            f"Other named modules: {', '.join(n for n in modules if n and n not in convs)}"
        )
    return modules[name]


def last_conv_name(model: torch.nn.Module) -> str:
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise LayerNotFoundError("model has no Conv2d layer; name the layer explicitly")
    return convs[-1]


def last_linear(model: torch.nn.Module) -> Tuple[str, torch.nn.Linear]:
    """(name, module) of the model's last linear layer: its classifier head."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise LayerNotFoundError(f"{type(model).__name__} has no linear layer (classifier head)")
    return linears[-1]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode inside the block, in its former mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def mixed_precision(enabled: bool, device: str):
    """bfloat16 autocast on the device's type when ``enabled`` (no loss scaling needed), else nothing."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


@contextlib.contextmanager
def frozen_weights(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model's parameters without gradients inside the block (a search over inputs must
    not leave gradients on the weights), as they were after it."""
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)


@contextlib.contextmanager
def capture(model: torch.nn.Module, layers: Union[str, Sequence[str]], inputs: bool = False
            ) -> Iterator[Dict[str, torch.Tensor]]:
    """``store[name]``: the output (with ``inputs``, the first input) of each named layer on
    every forward pass; the hooks are removed on exit, whatever happens inside.

    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
    >>> with capture(net, "0") as store:
    ...     _ = net(torch.zeros(1, 3))
    >>> tuple(store["0"].shape)
    (1, 2)
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    store: Dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            module = find_layer(model, name)
            if inputs:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, name=name: store.__setitem__(name, args[0])))
            else:
                handles.append(module.register_forward_hook(lambda m, i, o, name=name: store.__setitem__(name, o)))
        yield store
    finally:
        for h in handles:
            h.remove()
