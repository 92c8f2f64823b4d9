"""Attacks for the standalone path; each writes a BackdoorBench-format record."""

from .base import ATTACKS, Attack, label_mapping  # noqa: F401
from . import badnet, blended, sig, trojan, wanet  # noqa: F401  (each registers itself)
from .. import rof  # noqa: E402,F401  (the ROF semantic attacks, beside their data set)
