"""Table 2 assembly on fixed inputs, the CI gate, cached cells, and the sweep's helpers."""

import math

import pandas as pd
import pytest

import pgbd_defense.experiments.cells as cells_module
from pgbd_defense.experiments.cells import Cell, run_cell, shared_index
from pgbd_defense.experiments.sweep import GridError, pareto_front, parse_grid
from pgbd_defense.experiments.table2 import gate, seeds_table
from pgbd_defense.experiments.tables import MEAN, dem_bar_chart, ranks, to_latex, to_markdown, wide_table, write_table

from .test_records import _write

DEFENSES = ["ft", "pgbd"]


def _row(attack, dataset, defense, ca, asr, dem, status="ok"):
    return {"attack": attack, "dataset": dataset, "defense": defense, "ca_poisoned": 0.9, "asr_poisoned": 1.0,
            "ca": ca, "asr": asr, "dem": dem, "status": status}


ROWS = [_row("badnet", "d1", "ft", 0.80, 0.10, 0.90), _row("badnet", "d1", "pgbd", 0.85, 0.02, 0.96),
        _row("badnet", "d2", "ft", 0.70, 0.30, 0.70), _row("badnet", "d2", "pgbd", 0.75, 0.04, 0.90),
        _row("sig", "d1", "ft", 0.88, 0.05, 0.95), _row("sig", "d1", "pgbd", 0.60, 0.01, 0.82)]


def test_wide_table_has_mean_rows_per_attack():
    df = wide_table(ROWS, DEFENSES)
    assert list(df.index) == [("badnet", "d1"), ("badnet", "d2"), ("badnet", MEAN), ("sig", "d1"), ("sig", MEAN)]
    assert df.loc[("badnet", MEAN), ("ft", "ca")] == pytest.approx(0.75)
    assert df.loc[("badnet", MEAN), ("pgbd", "dem")] == pytest.approx(0.93)
    assert df.loc[("sig", MEAN), ("No defense", "asr")] == pytest.approx(1.0)


def test_a_failed_cell_is_missing_and_its_mean_too():
    rows = ROWS[:3] + [_row("badnet", "d2", "pgbd", 0.0, 0.0, 0.0, status="failed")]
    df = wide_table(rows, DEFENSES)
    assert math.isnan(df.loc[("badnet", "d2"), ("pgbd", "ca")])
    assert math.isnan(df.loc[("badnet", MEAN), ("pgbd", "ca")])


def test_best_is_bold_and_second_underlined_per_metric():
    df = wide_table(ROWS, ["ft", "pgbd"])
    row = df.loc[("sig", "d1")]
    assert ranks(row, DEFENSES, "ca") == {"ft": 1, "pgbd": 2}
    assert ranks(row, DEFENSES, "asr") == {"pgbd": 1, "ft": 2}  # lower ASR is better
    md = to_markdown(df, DEFENSES)
    sig_line = next(line for line in md.splitlines() if line.startswith("| sig | d1"))
    assert sig_line == ("| sig | d1 | 90.00 | 100.00 | **88.00** | <u>5.00</u> | **0.950** | <u>60.00</u> | **1.00** "
                        "| <u>0.820</u> |")
    tex = to_latex(df, DEFENSES)
    assert r"\textbf{88.00}" in tex and r"\underline{60.00}" in tex and tex.count(r"\midrule") == 3


def test_ties_share_the_rank():
    row = pd.Series({("a", "dem"): 0.9, ("b", "dem"): 0.9, ("c", "dem"): 0.5})
    assert ranks(row, ["a", "b", "c"], "dem") == {"a": 1, "b": 1, "c": 2}


def test_written_files_and_chart(tmp_path):
    df = wide_table(ROWS, DEFENSES)
    paths = write_table(df, DEFENSES, tmp_path)
    back = pd.read_csv(paths["csv"], index_col=[0, 1])
    assert back.loc[("badnet", MEAN), "pgbd_dem"] == pytest.approx(0.93)
    png = dem_bar_chart(df, DEFENSES, tmp_path / "dem.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gate_names_each_failure():
    rows = [_row("badnet", "d1", "pgbd", 0.85, 0.02, 0.96), _row("sig", "d1", "pgbd", 0.80, 0.20, 0.85)]
    rows[1]["asr_poisoned"] = 0.7
    df = wide_table(rows, ["pgbd"])
    cells = pd.DataFrame([{**r, "status": "ok"} for r in rows] +
                         [{"attack": "wanet", "dataset": "d1", "defense": "pgbd", "status": "failed",
                           "error": "boom", "log": "x.log"}])
    failures = gate(df, cells)
    text = "\n".join(failures)
    assert "sig/d1: poisoned model ASR 0.7000 < 0.80" in text
    assert "sig/d1: pgbd ASR 0.2000 > 0.10" in text
    assert "pgbd mean DEM 0.9050 < 0.90" not in text  # 0.905 passes
    assert "wanet/d1 failed: boom (log x.log)" in text
    assert gate(wide_table(rows[:1], ["pgbd"]), cells.iloc[:1]) == []


def test_gate_takes_the_median_over_seeds_and_lists_them():
    rows = [_row("blended", "d1", "pgbd", 0.84, 0.119, 0.917), _row("sig", "d1", "pgbd", 0.85, 0.02, 0.99)]
    df = wide_table(rows, ["pgbd"])
    cells = pd.DataFrame([{**r, "status": "ok"} for r in rows])
    assert "blended/d1: pgbd ASR 0.1190 > 0.10" in gate(df, cells)
    repeats = pd.DataFrame([
        {"attack": "blended", "dataset": "d1", "seed": 1, "asr": 0.0002, "dem": 0.99},
        {"attack": "blended", "dataset": "d1", "seed": 2, "asr": 0.0, "dem": 0.995},
        {"attack": "sig", "dataset": "d1", "seed": 1, "asr": 0.30, "dem": 0.80},
        {"attack": "sig", "dataset": "d1", "seed": 2, "asr": 0.25, "dem": 0.82}])
    failures = gate(df, cells, repeats=repeats)
    # blended: median of (0.119, 0.0002, 0) passes; sig: median of (0.02, 0.30, 0.25) = 0.25 fails
    assert failures[0] == "sig/d1: pgbd median ASR over 3 seeds (0.0200, 0.3000, 0.2500) 0.2500 > 0.10"
    # mean over attacks of the per-attack median DEM: (0.99 + 0.82) / 2 = 0.905 passes
    assert len(failures) == 1
    md = seeds_table(df, repeats)
    assert "| blended | d1 | 11.90 | 0.02 | 0.00 | 0.02 | 0.990 |" in md
    assert "| sig | d1 | 2.00 | 30.00 | 25.00 | 25.00 | 0.820 |" in md


def test_finished_cells_are_read_not_rerun(tmp_path, tiny_data, monkeypatch):
    folder, *_ = _write(tmp_path, tiny_data, save_png=False)
    index = shared_index(folder, 0.5, 0, str(tiny_data))
    assert len(index.read_text().split()) == 60 and shared_index(folder, 0.5, 0, str(tiny_data)) == index
    cell = Cell(folder, "ft", {"index": str(index), "epochs": 1, "batch_size": 16})
    first = run_cell(cell, str(tiny_data))
    assert first["status"] == "ok" and 0 <= first["ca"] <= 1
    monkeypatch.setattr(cells_module, "defend", lambda *a, **k: pytest.fail("a finished cell was recomputed"))
    again = run_cell(cell, str(tiny_data))
    assert again["status"] == "cached" and again["ca"] == first["ca"]
    other = Cell(folder, "ft", {**cell.settings, "lr": 0.5})  # other settings: another cell
    assert other.name != cell.name
    assert Cell(folder, "ft", {"batch_size": 16, "epochs": 1, "index": str(index)}).name == cell.name  # any order
    assert Cell(folder, "ft", cell.settings, preset="paper").name != cell.name


def test_a_cached_cell_made_under_other_preset_values_is_recomputed(tmp_path, tiny_data, monkeypatch):
    import dataclasses

    from pgbd_defense.settings import FIELDS

    folder, *_ = _write(tmp_path, tiny_data, save_png=False)
    index = shared_index(folder, 0.5, 0, str(tiny_data))
    cell = Cell(folder, "ft", {"index": str(index), "epochs": 1, "batch_size": 16})
    assert run_cell(cell, str(tiny_data))["status"] == "ok"
    lr = FIELDS["lr"]
    monkeypatch.setitem(FIELDS, "lr", dataclasses.replace(lr, presets={**lr.presets, "cpu": 0.5}))
    assert run_cell(cell, str(tiny_data))["status"] == "ok"  # recomputed, not "cached"


def test_a_failing_cell_becomes_a_row(tmp_path, tiny_data):
    folder, *_ = _write(tmp_path, tiny_data, save_png=False)
    row = run_cell(Cell(folder, "ft", {"layer": "no.such.layer"}), str(tiny_data))
    assert row["status"] == "failed" and "LayerNotFoundError" in row["error"] and "no.such.layer" in row["error"]


def test_grid_parsing_and_errors():
    assert parse_grid("lr=0.1,0.2 lambda=1") == [{"lr": 0.1, "lambda": 1.0}, {"lr": 0.2, "lambda": 1.0}]
    assert parse_grid("loss_form=cos freeze_bn=true,false epochs=2") == [
        {"loss_form": "cos", "freeze_bn": True, "epochs": 2}, {"loss_form": "cos", "freeze_bn": False, "epochs": 2}]
    with pytest.raises(GridError, match="takes int"):
        parse_grid("epochs=1.5")
    with pytest.raises(GridError, match="unknown grid key"):
        parse_grid("nt_classes=1,2")  # a list setting cannot be an axis
    with pytest.raises(GridError, match="unknown grid key"):
        parse_grid("speed=1")
    with pytest.raises(GridError, match="key=v1,v2"):
        parse_grid("lr")


def test_pareto_front_keeps_only_undominated_points():
    pts = [(0.5, 0.9), (0.1, 0.8), (0.2, 0.7), (0.05, 0.6), (0.1, 0.85)]
    assert pareto_front(pts) == [(0.05, 0.6), (0.1, 0.85), (0.5, 0.9)]
