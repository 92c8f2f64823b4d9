"""Command-line flags generated from the field table, in two spellings: ours
(``--batch-size``, booleans as ``--augment/--no-augment``) for ``python -m pgbd_defense.run``,
and BackdoorBench's (``--batch_size``, booleans as ``--augment true``) for the launcher a
checkout gets. :func:`launcher_flags` renders settings back into the launcher's spelling,
which is what ``run --bench-root`` forwards."""

from __future__ import annotations

import argparse
from typing import Any, Dict, Iterable, List, Mapping, Tuple

from ..errors import ConfigError
from .fields import FIELD_LIST, FIELDS, Field
from .resolve import check_value

# Argument-group titles of the sections, in the order --help shows them.
GROUP_TITLES = {
    "attack": "attack (the standalone path makes the record with these)",
    "run": "data, clean subset and evaluation",
    "loop": "fine-tuning loop (every defense)",
    "selection": "which epoch is returned (clean held-out data only)",
    "targets": "targets and target inference",
    "pgbd": "PGBD and its variants",
    "mapping": "PGBD's large-model mapping",
    "nad": "NAD",
    "ftsam": "FT-SAM",
    "ibau": "I-BAU",
    "mcl": "MCL",
}

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def list_parser(item: type):
    """Comma-separated values (an empty string is the empty list)."""
    def parse(text: str) -> list:
        try:
            return [item(v.strip()) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__} values, got {text!r}") from None

    parse.__name__ = f"list of {item.__name__}"
    return parse


def primary_section(f: Field) -> str:
    """The section a field is listed under in --help (PGBD's before the shared ones it also feeds)."""
    for name in ("pgbd", "nad", "ftsam", "ibau", "mcl", "targets", "mapping", "selection", "loop", "attack", "run"):
        if name in f.uses:
            return name
    return "run"


def _kwargs(f: Field, spelling: str) -> Dict[str, Any]:
    kw: Dict[str, Any] = {"dest": f.name, "default": None}
    help_text = f.help + (f" [choices: {', '.join(repr(c) for c in f.choices)}]" if f.choices else "")
    if not f.presets:
        defaults = f" (default: {f.default!r})"
    else:
        defaults = f" (paper: {f.default!r}" + "".join(f", {p}: {v!r}" for p, v in f.presets.items()) + ")"
    kw["help"] = (help_text + defaults).replace("%", "%%")
    if f.type is bool:
        if spelling == "ours":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"], kw["metavar"] = parse_bool, "true|false"
    elif f.type is list:
        kw["type"], kw["metavar"] = list_parser(f.item), f"{f.item.__name__},..."
    else:
        kw["type"] = f.type
    return kw


def add_setting_arguments(parser: argparse.ArgumentParser, spelling: str = "ours",
                          skip: Iterable[str] = ()) -> None:
    """One option per field of the table (but ``skip``), grouped by the part consuming it.
    ``spelling``: ``ours`` (``--batch-size``) or ``bench`` (``--batch_size``, the launcher's)."""
    if spelling not in ("ours", "bench"):
        raise ValueError(f"spelling must be 'ours' or 'bench', not {spelling!r}")
    skip = set(skip)
    groups = {name: parser.add_argument_group(title) for name, title in GROUP_TITLES.items()}
    for f in FIELD_LIST:
        if f.name in skip:
            continue
        flags = f.flags if spelling == "ours" else (f.launcher_flag,)
        groups[primary_section(f)].add_argument(*flags, **_kwargs(f, spelling))


def parse_assignment(text: str) -> Tuple[str, Any]:
    """``KEY=VALUE`` for a field of the table, the value typed as the field's (lists comma-separated)."""
    key, sep, value = text.partition("=")
    if not sep or key not in FIELDS:
        raise ConfigError(f"{text!r}: write KEY=VALUE with KEY a setting (docs/settings.md), e.g. amp=true")
    f = FIELDS[key]
    try:
        parsed = parse_bool(value) if f.type is bool else list_parser(f.item)(value) if f.type is list else \
            None if (f.optional and value in ("", "null", "none")) else f.type(value)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{text!r}: {key} takes {f.type.__name__} values ({e})") from None
    return key, check_value(f, parsed, "setting")


def explicit_values(args: argparse.Namespace, skip: Iterable[str] = ()) -> Dict[str, Any]:
    """The fields given on a command line parsed with :func:`add_setting_arguments`."""
    skip = set(skip)
    return {name: getattr(args, name) for name in FIELDS if name not in skip and getattr(args, name, None) is not None}


def render(f: Field, value: Any) -> str:
    """A value as the launcher's parser reads it back (floats round-trip exactly)."""
    if f.type is bool:
        return "true" if value else "false"
    if f.type is list:
        return ",".join(str(v) for v in value)
    return repr(value) if f.type is float else str(value)


def launcher_flags(values: Mapping[str, Any]) -> List[str]:
    """``values`` (field -> value) as the launcher's command-line flags."""
    out: List[str] = []
    for name, value in values.items():
        f = FIELDS[name]
        if value is None:
            continue
        out += [f.launcher_flag, render(f, value)]
    return out
