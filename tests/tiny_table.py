"""A Table 2 preset on the tests' tiny generated data, registered under the name ``tiny``,
for tests that run the table command in a subprocess:

    python tests/tiny_table.py --preset tiny --data-root D --record-root R --out O ...

TINY_EPOCHS (environment) sets the defenses' epochs (default 1)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pgbd_defense.attacks.record import AttackSettings  # noqa: E402
from pgbd_defense.experiments import table2  # noqa: E402


def register() -> None:
    table2.PRESETS["tiny"] = table2.TablePreset(
        datasets=["mnist"], attacks=["badnet"], defenses=["ft", "pgbd"], pratio=0.3,
        attack=AttackSettings(width=0.0625, epochs=8, lr=0.05, batch_size=16, augment=False),
        defense_settings={"epochs": int(os.environ.get("TINY_EPOCHS", "1")), "batch_size": 16}, ratio=0.5,
        forced=["tiny generated data"])
    table2.GATES[("tiny", "equal-budget", 0.3)] = table2.Gate(min_poisoned_asr=0.0, default_max_asr=1.0,
                                                              min_mean_dem=0.0)


if __name__ == "__main__":
    register()
    sys.exit(table2.main(sys.argv[1:]))
