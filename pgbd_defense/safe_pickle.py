"""Load BackdoorBench ``.pt`` files without letting them run code.

A record is a pickle, and unpickling calls whatever callable the file names. The
benchmark's records hold only tensors, numpy arrays and scalars, PIL images and
builtin containers, so :func:`safe_torch_load` admits exactly those globals and
refuses anything else with :class:`UnsafeRecordError`. ``trust=True`` falls back
to ``torch.load(weights_only=False)`` for files the user vouches for.
"""

from __future__ import annotations

import logging
import pickle
import types
from typing import Any

import torch

log = logging.getLogger(__name__)


class UnsafeRecordError(pickle.UnpicklingError):
    """The file names a global outside the allow-list: it may run code when loaded."""


def _storage_types() -> set:
    return {("torch", n) for n in dir(torch) if n.endswith("Storage") and isinstance(getattr(torch, n), type)}


ALLOWED_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch", "Size"),
        ("torch.storage", "UntypedStorage"),
        ("torch.storage", "TypedStorage"),
        # numpy moved its pickling helpers from numpy.core to numpy._core in 2.0.
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        # numpy pickles raw bytes through codecs.encode(str, "latin1"): it only makes bytes.
        ("_codecs", "encode"),
        ("PIL.Image", "Image"),
        ("PIL.PngImagePlugin", "PngImageFile"),
        ("PIL.JpegImagePlugin", "JpegImageFile"),
    }
    | _storage_types()
)
# numpy dtype classes (numpy.dtypes.Int64DType, ...) are data descriptions, not code.
_ALLOWED_MODULE_PREFIXES = ("numpy.dtypes",)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS or module in _ALLOWED_MODULE_PREFIXES:
            return super().find_class(module, name)
        raise UnsafeRecordError(
            f"refusing to load: the file asks to call {module}.{name}, which a BackdoorBench record never "
            "holds (a crafted file could run code this way). If you made this file yourself and trust it, "
            "rerun with --trust-record."
        )


# torch.load takes a module-like object with Unpickler/load/Unpickler attributes.
restricted_pickle = types.SimpleNamespace(
    Unpickler=_RestrictedUnpickler,
    load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load(),
    __name__="pgbd_defense.restricted_pickle",
)


def safe_torch_load(path, trust: bool = False, map_location: str = "cpu") -> Any:
    """``torch.load`` that refuses globals outside :data:`ALLOWED_GLOBALS` unless ``trust``."""
    if trust:
        log.warning("loading %s with full unpickling (--trust-record): the file can run code", path)
        return torch.load(path, map_location=map_location, weights_only=False)
    return torch.load(path, map_location=map_location, weights_only=False, pickle_module=restricted_pickle)
