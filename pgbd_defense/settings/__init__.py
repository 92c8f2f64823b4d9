"""Every setting of a run, described once (``fields.py``), the presets' per-defense changes
(``presets.py``), how a preset, a YAML file and explicit values become one run's settings
(``resolve.py``), and the command-line flags generated from the table (``cli.py``)."""

from ..errors import ConfigError  # noqa: F401
from .fields import DEFAULT_PRESET, FIELD_LIST, FIELDS, PRESET_NAMES, SECTIONS, Field, preset_default  # noqa: F401
from .presets import BENCH_DEFENSES, DEFENSE_OVERRIDES  # noqa: F401
from .resolve import IGNORED_KEYS, VARIANT_NAMES, YAML_ALIASES, Settings, canonical_defense, read_yaml, resolve  # noqa: F401
