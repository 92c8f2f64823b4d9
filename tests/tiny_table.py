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

# The numbers two runs of the same grid must agree on to the last digit.
NUMBERS = ["ca", "asr", "ra", "dem", "ca_poisoned", "asr_poisoned", "selected_epoch"]


def use_in_test(monkeypatch) -> None:
    """Register the preset and its gate for one test (monkeypatch restores the registries after)."""
    monkeypatch.setitem(table2.PRESETS, "tiny", None)
    monkeypatch.setitem(table2.GATES, ("tiny", "equal-budget", 0.3), None)
    register()


def argv(data, root, out, *extra) -> list:
    """table2's arguments for the tiny grid (FT and PGBD, seeds 0-1, one thread per cell)."""
    return ["--preset", "tiny", "--protocol", "equal-budget", "--seeds", "0,1", "--data-root", str(data),
            "--record-root", str(root), "--out", str(out), "--threads", "1", "--no-progress", *extra]


def defense_cells(out):
    """The defense rows of ``out/cells.csv`` (not the records'), indexed by (defense, seed)."""
    import pandas as pd

    cells = pd.read_csv(Path(out) / "cells.csv")
    cells = cells[cells["defense"] != "(attack)"]
    return cells.sort_values(["defense", "seed"]).set_index(["defense", "seed"])


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
