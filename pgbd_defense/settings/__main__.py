"""``python -m pgbd_defense.settings``: the field table as Markdown (``docs/settings.md`` is
this output; a test keeps the two equal)."""

import sys

from .fields import FIELD_LIST, PRESET_NAMES, Field
from .presets import DEFENSE_OVERRIDES
from .resolve import IGNORED_KEYS, YAML_ALIASES

HEADER = """# Settings

Every setting of a run, generated from `pgbd_defense/settings/fields.py` by
`python -m pgbd_defense.settings > docs/settings.md` (a test keeps this file equal to that
output). A setting is a YAML key (`--config`; its name, or BackdoorBench's spelling below),
a flag of `python -m pgbd_defense.run` (column "flag") and a flag of the launcher a
BackdoorBench checkout gets (`defense/pgbd.py`, column "launcher flag"). Precedence: flag >
YAML > the preset's value; the final values are saved as `config.yaml` beside the results, and
`--dry-run` prints them without running anything. `used by` names the part that consumes
the value (section: attribute of its config).

Presets: `cpu` (the default), `paper`, `bench` (`paper` with each baseline exactly as
BackdoorBench runs it, last epoch reported). A defense changes some values in a preset
(table at the end).
"""


def _value(v) -> str:
    return "null" if v is None else f"`{v!r}`" if not isinstance(v, list) else f"`{v}`"


def _presets(f: Field) -> str:
    values = {p: f.value_in(p) for p in PRESET_NAMES}
    if len({repr(v) for v in values.values()}) == 1:
        return _value(f.default)
    return ", ".join(f"{p}: {_value(v)}" for p, v in values.items())


def markdown() -> str:
    lines = [HEADER, "| setting | flag | launcher flag | type | value per preset | used by | what it is |",
             "|---|---|---|---|---|---|---|"]
    for f in FIELD_LIST:
        kind = f"list of {f.item.__name__}" if f.type is list else f.type.__name__
        kind += " or null" if f.optional else ""
        kind += "; " + " / ".join(f"`{c}`" for c in f.choices) if f.choices else ""
        used = ", ".join(f"{s}: `{a}`" for s, a in f.uses.items())
        what = f.help + (f" *BackdoorBench: {f.bench_note}.*" if f.bench_note else "")
        lines.append(f"| `{f.name}` | `{' / '.join(f.flags)}` | `{f.launcher_flag}` | {kind} | {_presets(f)} | {used} "
                     f"| {what.replace('|', '/')} |")
    lines += ["", "## BackdoorBench's YAML keys", "",
              "| BackdoorBench key | sets | when a file gives both |", "|---|---|---|"]
    for a in YAML_ALIASES.values():
        lines.append(f"| `{a.key}` | `{a.field}` | {'this key wins' if a.wins else f'`{a.field}` wins'} ({a.note}) |")
    lines += ["| `beta1`, `beta2`, `beta3` | `betas` | `betas` wins |",
              "| `rho_min` | (checked: must equal `rho`; a radius schedule is not implemented) | |",
              "| `teacher_model_loc` | (must be null: NAD here always trains its teacher) | |",
              "| `preset`, `defense`, `variant` | the preset and the defense (flags win) | |", "",
              "Accepted and ignored (logged): " + "; ".join(f"`{k}` ({why})" for k, why in IGNORED_KEYS.items()) + ".",
              "", "## What each defense changes in a preset", ""]
    for changes in {id(c): c for c in DEFENSE_OVERRIDES.values()}.values():  # paper and bench share one table
        presets = " and ".join(f"`{p}`" for p, c in DEFENSE_OVERRIDES.items() if c is changes)
        for defense, values in changes.items():
            lines.append(f"- {presets}, {defense}: " + ", ".join(f"{k} {_value(v)}" for k, v in values.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
