"""Attacks for the standalone path; each writes a BackdoorBench-format record."""

from . import badnet, blended, inputaware, rof, sig, trojan, wanet  # noqa: F401  (each registers itself)
from .base import ATTACKS, Attack, label_mapping  # noqa: F401
