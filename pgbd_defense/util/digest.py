"""Digests of tensors and weights for the caches that skip repeated work (the poisoned
model's evaluation, target inference): the raw bytes, so any change of a value, shape
order or dtype gives another key."""

from __future__ import annotations

import torch


def raw_bytes(tensor: torch.Tensor) -> bytes:
    # through uint8, as NumPy has no bfloat16; the same bytes as .numpy().tobytes() otherwise
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def update_with_weights(h, model: torch.nn.Module) -> None:
    """Feed ``h`` (a hashlib object) every state-dict entry's name and bytes, in order."""
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(raw_bytes(tensor))
