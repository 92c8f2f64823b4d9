"""Every defense the command line runs, by BackdoorBench's names. Each entry names its
config class and the settings sections it is built from (``settings/fields.py``), and
returns a :class:`Method` of the shared loop, so PGBD and the baselines get the same
data, budget, selection rule and output files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import ConfigError
from ..settings import VARIANT_NAMES
from ..util.registry import Registry
from .ftsam import FTSAMConfig, FTSAMMethod
from .ibau import IBAUConfig, IBAUMethod
from .loop import LoopConfig, Method
from .mcl import MCLConfig, MCLMethod
from .nad import NADConfig, NADMethod
from .pgbd import PGBDConfig, PGBDMethod


@dataclass(frozen=True)
class Defense:
    """A defense: its config class, the sections of the settings that fill it (``extra``:
    fixed values, e.g. PGBD's variant), and how its method is made from the config."""

    config: type
    sections: Tuple[str, ...]
    make: Callable[..., Method]
    extra: Mapping[str, Any] = None

    def build_config(self, sections: Mapping[str, Mapping[str, Any]], **changes: Any):
        values: Dict[str, Any] = {}
        for name in self.sections:
            values.update(sections[name])
        values.update(self.extra or {})
        values.update(changes)
        return self.config(**values)


DEFENSES: Registry = Registry("defense")

for _variant, _name in VARIANT_NAMES.items():  # pgbd, nt-pgbd, st-pgbd: one defense, three variants
    DEFENSES.register(_name)(Defense(PGBDConfig, ("loop", "pgbd"), PGBDMethod, {"variant": _variant}))


def _config_only(method_cls):
    """A baseline's method takes its config alone (no targets, layer or teacher)."""
    return lambda cfg, targets, layer, teacher: method_cls(cfg)


DEFENSES.register("ft")(Defense(LoopConfig, ("loop",), _config_only(Method)))
DEFENSES.register("nad")(Defense(NADConfig, ("loop", "nad"), _config_only(NADMethod)))
DEFENSES.register("ft-sam")(Defense(FTSAMConfig, ("loop", "ftsam"), _config_only(FTSAMMethod)))
DEFENSES.register("i-bau")(Defense(IBAUConfig, ("loop", "ibau"), _config_only(IBAUMethod)))
DEFENSES.register("mcl")(Defense(MCLConfig, ("loop", "mcl"),  # it inverts the trigger of the record's target
                                 lambda cfg, targets, layer, teacher: MCLMethod(cfg, targets)))

# The defenses the large-model mapping applies to (pure PAVs).
MAPPED = ("pgbd", "nt-pgbd")


def defense_config(name: str, settings, **changes: Any):
    """The config of defense ``name`` from resolved settings (checked: a bad value raises
    :class:`~pgbd_defense.errors.ConfigError` naming every problem)."""
    spec: Defense = DEFENSES.get(name)
    return spec.build_config({s: settings.section(s) for s in spec.sections}, **changes)


def build_method(name: str, settings, targets: torch.Tensor, layer: str,
                 teacher_features: Optional[torch.Tensor] = None, nt_order: Optional[Sequence[int]] = None) -> Method:
    """The method of defense ``name``; ``teacher_features`` (rows matching the training images)
    turn on PGBD's large-model mapping, ``nt_order`` replaces NT-PGBD's classes (the top of a
    target inference's ranking)."""
    if teacher_features is not None and name not in MAPPED:
        raise ConfigError(f"the large-model mapping is a setting of {' and '.join(MAPPED)}, not of {name}")
    changes = {"nt_classes": tuple(nt_order)} if nt_order is not None and name in ("pgbd", "nt-pgbd", "st-pgbd") \
        else {}
    spec: Defense = DEFENSES.get(name)
    method = spec.make(defense_config(name, settings, **changes), targets, layer, teacher_features)
    method.name = name
    return method
