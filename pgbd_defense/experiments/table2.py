"""Reproduce the paper's Table 2 for a setting: every attack x data set, then every
defense on each record with the same clean subset, in one command.

    python -m pgbd_defense.table2 --preset ci
    python -m pgbd_defense.table2 --preset paper --data-root ~/data --device cuda
    python -m pgbd_defense.table2 --preset ci --attacks badnet,sig --defenses ft,pgbd --check

Finished cells are cached (rerunning resumes; ``--recompute`` reruns them). Writes
``table2.csv``, ``table2.md``, ``table2.tex``, ``dem.png`` and ``cells.csv`` (one row
per cell: status, seconds, log) to ``--out``. ``--check`` applies the CI gate and
exits 1 when it fails.

One seed's ASR is a noisy statistic: on the ci preset's Blended record, PGBD left 11.9%
with the clean subset of seed 0 and 0.02% and 0.00% with those of seeds 1 and 2. So the
gate judges the gated defense by its median over ``--gate-seeds`` clean subsets (the
extra cells are listed, with every seed's numbers, under the table); the table itself
stays one seed for every defense, so its columns are compared on equal terms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd

from ..attacks.record import AttackSettings
from ..errors import ConfigError, UserError
from ..util.atomic import atomic_path, atomic_write_text
from ..util.logs import setup_logging
from ..util.progress import progress, quiet
from .cells import Cell, ensure_record, run_cell, shared_index
from .tables import MEAN, dem_bar_chart, wide_table, write_table

log = logging.getLogger("pgbd_defense.table2")


@dataclass
class TablePreset:
    datasets: List[str]
    attacks: List[str]
    defenses: List[str]
    attack: AttackSettings
    per_attack: Dict[str, Dict] = field(default_factory=dict)
    per_dataset: Dict[str, Dict] = field(default_factory=dict)
    run_preset: str = "cpu"
    defense_settings: Dict[str, object] = field(default_factory=dict)  # on top of run_preset, for every cell
    ratio: float = 0.05
    note: str = ""
    gate_seeds: int = 1  # clean-subset seeds the gate's median is taken over (see the module's docstring)


PRESETS: Dict[str, TablePreset] = {
    # On a 2-core CPU within the CI budget: Fashion-MNIST, a PreAct-ResNet18 of width 0.125.
    "ci": TablePreset(
        datasets=["fashion-mnist"], attacks=["badnet", "blended", "sig", "wanet"],
        defenses=["ft", "nad", "i-bau", "ft-sam", "mcl", "pgbd", "nt-pgbd"],
        attack=AttackSettings(width=0.125, epochs=3, lr=0.02, augment=False, train_subset=20000),
        per_attack={"wanet": {"train_subset": 30000}},
        run_preset="cpu", gate_seeds=3,
        note="Fashion-MNIST, PreAct-ResNet18 x0.125, 3 attack epochs; the cpu preset's defenses (5 epochs, "
             "batch 16) on a 5% clean subset"),
    # The paper's setting (Sec. 5): for a GPU. Per cell on one modern GPU, roughly: attack 100 epochs
    # ~30-60 min (CIFAR-10), PGBD 35 epochs ~25 min, baselines 10-60 min each.
    "paper": TablePreset(
        datasets=["cifar10", "cifar100"], attacks=["badnet", "blended", "sig", "wanet", "trojan"],
        defenses=["ft", "nad", "i-bau", "ft-sam", "mcl", "pgbd", "nt-pgbd"],
        attack=AttackSettings(width=1.0, epochs=100, lr=0.01, augment=True, pratio=0.01),
        per_dataset={"cifar100": {"pratio": 0.1}},
        run_preset="paper", defense_settings={"eval_every": 5},
        note="the paper's attacks, model and hyperparameters; GTSRB and Tiny-ImageNet loaders are not built yet"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pgbd_defense.table2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ci", choices=sorted(PRESETS))
    p.add_argument("--datasets", help="comma-separated subset of the preset's data sets")
    p.add_argument("--attacks", help="comma-separated subset of the preset's attacks (or others)")
    p.add_argument("--defenses", help="comma-separated defenses (default: the preset's)")
    p.add_argument("--out", help="output folder (default out/table2_<preset>)")
    p.add_argument("--record-root", default="record",
                   help="where attack records go (default ./record, shared with sweep)")
    p.add_argument("--data-root")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recompute", action="store_true", help="rerun finished cells")
    p.add_argument("--check", action="store_true", help="apply the CI gate; exit 1 when it fails")
    p.add_argument("--gate-seeds", type=int,
                   help="clean-subset seeds PGBD runs on for the gate's median (default: the preset's; ci: 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also PGBD_NO_PROGRESS=1)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _split(value: Optional[str], default: Sequence[str]) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else list(default)


GATED = "pgbd"


def _repeats_of(repeats: pd.DataFrame, attack: str, dataset: str) -> pd.DataFrame:
    return repeats[(repeats["attack"] == attack) & (repeats["dataset"] == dataset)]


def _median(values) -> float:
    """NaN when any value is missing: a failed seed must not vanish from the statistic."""
    return pd.Series(values, dtype=float).median(skipna=False)


def gate(df: pd.DataFrame, cells: pd.DataFrame, defense: str = GATED,
         repeats: Optional[pd.DataFrame] = None) -> List[str]:
    """The CI gate of the Table 2 issue; returns what fails (empty: pass).

    ``repeats`` (rows: attack, dataset, seed, asr, dem) holds ``defense`` on further
    clean-subset seeds; the gate then takes, per attack and data set, the median of
    the table's seed and those."""
    failures = []
    missing = cells[~cells["status"].isin(["ok", "cached"])]
    for _, c in missing.iterrows():
        failures.append(f"cell {c['defense']} on {c['attack']}/{c['dataset']} {c['status']}: "
                        f"{c.get('error', '')} (log {c.get('log', '')})")
    rows = df[df.index.get_level_values("dataset") != MEAN]
    dems = []
    for (attack, dataset), row in rows.iterrows():
        if pd.isna(row[("No defense", "asr")]) or row[("No defense", "asr")] < 0.8:
            failures.append(f"{attack}/{dataset}: poisoned model ASR {row[('No defense', 'asr')]:.4f} < 0.80")
        if (defense, "asr") not in row.index:
            continue
        asrs, dem_values = [row[(defense, "asr")]], [row[(defense, "dem")]]
        if repeats is not None and len(repeats):
            more = _repeats_of(repeats, attack, dataset)
            asrs += list(more["asr"])
            dem_values += list(more["dem"])
        asr = _median(asrs)
        dems.append(_median(dem_values))
        if pd.isna(asr) or asr > 0.10:
            if len(asrs) == 1:
                failures.append(f"{attack}/{dataset}: {defense} ASR {asr:.4f} > 0.10")
            else:
                each = ", ".join(f"{a:.4f}" for a in asrs)
                failures.append(f"{attack}/{dataset}: {defense} median ASR over {len(asrs)} seeds "
                                f"({each}) {asr:.4f} > 0.10")
    if dems:
        mean_dem = pd.Series(dems, dtype=float).mean(skipna=False)
        if pd.isna(mean_dem) or mean_dem < 0.90:
            failures.append(f"{defense} mean DEM {mean_dem:.4f} < 0.90")
    return failures


def seeds_table(df: pd.DataFrame, repeats: pd.DataFrame, defense: str = GATED, table_seed: int = 0) -> str:
    """Markdown: the gated defense's ASR/DEM per seed and their medians, per attack."""
    rows = df[df.index.get_level_values("dataset") != MEAN]
    seeds = sorted(repeats["seed"].unique())
    head = ["attack", "dataset", f"seed {table_seed} (table) ASR", *[f"seed {s} ASR" for s in seeds], "median ASR",
            "median DEM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (attack, dataset), row in rows.iterrows():
        more = _repeats_of(repeats, attack, dataset).set_index("seed")
        asrs = [row[(defense, "asr")], *[more["asr"].get(s, float("nan")) for s in seeds]]
        dems = [row[(defense, "dem")], *[more["dem"].get(s, float("nan")) for s in seeds]]
        cells = [f"{100 * a:.2f}" for a in asrs]
        lines.append("| " + " | ".join([attack, dataset, *cells, f"{100 * _median(asrs):.2f}",
                                        f"{_median(dems):.3f}"]) + " |")
    return (f"\n\n{defense} on further clean subsets (the CI gate's statistic: the median per attack; "
            "ASR in %)\n\n" + "\n".join(lines) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        with quiet() if args.no_progress else contextlib.nullcontext():
            return _table(args)
    except UserError as e:
        log.error("%s", e)
        return 2


def _table(args) -> int:
    preset = PRESETS[args.preset]
    datasets = _split(args.datasets, preset.datasets)
    attacks = _split(args.attacks, preset.attacks)
    defenses = _split(args.defenses, preset.defenses)
    out = Path(args.out or f"out/table2_{args.preset}")
    record_root = Path(args.record_root)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    plan = [(d, a) for d in datasets for a in attacks]
    gate_seeds = args.gate_seeds if args.gate_seeds is not None else preset.gate_seeds
    if gate_seeds < 1:
        raise ConfigError(f"--gate-seeds must be at least 1, not {gate_seeds}")
    extra_seeds = list(range(args.seed + 1, args.seed + gate_seeds)) if GATED in defenses else []
    total = len(plan) * (1 + len(defenses) + len(extra_seeds))
    rows: List[Dict] = []
    repeats: List[Dict] = []
    # One bar, cell by cell, with elapsed and remaining time; the cells' own bars would drown it.
    bar = progress(None, total=total, desc="table2 cells", leave=True)
    with quiet():
        for dataset, attack in plan:
            settings = replace(preset.attack, attack=attack, dataset=dataset, seed=args.seed,
                               **preset.per_dataset.get(dataset, {}), **preset.per_attack.get(attack, {}))
            _describe(bar, f"{attack}/{dataset}: attack")
            t0 = time.time()
            try:
                record = ensure_record(settings, record_root, args.data_root, args.device)
                index = shared_index(record, preset.ratio, args.seed, args.data_root)
            except Exception as e:  # a missing data set or broken attack fails its row, not the table
                log.error("%s/%s: cannot make the record: %s", attack, dataset, e)
                rows.append({"attack": attack, "dataset": dataset, "defense": "(attack)", "status": "failed",
                             "error": f"{type(e).__name__}: {e}", "seconds": round(time.time() - t0, 1)})
                for d in defenses:
                    rows.append({"attack": attack, "dataset": dataset, "defense": d, "status": "failed",
                                 "error": "no record"})
                    bar.update(1)
                bar.update(1 + len(extra_seeds))
                continue
            rows.append({"attack": attack, "dataset": dataset, "defense": "(attack)", "status": "ok",
                         "seconds": round(time.time() - t0, 1), "record": str(record)})
            bar.update(1)
            for d in defenses:
                _describe(bar, f"{attack}/{dataset}: {d}")
                cell = Cell(record, d, {"index": str(index), "random_seed": args.seed, **preset.defense_settings},
                            preset=preset.run_preset)
                result = run_cell(cell, args.data_root, args.recompute, args.device)
                rows.append({**result, "attack": attack, "dataset": dataset, "defense": d, "seed": args.seed})
                bar.update(1)
            for seed in extra_seeds:
                _describe(bar, f"{attack}/{dataset}: {GATED}, seed {seed}")
                seed_index = shared_index(record, preset.ratio, seed, args.data_root)
                cell = Cell(record, GATED, {"index": str(seed_index), "random_seed": seed, **preset.defense_settings},
                            preset=preset.run_preset)
                result = run_cell(cell, args.data_root, args.recompute, args.device)
                repeats.append({**result, "attack": attack, "dataset": dataset, "defense": GATED, "seed": seed})
                bar.update(1)
    bar.close()
    cells = pd.DataFrame(rows + repeats)
    with atomic_path(out / "cells.csv") as tmp:
        cells.drop(columns=["environment"], errors="ignore").to_csv(tmp, index=False)
    df = wide_table([r for r in rows if r["defense"] != "(attack)"], defenses)
    paths = write_table(df, defenses, out)
    seeds_df = pd.DataFrame(repeats)
    for column in ("asr", "dem"):  # a failed cell has neither; the gate already names it
        if len(seeds_df) and column not in seeds_df:
            seeds_df[column] = float("nan")
    if len(seeds_df):
        atomic_write_text(paths["md"], paths["md"].read_text() + seeds_table(df, seeds_df, table_seed=args.seed))
    dem_bar_chart(df, defenses, out / "dem.png", title=f"Table 2 ({args.preset} preset): DEM per attack")
    (out / "run.json").write_text(json.dumps({"preset": args.preset, "datasets": datasets, "attacks": attacks,
                                              "defenses": defenses, "note": preset.note,
                                              "gate_seeds": gate_seeds,
                                              "wall_seconds": round(time.time() - started, 1)}, indent=1) + "\n")
    print(paths["md"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}, {out / 'dem.png'}, {out / 'cells.csv'}")
    if args.check:
        failures = gate(df, cells, repeats=seeds_df if len(seeds_df) else None)
        if failures:
            print("CI gate FAILED:\n  " + "\n  ".join(failures))
            return 1
        print("CI gate passed")
    return 0


def _describe(bar, text: str) -> None:
    if hasattr(bar, "set_description_str"):
        bar.set_description_str(text)


if __name__ == "__main__":
    sys.exit(main())
