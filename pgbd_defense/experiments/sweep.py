"""A grid of PGBD settings against a grid of plain fine-tuning settings with the same
budget, on the same records and clean subsets, every run selected by the same
clean-validation rule. Cells are cached like Table 2's.

    python -m pgbd_defense.sweep --attacks badnet,blended,sig,wanet \\
        --pgbd-grid "lr=0.003,0.01,0.03 lambda=0.5,1,2 loss_form=cos,relu_cos" \\
        --ft-grid "lr=0.003,0.01,0.03"

Writes ``sweep.csv`` (one row per run), ``configs.csv`` (one row per setting: mean
DEM over the attacks, worst ASR, lowest CA) and ``pareto.png`` (CA against ASR per
attack, each defense's Pareto front drawn) to ``--out``.
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
from ..util.atomic import atomic_path
from ..util.logs import setup_logging
from .cells import Cell, add_cell_arguments
from .runner import CellJob, add_executor_arguments, executor_spec, record_folder
from .runner import run as runner_run
from .table2 import PRESETS, PROTOCOLS

log = logging.getLogger("pgbd_defense.sweep")



class GridError(ConfigError):
    pass


def parse_grid(text: str) -> List[Dict[str, Any]]:
    """``"lr=0.01,0.03 lambda=1,2"`` -> the four combinations, in order; any setting of the
    field table whose values are single numbers, strings or booleans can be an axis."""
    axes: List[Tuple[str, List[Any]]] = []
    for part in text.split():
        key, sep, values = part.partition("=")
        if not sep or not values:
            raise GridError(f"grid entry {part!r} must look like key=v1,v2")
        f = FIELDS.get(key)
        if f is None or f.type is list:
            scalar = ", ".join(sorted(n for n, g in FIELDS.items() if g.type is not list))
            raise GridError(f"unknown grid key {key!r}; choose a setting with single values: {scalar}")
        parse = parse_bool if f.type is bool else f.type
        try:
            axes.append((key, [parse(v) for v in values.split(",") if v]))
        except (ValueError, TypeError) as e:
            raise GridError(f"grid entry {part!r}: {key} takes {f.type.__name__} values ({e})") from None
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def point_label(defense: str, point: Dict[str, Any]) -> str:
    return defense + "(" + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in point.items()) + ")"


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
    p.add_argument("--pgbd-grid", default="lr=0.003,0.01,0.03 lambda=1 loss_form=cos,relu_cos")
    p.add_argument("--ft-grid", default="lr=0.003,0.01,0.03")
    p.add_argument("--pgbd-defense", default="pgbd", help="pgbd or nt-pgbd")
    add_cell_arguments(p, "out/sweep")
    add_executor_arguments(p)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        pgbd_points = parse_grid(args.pgbd_grid)
        ft_points = parse_grid(args.ft_grid)
    except GridError as e:
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
        index = record / f"clean_subset_{preset.ratio:g}_{args.seed}.txt"  # cells.shared_index's file
        for defense, points in ((args.pgbd_defense, pgbd_points), ("ft", ft_points)):
            for point in points:
                cell = Cell(record, defense, {"index": str(index), "random_seed": args.seed,
                                              **preset.defense_settings, **point},
                            preset=PROTOCOLS[args.protocol].preset)
                meta = {"attack": attack, "setting": point_label(defense, point), **point}
                jobs.append(CellJob(cell, settings, (preset.ratio, args.seed), args.data_root, args.recompute, meta))
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
    print(configs.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for defense, group in configs.groupby("defense", sort=False):
        best = group.iloc[0]
        print(f"best {defense}: {best['setting']} mean DEM {best['mean_dem']:.4f} worst ASR {best['worst_asr']:.4f}")
    print(f"written: {out / 'sweep.csv'}, {out / 'configs.csv'}, {out / 'pareto.png'} "
          f"({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
