"""Load BackdoorBench ``.pt`` files without letting them run code.

A record is a pickle, and unpickling calls whatever callable the file names. The
benchmark's records hold only tensors, numpy arrays and scalars, PIL images and
builtin containers, so :func:`safe_torch_load` admits exactly those globals and
refuses anything else with :class:`UnsafeRecordError`. ``trust=True`` falls back
to ``torch.load(weights_only=False)`` for files the user vouches for.
"""

from __future__ import annotations

import logging
import os
import pickle
import types
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import UserError

log = logging.getLogger(__name__)


class UnsafeRecordError(UserError, pickle.UnpicklingError):
    """The file names a global outside the allow-list: it may run code when loaded."""


class UnreadableFileError(UserError, ValueError):
    """Not a torch file, or a truncated, corrupted or oversized one."""


# torch.save writes uncompressed zip archives; a larger total than this is refused
# before anything is read (override with PGBD_MAX_LOAD_BYTES).
DEFAULT_MAX_BYTES = 16 * 2**30


def check_archive(path: Path, max_bytes: Optional[int] = None) -> None:
    """Refuse archives that torch.save would not write, or that declare more data
    than the limit, before any of their content is unpacked."""
    limit = max_bytes or int(os.environ.get("PGBD_MAX_LOAD_BYTES", DEFAULT_MAX_BYTES))
    if not path.is_file():
        raise UnreadableFileError(f"{path} does not exist or is not a file")
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format: left to the restricted unpickler
    on_disk = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UnreadableFileError(f"{path} is a damaged archive ({e})") from None
    for info in entries:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size > on_disk:
            raise UnreadableFileError(
                f"{path}: entry {info.filename!r} is compressed or declares {info.file_size} bytes in a "
                f"{on_disk}-byte file; torch.save never writes that (a crafted or damaged file)")
    total = sum(i.file_size for i in entries)
    if total > limit:
        raise UnreadableFileError(f"{path} holds {total} bytes, over the {limit}-byte limit; "
                                  "raise PGBD_MAX_LOAD_BYTES if the file is genuine")


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


def safe_torch_load(path, trust: bool = False, map_location: str = "cpu", max_bytes: Optional[int] = None) -> Any:
    """``torch.load`` that refuses globals outside :data:`ALLOWED_GLOBALS` unless ``trust``.

    Every failure is an :class:`UnsafeRecordError` or :class:`UnreadableFileError`."""
    path = Path(path)
    check_archive(path, max_bytes)
    try:
        if trust:
            log.warning("loading %s with full unpickling (--trust-record): the file can run code", path)
            return torch.load(path, map_location=map_location, weights_only=False)
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=restricted_pickle)
    except UnsafeRecordError:
        raise
    except Exception as e:  # the boundary to untrusted bytes: every failure becomes one clear error
        raise UnreadableFileError(f"{path} is not a readable torch file ({type(e).__name__}: {e}); "
                                  "was it truncated, or written by another program?") from None
