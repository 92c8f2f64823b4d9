"""A grid of PGBD settings against a grid of plain fine-tuning settings with the same
budget, on the same records and clean subsets, every run selected by the same
clean-validation rule. Cells are cached like Table 2's.

    python -m pgbd_defense.sweep --attacks badnet,blended,sig,wanet \\
        --pgbd-grid "lr=0.003,0.01,0.03 lambda=0.5,1,2 loss_form=cos,relu_cos" \\
        --ft-grid "lr=0.003,0.01,0.03"

A study of separate settings rather than one product: repeat ``--pgbd-grid`` (each
grid's combinations are added; an empty grid is the preset's own setting, the cell Table 2
runs, so it is read from Table 2's cache), and give clean-subset seeds:

    python -m pgbd_defense.sweep --pratio 0.01 --attacks badnet,blended,sig,trojan --seeds 0,1,2 \
        --pgbd-grid "" --pgbd-grid "update_gap=1" --pgbd-grid "extra_layers=layer3.1.conv2" --ft-grid ""

A list setting takes its items joined by ``+`` (``extra_layers=layer3.1.conv2+layer4.0.conv2``).

Writes ``sweep.csv`` (one row per run), ``configs.csv`` (one row per setting: mean
DEM over the attacks, worst ASR, lowest CA) and ``pareto.png`` (CA against ASR per
attack, each defense's Pareto front drawn) to ``--out``; with more than one seed also
``study.md`` (``experiments/study.py``: every setting's mean +- std per attack and its
paired differences from the first PGBD setting and from the first FT setting).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from ..errors import ConfigError, UserError
from ..settings import FIELDS
from ..settings.cli import parse_bool
from ..util.atomic import atomic_path, atomic_write_text
from ..util.logs import setup_logging
from .cells import Cell, add_cell_arguments
from .runner import CellJob, add_executor_arguments, executor_spec, record_folder
from .runner import run as runner_run
from .study import study_markdown
from .table2 import PRESETS, PROTOCOLS, parse_seeds

log = logging.getLogger("pgbd_defense.sweep")



class GridError(ConfigError):
    pass


DEFAULT_PGBD_GRID = "lr=0.003,0.01,0.03 lambda=1 loss_form=cos,relu_cos"
DEFAULT_FT_GRID = "lr=0.003,0.01,0.03"


def _parser(key: str):
    """How one value of a grid axis is read: a list setting's items are joined by ``+``."""
    f = FIELDS[key]
    if f.type is list:
        item = parse_bool if f.item is bool else (f.item or str)
        return lambda v: [item(x) for x in v.split("+") if x]
    return parse_bool if f.type is bool else f.type


def parse_grid(text: str) -> List[Dict[str, Any]]:
    """``"lr=0.01,0.03 lambda=1,2"`` -> the four combinations, in order; any setting of the
    field table can be an axis (a list setting's items joined by ``+``). An empty text is one
    point: the preset's own settings."""
    axes: List[Tuple[str, List[Any]]] = []
    for part in text.split():
        key, sep, values = part.partition("=")
        if not sep or not values:
            raise GridError(f"grid entry {part!r} must look like key=v1,v2")
        if key not in FIELDS:
            raise GridError(f"unknown grid key {key!r}; choose a setting of: {', '.join(sorted(FIELDS))}")
        f = FIELDS[key]
        try:
            axes.append((key, [_parser(key)(v) for v in values.split(",") if v]))
        except (ValueError, TypeError) as e:
            raise GridError(f"grid entry {part!r}: {key} takes {f.type.__name__} values ({e})") from None
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def parse_grids(texts: Sequence[str]) -> List[Dict[str, Any]]:
    """The points of several grids, in order, each point once."""
    points: List[Dict[str, Any]] = []
    for text in texts:
        points += [p for p in parse_grid(text) if p not in points]
    return points


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "+".join(str(x) for x in v)
    return str(v)


def point_label(defense: str, point: Dict[str, Any]) -> str:
    return defense + "(" + ", ".join(f"{k}={_value(v)}" for k, v in point.items()) + ")"


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """Points (asr, ca) not dominated by another with lower-or-equal ASR and higher-or-equal CA."""
    front = []
    for asr, ca in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or ca > front[-1][1]:
            front.append((asr, ca))
    return front


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    ok = runs[runs["status"].isin(["ok", "cached"])]
    grouped = ok.groupby(["defense", "setting"], sort=False)
    table = grouped.agg(mean_dem=("dem", "mean"), worst_asr=("asr", "max"), lowest_ca=("ca", "min"),
                        mean_ca=("ca", "mean"), mean_asr=("asr", "mean"), attacks=("attack", "nunique"),
                        collapsed=("collapsed", "sum")).reset_index()
    return table.sort_values(["defense", "mean_dem"], ascending=[True, False])


def pareto_plot(runs: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = runs[runs["status"].isin(["ok", "cached"])]
    attacks = list(dict.fromkeys(ok["attack"]))
    fig, axes = plt.subplots(1, max(len(attacks), 1), figsize=(3.4 * max(len(attacks), 1), 3.3), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        part = ok[ok["attack"] == attack]
        for i, (defense, group) in enumerate(part.groupby("defense", sort=False)):
            color = f"C{i}"
            ax.scatter(100 * group["asr"], 100 * group["ca"], s=14, color=color, alpha=0.6, label=defense)
            front = pareto_front(list(zip(100 * group["asr"], 100 * group["ca"])))
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color=color, lw=1.2)
        ax.set_title(attack)
        ax.set_xlabel("ASR (%)")
        ax.set_ylabel("CA (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pgbd_defense.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default="badnet,blended,sig,wanet")
    p.add_argument("--records", help="comma-separated record folders instead of making records")
    p.add_argument("--table-preset", default="ci", choices=sorted(PRESETS),
                   help="how records are made (Table 2's presets)")
    p.add_argument("--protocol", default="equal-budget", choices=sorted(PROTOCOLS),
                   help="the settings every cell starts from before the grid's (Table 2's protocols)")
    p.add_argument("--pratio", type=float, help="poisoning rate of the records (default: the table preset's)")
    p.add_argument("--pgbd-grid", action="append",
                   help="a grid of PGBD settings (repeatable: the grids' points are added; '' is the preset's "
                        f"setting); default {DEFAULT_PGBD_GRID!r}")
    p.add_argument("--ft-grid", action="append",
                   help=f"a grid of FT settings, likewise; default {DEFAULT_FT_GRID!r}")
    p.add_argument("--seeds", help="comma-separated clean-subset seeds, every setting (default: --seed); the "
                                   "records are made with --seed")
    p.add_argument("--pgbd-defense", default="pgbd", help="pgbd or nt-pgbd")
    add_cell_arguments(p, "out/sweep")
    add_executor_arguments(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        pgbd_points = parse_grids(args.pgbd_grid or [DEFAULT_PGBD_GRID])
        ft_points = parse_grids(args.ft_grid or [DEFAULT_FT_GRID])
        seeds = parse_seeds(args.seeds, "--seeds") if args.seeds else [args.seed]
    except (GridError, UserError) as e:
        log.error("%s", e)
        return 2
    preset = PRESETS[args.table_preset]
    pratio = args.pratio if args.pratio is not None else preset.pratio
    dataset = preset.datasets[0]
    out = Path(args.out)
    try:
        executor = executor_spec(args, out)
    except UserError as e:
        log.error("%s", e)
        return 2
    if args.records:  # given records: nothing to make
        records = [(Path(r).name, Path(r), None) for r in args.records.split(",") if r]
    else:
        records = []
        for attack in [a for a in args.attacks.split(",") if a]:
            settings = preset.attack_settings(attack, dataset, pratio, args.protocol, args.seed)
            records.append((attack, record_folder(Path(args.record_root), settings), settings))
    jobs = []
    for attack, record, settings in records:
        for seed in seeds:
            index = record / f"clean_subset_{preset.ratio:g}_{seed}.txt"  # cells.shared_index's file
            for defense, points in ((args.pgbd_defense, pgbd_points), ("ft", ft_points)):
                for point in points:
                    # The same settings dict as Table 2's cell: an empty point is read from its cache.
                    cell = Cell(record, defense, {"index": str(index), "random_seed": seed,
                                                  **preset.defense_settings, **point},
                                preset=PROTOCOLS[args.protocol].preset)
                    meta = {"attack": attack, "seed": seed, "setting": point_label(defense, point),
                            **{k: _value(v) for k, v in point.items()}}
                    jobs.append(CellJob(cell, settings, (preset.ratio, seed), args.data_root, args.recompute, meta))
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = runner_run(jobs, executor, desc="sweep runs")
    if results is None:
        print(f"submitted {len(jobs)} runs (logs in {executor.folder}); rerun the same command to collect them")
        return 0
    rows = [{**{k: result.get(k) for k in ("status", "ca", "asr", "ra", "dem", "ca_poisoned", "asr_poisoned",
                                           "selected_epoch", "epochs_run", "collapsed", "val_acc_selected",
                                           "seconds", "error", "log")},
             **job.meta, "defense": job.cell.defense, "cell": str(job.cell.folder)}
            for job, result in zip(jobs, results)]
    runs = pd.DataFrame(rows)
    with atomic_path(out / "sweep.csv") as tmp:
        runs.to_csv(tmp, index=False)
    configs = summarize(runs)
    with atomic_path(out / "configs.csv") as tmp:
        configs.to_csv(tmp, index=False)
    pareto_plot(runs, out / "pareto.png")
    written = [out / "sweep.csv", out / "configs.csv", out / "pareto.png"]
    if len(seeds) > 1:
        text = study_markdown(runs, reference=point_label(args.pgbd_defense, pgbd_points[0]),
                              baseline=point_label("ft", ft_points[0]),
                              header=f"{args.protocol} protocol, {args.table_preset} records at {pratio:g} poisoning, "
                                     f"clean-subset seeds {','.join(map(str, seeds))} (record seed {args.seed})")
        atomic_write_text(out / "study.md", text)
        written.append(out / "study.md")
        print(text)
    print(configs.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for defense, group in configs.groupby("defense", sort=False):
        best = group.iloc[0]
        print(f"best {defense}: {best['setting']} mean DEM {best['mean_dem']:.4f} worst ASR {best['worst_asr']:.4f}")
    print(f"written: {', '.join(map(str, written))} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
