"""From a preset, a YAML file and explicit values to the settings of one run.

Settings flow one way: the preset gives every field (with the defense's changes,
``presets.py``), a YAML file overrides it, explicit values (command-line flags, a
cell's overrides) override both, and the result is checked field by field and saved
beside the results. YAML keys are ours (``fields.py``) or BackdoorBench's for the same
thing (:data:`YAML_ALIASES`); BackdoorBench keys that mean nothing here are accepted and
logged as ignored (:data:`IGNORED_KEYS`); any other key is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterator, Mapping, Optional

import yaml

from ..errors import ConfigError
from .fields import DEFAULT_PRESET, FIELDS, PRESET_NAMES, SECTIONS, Field
from .presets import DEFENSE_OVERRIDES

log = logging.getLogger(__name__)

# PGBD's variants by every name they answer to (--variant, YAML's variant/defense keys).
DEFENSE_ALIASES = {"nt": "nt-pgbd", "st": "st-pgbd"}
VARIANT_NAMES = {"pgbd": "pgbd", "nt": "nt-pgbd", "st": "st-pgbd"}


def canonical_defense(name: str) -> str:
    return DEFENSE_ALIASES.get(name, name)


@dataclass(frozen=True)
class Alias:
    """A BackdoorBench YAML key for one of our fields. When a file gives both, ``wins`` says
    which is used: the benchmark's key where its script reads that key and not ours."""

    key: str
    field: str
    wins: bool
    note: str


YAML_ALIASES = {a.key: a for a in [
    Alias("momentum", "sgd_momentum", False, "BackdoorBench's nad YAML has it; its scripts read sgd_momentum"),
    Alias("weight_decay", "wd", False, "BackdoorBench's nad YAML has it; its scripts read wd"),
    Alias("client_optimizer", "optimizer", False, "BackdoorBench's name of the optimizer"),
    Alias("n_rounds", "epochs", True, "BackdoorBench's i-bau.py reads n_rounds, never epochs"),
    Alias("dataset_path", "data_root", False, "BackdoorBench's name of the data root"),
    Alias("rho_max", "rho", True, "BackdoorBench's ft-sam YAML; its script's argparse default (2.0) wins over it"),
]}
# NAD's per-layer weights, three keys in BackdoorBench's YAML.
BETA_KEYS = ("beta1", "beta2", "beta3")

# BackdoorBench keys that mean nothing here: accepted, logged, not used.
IGNORED_KEYS = {
    "pin_memory": "data are held in memory",
    "non_blocking": "data are held in memory",
    "prefetch": "data are held in memory",
    "num_workers": "data are held in memory",
    "checkpoint_load": "resume with --resume instead",
    "checkpoint_save": "the checkpoint is <defense folder>/checkpoint/last.pt",
    "log": "the log is <defense folder>/log/",
    "frequency_save": "the last finished epoch is always saved",
    "yaml_path": "a YAML file does not name itself",
}

# Values BackdoorBench spells as torch class names.
VALUE_ALIASES = {
    "lr_scheduler": {"CosineAnnealingLR": "cosine", "MultiStepLR": "multistep", "none": "constant",
                     "None": "constant", None: "constant"},
    "te_lr_scheduler": {"CosineAnnealingLR": "cosine", "MultiStepLR": "multistep", None: ""},
}


class Settings(Mapping[str, Any]):
    """The settings of one run: every field of ``fields.py`` with its final value, the preset
    and defense they were resolved for, and which fields were given explicitly."""

    def __init__(self, values: Dict[str, Any], preset: str, defense: str, explicit: FrozenSet[str] = frozenset()):
        self._values = values
        self.preset = preset
        self.defense = defense
        self.explicit = frozenset(explicit)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings(preset={self.preset!r}, defense={self.defense!r}, explicit={sorted(self.explicit)})"

    def section(self, name: str) -> Dict[str, Any]:
        """The values a part consumes, under its own attribute names (``Field.uses``)."""
        if name not in SECTIONS:
            raise KeyError(f"no section {name!r}; sections: {', '.join(SECTIONS)}")
        return {f.uses[name]: _copy(self._values[f.name]) for f in FIELDS.values() if name in f.uses}

    def replace(self, **changes: Any) -> "Settings":
        """A copy with some fields changed (checked as explicit values are)."""
        values = dict(self._values)
        for key, value in changes.items():
            values[key] = check_value(_field(key), value, "value")
        return Settings(values, self.preset, self.defense, self.explicit)

    def saved(self) -> Dict[str, Any]:
        """What ``config.yaml`` holds: every field, the preset and the defense."""
        return {**{k: _copy(v) for k, v in self._values.items()}, "preset": self.preset, "defense": self.defense}


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _field(key: str) -> Field:
    try:
        return FIELDS[key]
    except KeyError:
        raise ConfigError(f"unknown setting {key!r}; valid settings: {', '.join(sorted(FIELDS))}") from None


def read_yaml(path: Optional[str]) -> Dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p} must hold a mapping of keys to values, not a {type(loaded).__name__}")
    return loaded


def check_value(f: Field, value: Any, where: str) -> Any:
    """``value`` as the field's type, or a ConfigError naming the key and what is expected."""
    value = VALUE_ALIASES.get(f.name, {}).get(value, value) if _hashable(value) else value
    if f.name == "optimizer" and isinstance(value, str):
        value = value.lower()
    if value is None:
        if f.optional:
            return None
        raise ConfigError(f"{where} {f.name!r} must be {_kind(f)}, got null")
    try:
        value = _typed(f.type, f.item, value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} {f.name!r} must be {_kind(f)}, got {value!r}") from None
    if f.choices and value not in f.choices:
        raise ConfigError(f"{f.name}={value!r} (choose {', '.join(repr(c) for c in f.choices)})")
    return value


def _hashable(value: Any) -> bool:
    return not isinstance(value, (list, dict, set))


def _kind(f: Field) -> str:
    return f"a list of {f.item.__name__}" if f.type is list else f.type.__name__


def _typed(kind: type, item: Optional[type], value: Any) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if isinstance(value, bool):  # True is an int in Python, never a number here
        raise TypeError
    if kind is int:
        if not isinstance(value, int):
            raise TypeError
        return value
    if kind is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        raise TypeError
    if kind is str:
        if isinstance(value, int) or isinstance(value, str):  # target: 3 means the class index 3
            return str(value)
        raise TypeError
    if kind is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_typed(item, None, v) for v in value]
    raise TypeError


def bench_yaml(values: Mapping[str, Any], source: str = "config") -> Dict[str, Any]:
    """YAML values with BackdoorBench's keys turned into ours and its meaningless keys dropped
    (logged). Unknown keys are an error."""
    out = dict(values)
    ignored = sorted(k for k in out if k in IGNORED_KEYS)
    for k in ignored:
        out.pop(k)
    if ignored:
        log.info("%s: ignored BackdoorBench keys: %s", source,
                 "; ".join(f"{k} ({IGNORED_KEYS[k]})" for k in ignored))
    if out.get("teacher_model_loc") is not None:
        raise ConfigError(f"{source}: teacher_model_loc={out['teacher_model_loc']!r}: NAD here always trains its "
                          "teacher (te_epochs); loading a trained one is not supported. Remove the key or set it null")
    out.pop("teacher_model_loc", None)
    betas = [out.pop(k) for k in BETA_KEYS if k in out]
    if betas:
        betas = check_value(FIELDS["betas"], betas, f"{source} keys beta1..beta3:")
        _merge_alias(out, "betas", betas, False, "BackdoorBench's beta1..beta3", source, "beta1..beta3")
    if "rho_min" in out:
        rho_min = check_value(FIELDS["rho"], out.pop("rho_min"), f"{source} key rho_min:")
        rho = out.get("rho_max", out.get("rho"))
        if rho is not None and rho_min != check_value(FIELDS["rho"], rho, f"{source} key rho:"):
            raise ConfigError(f"{source}: rho_min={rho_min} differs from rho={rho}: FT-SAM here keeps one radius "
                              "(a radius schedule is not implemented); set rho_min equal to rho_max")
    for key, alias in YAML_ALIASES.items():
        if key in out:
            _merge_alias(out, alias.field, out.pop(key), alias.wins, alias.note, source, key)
    unknown = [k for k in out if k not in FIELDS]
    if unknown:
        raise ConfigError(f"{source}: unknown config keys {unknown}; valid keys: {', '.join(sorted(FIELDS))} "
                          f"(and BackdoorBench's {', '.join(sorted([*YAML_ALIASES, *BETA_KEYS, *IGNORED_KEYS]))})")
    return out


def _merge_alias(out: Dict[str, Any], field: str, value: Any, wins: bool, note: str, source: str, key: str) -> None:
    """Set ``field`` from BackdoorBench's ``key``; when the file gives both, differently, say which is used."""
    if field in out and out[field] != value:
        log.warning("%s: %s: %r and %s: %r both given; using %s (%s)", source, key, value, field, out[field],
                    key if wins else field, note)
        if not wins:
            return
    out[field] = value


def resolve(preset: Optional[str] = None, defense: Optional[str] = None,
            yaml_values: Optional[Mapping[str, Any]] = None, overrides: Optional[Mapping[str, Any]] = None,
            source: str = "config") -> Settings:
    """The settings of one run.

    Args:
        preset: ``cpu``, ``paper`` or ``bench``; default: the YAML's ``preset`` key, else ``cpu``.
        defense: the defense (``nt``/``st`` name PGBD's variants); default: the YAML's
            ``defense`` or ``variant`` key, else ``pgbd``.
        yaml_values: a YAML file's mapping (``read_yaml``), our keys or BackdoorBench's.
        overrides: explicit values (command-line flags, a cell's settings); ``None`` values are
            ignored. These are the run's :attr:`Settings.explicit` fields.
        source: how errors name where the YAML values came from.

    >>> resolve("cpu", overrides={"lr": 0.05})["lr"]
    0.05
    """
    yaml_values = dict(yaml_values or {})
    yaml_preset = yaml_values.pop("preset", None)
    named = [yaml_values.pop(k, None) for k in ("defense", "variant")]
    for key, value in (("preset", yaml_preset), ("defense", named[0]), ("variant", named[1])):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{source} key {key!r} must name one, got {value!r}")
    preset = preset or yaml_preset or DEFAULT_PRESET
    if preset not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    defense = canonical_defense(defense or next((n for n in named if n), None) or "pgbd")
    values = {name: _copy(f.value_in(preset)) for name, f in FIELDS.items()}
    for key, value in DEFENSE_OVERRIDES.get(preset, {}).get(defense, {}).items():
        values[key] = _copy(value)
    for key, value in bench_yaml(yaml_values, source).items():
        values[key] = check_value(FIELDS[key], value, f"{source} key")
    explicit = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, value in explicit.items():
        values[key] = check_value(_field(key), value, "setting")
    return Settings(values, preset, defense, frozenset(explicit))

