"""Table 2 assembly on fixed inputs, the CI gate, cached cells, and the sweep's helpers."""

import json
import math

import pandas as pd
import pytest

import pgbd_defense.experiments.cells as cells_module
from pgbd_defense.experiments.cells import Cell, run_cell, shared_index
from pgbd_defense.experiments.stats import paired_vs_best, t_interval
from pgbd_defense.experiments.study import study_markdown
from pgbd_defense.experiments.sweep import GridError, pareto_front, parse_grid, parse_grids, point_label
from pgbd_defense.experiments.table2 import Gate, gate
from pgbd_defense.experiments.tables import (
    MEAN,
    dem_bar_chart,
    paired_markdown,
    seeded_frame,
    seeded_latex,
    seeded_markdown,
    write_seeded_table,
)

from .test_records import _write

DEFENSES = ["ft", "pgbd"]


def _cell(attack, dataset, defense, seed, ca, asr, dem, status="ok", record_seed=0):
    return {"attack": attack, "dataset": dataset, "defense": defense, "seed": seed, "record_seed": record_seed,
            "ca_poisoned": 0.9, "asr_poisoned": 1.0, "ca": ca, "asr": asr, "dem": dem, "status": status,
            "record": f"r_{attack}_{dataset}_{record_seed}", "seconds": 10.0 + seed}


# Two seeds per cell; d2 only for badnet.
CELLS = pd.DataFrame([
    _cell("badnet", "d1", "ft", 0, 0.80, 0.10, 0.90), _cell("badnet", "d1", "ft", 1, 0.82, 0.14, 0.88),
    _cell("badnet", "d1", "pgbd", 0, 0.85, 0.02, 0.96), _cell("badnet", "d1", "pgbd", 1, 0.83, 0.04, 0.94),
    _cell("badnet", "d2", "ft", 0, 0.70, 0.30, 0.70), _cell("badnet", "d2", "ft", 1, 0.70, 0.30, 0.70),
    _cell("badnet", "d2", "pgbd", 0, 0.75, 0.04, 0.90), _cell("badnet", "d2", "pgbd", 1, 0.75, 0.04, 0.90),
    _cell("sig", "d1", "ft", 0, 0.88, 0.05, 0.95), _cell("sig", "d1", "ft", 1, 0.86, 0.07, 0.93),
    _cell("sig", "d1", "pgbd", 0, 0.60, 0.01, 0.82), _cell("sig", "d1", "pgbd", 1, 0.90, 0.01, 0.99)])


def test_cells_show_mean_and_std_over_seeds_and_mean_rows_only_for_several_data_sets():
    df = seeded_frame(CELLS, DEFENSES)
    assert list(df.index) == [("badnet", "d1"), ("badnet", "d2"), ("badnet", MEAN), ("sig", "d1")]
    assert df.loc[("badnet", "d1"), ("ft", "ca_mean")] == pytest.approx(0.81)
    assert df.loc[("badnet", "d1"), ("ft", "ca_std")] == pytest.approx(0.0141421, rel=1e-4)  # sample std
    assert df.loc[("badnet", MEAN), ("pgbd", "dem_mean")] == pytest.approx(0.925)
    assert math.isnan(df.loc[("badnet", MEAN), ("pgbd", "dem_std")])
    md = seeded_markdown(df, DEFENSES)
    line = next(row for row in md.splitlines() if row.startswith("| badnet | d1"))
    assert line == ("| badnet | d1 | 90.00 | 100.00 | 81.00 ± 1.41 | 12.00 ± 2.83 | 0.890 ± 0.014 | 84.00 ± 1.41 "
                    "| 3.00 ± 1.41 | 0.950 ± 0.014 |")
    assert "**" not in md  # nothing is bold in the main table: the paired table decides
    assert r"$\pm$" in seeded_latex(df, DEFENSES)


def test_a_failed_replicate_is_left_out_of_its_cell_and_marked():
    cells = CELLS.copy()
    cells.loc[(cells["attack"] == "sig") & (cells["defense"] == "pgbd") & (cells["seed"] == 1), "status"] = "failed"
    df = seeded_frame(cells, DEFENSES)
    assert df.loc[("sig", "d1"), ("pgbd", "n")] == 1 and df.loc[("sig", "d1"), ("pgbd", "ca_mean")] == 0.60
    line = next(row for row in seeded_markdown(df, DEFENSES).splitlines() if row.startswith("| sig"))
    assert "60.00 (n=1)" in line


def test_t_interval_by_hand():
    mean, low, high = t_interval([0.1, 0.3, 0.2])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n)
    assert (mean, low, high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert math.isnan(t_interval([0.5])[1])


def test_paired_difference_against_the_best_other_defense():
    cells = pd.concat([CELLS, pd.DataFrame([
        _cell("badnet", "d1", "nad", 0, 0.8, 0.5, 0.60), _cell("badnet", "d1", "nad", 1, 0.8, 0.5, 0.60)])])
    paired = {(p.attack, p.dataset): p for p in paired_vs_best(cells, "pgbd", "dem")}
    p = paired[("badnet", "d1")]
    assert p.other == "ft" and p.differences == pytest.approx([0.06, 0.06])  # ft's mean DEM beats nad's
    assert p.verdict() == "better"  # sd 0: the interval is the point
    s = paired[("sig", "d1")]
    assert s.differences == pytest.approx([-0.13, 0.06]) and s.verdict() == "tie"
    md = paired_markdown(list(paired.values()))
    assert "| badnet | d1 | ft | +0.060, +0.060 | +0.060 | [+0.060, +0.060] | **pgbd ahead** |" in md
    assert "| tie |" in md


def test_written_files_and_chart(tmp_path):
    df = seeded_frame(CELLS, DEFENSES)
    paths = write_seeded_table(df, DEFENSES, tmp_path)
    back = pd.read_csv(paths["csv"], index_col=[0, 1])
    assert back.loc[("badnet", MEAN), "pgbd_dem_mean"] == pytest.approx(0.925)
    png = dem_bar_chart(df, DEFENSES, tmp_path / "dem.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gate_names_each_failure_and_takes_medians_over_replicates():
    cells = pd.DataFrame([
        _cell("blended", "d1", "pgbd", 0, 0.84, 0.119, 0.917), _cell("blended", "d1", "pgbd", 1, 0.84, 0.0002, 0.99),
        _cell("blended", "d1", "pgbd", 2, 0.84, 0.0, 0.995),
        _cell("sig", "d1", "pgbd", 0, 0.85, 0.02, 0.99), _cell("sig", "d1", "pgbd", 1, 0.85, 0.30, 0.80),
        _cell("sig", "d1", "pgbd", 2, 0.85, 0.25, 0.82),
        {"attack": "wanet", "dataset": "d1", "defense": "pgbd", "status": "failed", "error": "boom", "log": "x.log"}])
    cells.loc[cells["attack"] == "sig", "asr_poisoned"] = 0.7
    failures = gate(cells, Gate())
    text = "\n".join(failures)
    # blended: the median of (0.119, 0.0002, 0) passes; sig: the median of (0.02, 0.30, 0.25) = 0.25 fails
    assert "blended" not in text
    assert "sig/d1: poisoned model ASR 0.7000 < 0.80" in text
    assert "sig/d1: pgbd median ASR over 3 replicates (0.0200, 0.3000, 0.2500) 0.2500 > 0.1000" in text
    assert "wanet on wanet/d1 failed" not in text and "cell pgbd on wanet/d1 failed: boom (log x.log)" in text
    assert "mean DEM" not in text  # (0.99 + 0.82) / 2 = 0.905 passes
    assert gate(cells[cells["attack"] == "blended"], Gate(max_asr={"blended": 0.0001})) != []


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
    # a list setting's items are joined by '+'; commas separate the axis' values
    assert parse_grid("nt_classes=1+2,3 extra_layers=layer3.1.conv2") == [
        {"nt_classes": [1, 2], "extra_layers": ["layer3.1.conv2"]},
        {"nt_classes": [3], "extra_layers": ["layer3.1.conv2"]}]
    with pytest.raises(GridError, match="takes list"):
        parse_grid("nt_classes=a+b")
    with pytest.raises(GridError, match="unknown grid key"):
        parse_grid("speed=1")
    with pytest.raises(GridError, match="key=v1,v2"):
        parse_grid("lr")
    # several grids add their points (each once); an empty grid is the preset's own setting
    assert parse_grids(["", "update_gap=1", "update_gap=1,2"]) == [{}, {"update_gap": 1}, {"update_gap": 2}]
    assert point_label("pgbd", {}) == "pgbd()"
    assert point_label("pgbd", {"extra_layers": ["a", "b"], "lr": 0.02}) == "pgbd(extra_layers=a+b, lr=0.02)"


def test_study_tables_by_hand():
    dems = {"ref": [0.90, 0.80, 0.70], "new": [0.92, 0.83, 0.71], "ft": [0.88, 0.82, 0.60],
            "shifted": [0.93, 0.83, 0.73]}
    rows = [{"status": "ok", "attack": "blended", "seed": s, "setting": name, "dem": d, "asr": 0.01 * (s + 1),
             "ca": 0.9, "collapsed": False} for name, ds in dems.items() for s, d in enumerate(ds)]
    rows.append({"status": "failed", "attack": "blended", "seed": 3, "setting": "new"})
    text = study_markdown(pd.DataFrame(rows), reference="ref", baseline="ft")
    # new: mean 0.82, std sqrt((.1^2 + .01^2 + .11^2) / 2) = 0.1054 (the failed run left out);
    # ASR median 2%, range 1-3%
    assert "| new | 0.820 ± 0.105 / 2.00 (1.00-3.00) / 90.00 | 0.820 | 3.00 | 0 |" in text
    # new - ref: 0.02, 0.03, 0.01 -> mean 0.02, sd 0.01, t(0.975, 2) = 4.3027: half width 0.0248
    assert "| new | +0.020 [-0.005, +0.045] | +0.020 [-0.005, +0.045] |" in text
    # shifted - ref: 0.03 on every seed: no spread, the interval excludes zero
    assert "| shifted | **+0.030 [+0.030, +0.030]** |" in text
    # ref - ft: 0.02, -0.02, 0.10 -> mean 0.033, sd 0.0611, half width 0.1518
    assert "| ref | +0.033 [-0.118, +0.185] |" in text
    assert "1 runs failed: new on blended seed 3" in text


def test_pareto_front_keeps_only_undominated_points():
    pts = [(0.5, 0.9), (0.1, 0.8), (0.2, 0.7), (0.05, 0.6), (0.1, 0.85)]
    assert pareto_front(pts) == [(0.05, 0.6), (0.1, 0.85), (0.5, 0.9)]


def test_table2_runs_every_defense_on_every_replicate_and_writes_both_tables(tmp_path, tiny_data, monkeypatch):
    """The command end to end on tiny generated data: two clean-subset seeds, a paired table,
    provenance, a gate that passes or names what fails."""
    import pgbd_defense.experiments.table2 as table2
    from pgbd_defense.attacks.record import AttackSettings

    tiny = table2.TablePreset(
        datasets=["mnist"], attacks=["badnet"], defenses=["ft", "pgbd"], pratio=0.3,
        attack=AttackSettings(width=0.0625, epochs=8, lr=0.05, batch_size=16, augment=False),
        defense_settings={"epochs": 1, "batch_size": 16}, ratio=0.5, forced=["tiny generated data"])
    monkeypatch.setitem(table2.PRESETS, "tiny", tiny)
    monkeypatch.setitem(table2.GATES, ("tiny", "equal-budget", 0.3), table2.Gate(min_poisoned_asr=0.0,
                                                                                   default_max_asr=1.0,
                                                                                   min_mean_dem=0.0))
    out = tmp_path / "out"
    argv = ["--preset", "tiny", "--protocol", "equal-budget", "--seeds", "0,1", "--data-root", str(tiny_data),
            "--record-root", str(tmp_path / "rec"), "--out", str(out), "--no-progress", "--check"]
    assert table2.main(argv) == 0
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 1 + 2 * 2 and set(cells["status"]) == {"ok"}
    assert sorted(cells[cells["defense"] == "pgbd"]["seed"]) == [0, 1]
    md = (out / "table2.md").read_text()
    assert "equal-budget protocol, 30% poisoning" in md and "tiny generated data" in md and "commit" in md
    assert "± " in md and "PGBD minus the best other defense" in md and "Seconds per cell" in md
    assert (out / "paired.md").read_text().count("| badnet | mnist | ft |") == 1
    facts = json.loads((out / "run.json").read_text())
    assert facts["seeds"] == [0, 1] and facts["protocol"] == "equal-budget" and facts["torch"]
    # The paper protocol has no gate for this setting: asked for, it says which settings have one.
    assert table2.main([*argv[:2], "--protocol", "paper", *argv[4:]]) == 2


def test_the_paper_preset_poisons_cifar100_at_10_percent_unless_a_rate_is_given(tmp_path):
    """The paper's Table 2: 1% on CIFAR-10, GTSRB and Tiny-ImageNet, 10% on CIFAR-100; an explicit
    --pratio applies to every data set."""
    from pgbd_defense.experiments import table2

    def rates(*extra):
        args = table2.build_parser().parse_args(["--preset", "paper", "--protocol", "paper", "--defenses", "ft",
                                                 "--attacks", "badnet", "--record-root", str(tmp_path), *extra])
        jobs = table2.plan_jobs(table2.PRESETS["paper"], table2.PROTOCOLS["paper"], args,
                                table2.PRESETS["paper"].datasets, ["badnet"], ["ft"], args.pratio, [0], [0])
        return {j.meta["dataset"]: j.attack.pratio for j in jobs}

    assert rates() == {"cifar10": 0.01, "gtsrb": 0.01, "tiny": 0.01, "cifar100": 0.1}
    assert set(rates("--pratio", "0.05").values()) == {0.05}
