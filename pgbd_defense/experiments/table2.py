"""The paper's Table 2 for a setting: every attack x data set, then every defense on each
record with the same clean subsets, in one command, under one of two protocols.

    python -m pgbd_defense.table2 --preset ci --protocol paper --pratio 0.01 --seeds 0,1,2
    python -m pgbd_defense.table2 --preset ci --protocol equal-budget --seeds 0,1,2
    python -m pgbd_defense.table2 --preset paper --protocol paper --data-root ~/data --device cuda
    python -m pgbd_defense.table2 --preset ci --protocol paper --pratio 0.01 --defenses ft,pgbd --check

Protocols (the defenses' settings; ``docs/settings.md`` has every value):

- ``paper``: each baseline at its published settings (BackdoorBench f02e3534's own, as its
  scripts run them; MCL at its release's), PGBD at the paper's (cos, lambda 10 summed over
  the batch, SGD lr 1e-4 constant, 35 epochs, batch 16, BatchNorm frozen, prototypes
  re-estimated every 5 epochs with alpha 0.75); the whole clean subset trained and the last
  epoch reported, as the benchmark does (the ``bench`` preset).
- ``equal-budget``: every defense on one tuned budget (SGD lr 0.02 cosine, batch 16, 5
  epochs; I-BAU Adam 1e-3) and the epoch with the best held-out clean accuracy returned
  (the ``cpu`` preset): a question the paper does not ask.

Presets (the data, model and attack budget): ``ci`` (Fashion-MNIST on a 2-core CPU: what it
changes from the paper is printed in the table's header) and ``paper`` (CIFAR-10/100, for
a GPU).

Every defense runs on every replicate: each record seed (``--attack-seeds``) times each
clean-subset seed (``--seeds``). Cells show mean +- std over the replicates; a second table
gives, per attack, PGBD minus the best other defense per replicate and its 95% t interval
(``stats.py``). Finished cells are cached (rerunning resumes; ``--recompute`` reruns them).
Writes ``table2.md`` (provenance, both tables, seconds per cell), ``table2.csv``,
``table2.tex``, ``paired.md``, ``dem.png``, ``cells.csv`` (one row per cell: status,
seconds, log) and ``run.json`` to ``--out``. ``--check`` applies the CI gate of the setting
and exits 1 when it fails. A table too long for one session is carried to the next machine
with ``--export-cells FILE`` and ``--import-cells FILE`` (``archive.py``: a cell is taken
only where the record made there is the same record).
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
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from ..attacks.record import AttackSettings, read_provenance
from ..errors import ConfigError, UserError
from ..settings.cli import parse_assignment
from ..util.atomic import atomic_path, atomic_write_text
from ..util.logs import setup_logging
from ..util.progress import quiet
from ..util.provenance import provenance, threads_text
from .archive import export_cells, read_archive, unmatched_entries
from .cells import Cell
from .plan import plan_text
from .runner import CellJob, add_executor_arguments, executor_spec, record_folder, state_counts, status_rows
from .runner import run as runner_run
from .stats import ok_cells, paired_vs_best
from .tables import dem_bar_chart, paired_markdown, seeded_frame, seeded_markdown, write_seeded_table

log = logging.getLogger("pgbd_defense.table2")


@dataclass(frozen=True)
class Protocol:
    preset: str  # the run preset every cell starts from
    note: str


PROTOCOLS: Dict[str, Protocol] = {
    "paper": Protocol("bench", "each baseline at its published settings (BackdoorBench f02e3534's, MCL's release), "
                               "PGBD at the paper's; the whole clean subset trained, the last epoch reported"),
    "equal-budget": Protocol("cpu", "every defense on one tuned budget (SGD lr 0.02 cosine, batch 16, 5 epochs; "
                                    "I-BAU Adam 1e-3), the epoch with the best held-out clean accuracy returned"),
}


# ML-MMDR's weight for the starred attacks (Table 3), chosen on the ci BadNets record at 10%
# (docs/attacks.md): 0.3 cut the MMD^2 between clean and poisoned activations 24x (layer3) and
# 11x (layer4) at 98% ASR; 1 cut it further but left 58% ASR, 10 collapsed the model.
ADAPTIVE: Dict[str, object] = {"mmdr_lambda": 0.3, "mmdr_layers": ["layer3", "layer4"]}


@dataclass
class TablePreset:
    """The data, model and attack budget of a table.

    ``attack`` is how records are made, changed per data set, per attack and per poisoning
    rate (``per_pratio``: rate -> changes; ``per_pratio_attack``: (rate, attack) -> changes);
    ``forced`` says what differs from the paper's setting and why, for the table's header."""

    datasets: List[str]
    attacks: List[str]
    defenses: List[str]
    attack: AttackSettings
    pratio: float
    per_attack: Dict[str, Dict] = field(default_factory=dict)
    per_dataset: Dict[str, Dict] = field(default_factory=dict)
    per_pratio: Dict[float, Dict] = field(default_factory=dict)
    per_pratio_attack: Dict[Tuple[float, str], Dict] = field(default_factory=dict)
    per_protocol: Dict[str, Dict] = field(default_factory=dict)  # protocol -> attack changes (e.g. width)
    defense_settings: Dict[str, object] = field(default_factory=dict)  # on top of the protocol, every cell
    ratio: float = 0.05
    forced: List[str] = field(default_factory=list)
    # An attack named with a star (``badnet*``) is the plain one made adaptive: these changes
    # (ML-MMDR, the paper's Table 3) on top of the attack's own.
    adaptive: Dict[str, object] = field(default_factory=lambda: dict(ADAPTIVE))
    # and where the penalty costs the attack its implant, more training: (rate, attack) -> changes
    adaptive_per_pratio_attack: Dict[Tuple[float, str], Dict] = field(default_factory=dict)

    def attack_settings(self, attack: str, dataset: str, pratio: Optional[float], protocol: str,
                        seed: int) -> AttackSettings:
        """``pratio`` None: the preset's rate for the data set (the paper poisons CIFAR-100 at 10%);
        a rate given wins over it."""
        adaptive = attack.endswith("*")
        attack = attack.rstrip("*")
        rate = pratio if pratio is not None else self.per_dataset.get(dataset, {}).get("pratio", self.pratio)
        # later changes win: the rate's over the attack's (at 1% every attack needs all the data)
        changes = {**self.per_dataset.get(dataset, {}), **self.per_protocol.get(protocol, {}),
                   **self.per_attack.get(attack, {}), **self.per_pratio.get(rate, {}),
                   **self.per_pratio_attack.get((rate, attack), {}), **(self.adaptive if adaptive else {}),
                   **(self.adaptive_per_pratio_attack.get((rate, attack), {}) if adaptive else {}), "pratio": rate}
        return replace(self.attack, attack=attack, dataset=dataset, seed=seed, **changes)


PRESETS: Dict[str, TablePreset] = {
    # On a 2-core CPU: Fashion-MNIST, a narrow PreAct-ResNet18, few attack epochs.
    "ci": TablePreset(
        datasets=["fashion-mnist"], attacks=["badnet", "blended", "sig", "wanet", "trojan", "inputaware"],
        defenses=["ft", "nad", "i-bau", "ft-sam", "mcl", "pgbd", "nt-pgbd"],
        attack=AttackSettings(width=0.125, epochs=3, lr=0.02, augment=False, train_subset=20000), pratio=0.1,
        # IAB's mask generator: 2 epochs alone (BackdoorBench: 25) bring its masks to 3.8% of the
        # pixels (the target density is 3.2%; docs/attacks.md).
        per_attack={"wanet": {"train_subset": 30000}, "inputaware": {"iab_mask_epochs": 2}},
        # At 1% the backdoors need the whole training split to implant, and SIG and WaNet more epochs
        # (3 epochs: SIG 79.9%, WaNet 3.4%; WaNet 10 epochs: 60.2%, 25 epochs: 79.9%).
        per_pratio={0.01: {"train_subset": 0}},
        # IAB at 10%: 3 joint epochs implant 92.2% at one thread but 46.6% at two (the rounding of the
        # thread count decides); 5 epochs 96.4% at one thread (the committed row's record) but 59.9% at
        # two: build it with --threads 1 (docs/attacks.md). IAB at 1% does not reach the 80% target:
        # 15 joint epochs 15.3%, 32 epochs 63.8%, 60 epochs 68.2% at CA 92.6% (one thread, 94 min; the
        # backdoor samples' training ASR levels off near 77%): 60, the longest tried, so its row exists.
        per_pratio_attack={(0.01, "sig"): {"epochs": 5}, (0.01, "wanet"): {"epochs": 40},
                           (0.01, "inputaware"): {"epochs": 60}, (0.1, "inputaware"): {"epochs": 5}},
        # WaNet with ML-MMDR at 10%: 3 epochs implant 76.1% (plain WaNet: 93.4%), below the 80% target;
        # (6 epochs: 93.7%). BadNets with it at 1% (lambda 0.3): 3 epochs implant 54.5% (plain: 85.7%),
        # 6 epochs broke the model (CA 70.8%, ASR 5.4%); lambda 0.1: 3 epochs 77.3%, 5 epochs 89.8% at
        # CA 92.3% (docs/attacks.md), so at 1% BadNets* is lambda 0.1 for 5 epochs.
        adaptive_per_pratio_attack={(0.1, "wanet"): {"epochs": 6},
                                    (0.01, "badnet"): {"mmdr_lambda": 0.1, "epochs": 5}},
        forced=["Fashion-MNIST (paper: CIFAR-10, GTSRB, Tiny-ImageNet, CIFAR-100)",
                "PreAct-ResNet18 of width 0.125 (paper: 1)",
                "the attack trained 3 epochs without augmentation, lr 0.02 (paper: 100 epochs, BackdoorBench's "
                "prototype config); at 1% SIG 5 epochs, WaNet 40, IAB 60 and BadNets* 5 (its ML-MMDR lambda 0.1), "
                "at 10% IAB 5 and WaNet* 6; 10% poisoning on a 20,000-image subset (WaNet 30,000), 1% on all 60,000",
                "IAB's mask generator trained 2 epochs alone (BackdoorBench: 25)"]),
    # The paper's setting (Sec. 5): for a GPU. Per cell on one modern GPU, roughly: attack 100 epochs
    # ~30-60 min (CIFAR-10), PGBD 35 epochs ~25 min, baselines 10-60 min each.
    "paper": TablePreset(
        datasets=["cifar10", "gtsrb", "tiny", "cifar100"],
        attacks=["badnet", "blended", "sig", "wanet", "trojan", "inputaware"],
        defenses=["ft", "nad", "i-bau", "ft-sam", "mcl", "pgbd", "nt-pgbd"],
        attack=AttackSettings(width=1.0, epochs=100, lr=0.01, augment=True), pratio=0.01,
        per_dataset={"cifar100": {"pratio": 0.1}}, defense_settings={"eval_every": 5}),
}


@dataclass(frozen=True)
class Gate:
    """The CI gate of a setting: every cell finished, every poisoned model implanted
    (ASR >= ``min_poisoned_asr``), and the gated defense's median over the replicates at most
    ``max_asr`` (per attack; ``default_max_asr`` otherwise), its per-attack median DEM averaged
    over the attacks at least ``min_mean_dem``. The thresholds come from the committed table's
    spread (see ``GATES``)."""

    defense: str = "pgbd"
    default_max_asr: float = 0.10
    max_asr: Dict[str, float] = field(default_factory=dict)
    min_mean_dem: float = 0.90
    min_poisoned_asr: float = 0.80
    source: str = ""  # where the thresholds come from


# (preset, protocol, pratio) -> its gate.
GATES: Dict[Tuple[str, str, float], Gate] = {
    # results/table2_ci.md (10%, equal budget): PGBD's per-attack median ASR 1.1-3.0%, mean DEM 0.97.
    ("ci", "equal-budget", 0.1): Gate(source="results/table2_ci.md"),
    # results/table2_equal_budget_1pct.md (1%, equal budget, seeds 0-2): PGBD's ASR on BadNets 1.91-2.33%
    # (median 2.16), on Blended 0.87-9.53% (median 6.19); per-attack median DEMs 0.968 and 0.936 (mean 0.952).
    # Limits: about twice the worst seed's ASR (one seed's Blended ASR moves by tens of points with the subset
    # and with float rounding, docs/cluster.md), the mean DEM 0.03 below the measured one. BadNets implants
    # at 85.7% here, so the 80% floor on the poisoned model stays.
    ("ci", "equal-budget", 0.01): Gate(max_asr={"badnet": 0.05, "blended": 0.20}, default_max_asr=0.10,
                                       min_mean_dem=0.92, source="results/table2_equal_budget_1pct.md"),
}


def gate(cells: pd.DataFrame, spec: Gate) -> List[str]:
    """What fails the gate (empty: it passes)."""
    failures = []
    for _, c in cells[~cells["status"].isin(["ok", "cached"])].iterrows():
        failures.append(f"cell {c['defense']} on {c['attack']}/{c['dataset']} {c['status']}: "
                        f"{c.get('error', '')} (log {c.get('log', '')})")
    done = ok_cells(cells)
    dems = []
    for (attack, dataset), part in done.groupby(["attack", "dataset"], sort=False):
        poisoned = part["asr_poisoned"].min()
        if poisoned < spec.min_poisoned_asr:
            failures.append(f"{attack}/{dataset}: poisoned model ASR {poisoned:.4f} < {spec.min_poisoned_asr:.2f}")
        ours = part[part["defense"] == spec.defense]
        if ours.empty:
            continue
        limit = spec.max_asr.get(attack, spec.default_max_asr)
        asr = ours["asr"].median()
        if pd.isna(asr) or asr > limit:
            each = ", ".join(f"{a:.4f}" for a in ours["asr"])
            failures.append(f"{attack}/{dataset}: {spec.defense} median ASR over {len(ours)} replicates ({each}) "
                            f"{asr:.4f} > {limit:.4f}")
        dems.append(ours["dem"].median())
    if dems:
        mean_dem = pd.Series(dems, dtype=float).mean(skipna=False)
        if pd.isna(mean_dem) or mean_dem < spec.min_mean_dem:
            failures.append(f"{spec.defense} mean DEM {mean_dem:.4f} < {spec.min_mean_dem:.4f}")
    return failures


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pgbd_defense.table2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="ci", choices=sorted(PRESETS), help="data, model and attack budget")
    p.add_argument("--protocol", default="equal-budget", choices=sorted(PROTOCOLS), help="the defenses' settings")
    p.add_argument("--pratio", type=float, help="poisoning rate (default: the preset's)")
    p.add_argument("--datasets", help="comma-separated subset of the preset's data sets")
    p.add_argument("--attacks", help="comma-separated subset of the preset's attacks (or others)")
    p.add_argument("--defenses", help="comma-separated defenses (default: the preset's)")
    p.add_argument("--seeds", default="0", help="clean-subset seeds, every defense (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="changes",
                   help="a setting changed for every cell (repeatable), e.g. amp=true; named in the table's header")
    p.add_argument("--attack-seeds", default="0", help="record seeds: one record per attack and seed (default 0)")
    p.add_argument("--out", help="output folder (default out/table2_<preset>_<protocol>_<pratio>)")
    p.add_argument("--record-root", default="record",
                   help="where attack records go (default ./record, shared with sweep)")
    p.add_argument("--data-root")
    p.add_argument("--device", default="cpu")
    p.add_argument("--recompute", action="store_true", help="rerun finished cells")
    p.add_argument("--check", action="store_true", help="apply the setting's CI gate; exit 1 when it fails")
    p.add_argument("--plan", action="store_true",
                   help="print the records and cells the table needs and their time on the device (measured "
                        "where cells of a kind have finished, else estimated), and stop")
    p.add_argument("--status", action="store_true",
                   help="say which cells are done, running, failed or queued (from their folders) and stop")
    p.add_argument("--assemble", action="store_true",
                   help="write the table from the cells finished so far, running nothing (the rest show as missing)")
    p.add_argument("--import-cells", metavar="FILE",
                   help="take finished cells from this archive (written by --export-cells, e.g. on another machine) "
                        "instead of running them, where the record made here is the same record; others run")
    p.add_argument("--export-cells", metavar="FILE",
                   help="write this table's finished cells to FILE (JSON, small enough to commit), for --import-cells")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also PGBD_NO_PROGRESS=1)")
    p.add_argument("-v", "--verbose", action="store_true")
    add_executor_arguments(p)
    return p


def _split(value: Optional[str], default: Sequence[str]) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else list(default)


def parse_seeds(text: str, what: str) -> List[int]:
    try:
        seeds = [int(v) for v in _split(text, [])]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{what} must name at least one seed, each once; got {text!r}")
    return seeds


def plan_jobs(preset: TablePreset, protocol: Protocol, args, datasets, attacks, defenses, pratio, seeds,
              record_seeds, changes: Optional[Dict] = None) -> List[CellJob]:
    """Every cell of the table: each record (data set x attack x record seed) times each clean
    subset seed times each defense, with what it needs made first."""
    jobs = []
    for dataset in datasets:
        for attack in attacks:
            for record_seed in record_seeds:
                settings = preset.attack_settings(attack, dataset, pratio, args.protocol, record_seed)
                record = record_folder(Path(args.record_root), settings)
                for seed in seeds:
                    index = record / f"clean_subset_{preset.ratio:g}_{seed}.txt"  # cells.shared_index's file
                    for d in defenses:
                        cell = Cell(record, d, {"index": str(index), "random_seed": seed, **preset.defense_settings,
                                                **(changes or {})}, preset=protocol.preset)
                        meta = {"attack": attack, "dataset": dataset, "record_seed": record_seed, "seed": seed}
                        jobs.append(CellJob(cell, settings, (preset.ratio, seed), args.data_root, args.recompute,
                                            meta))
    return jobs


def attack_rows(jobs: Sequence[CellJob], rows: Sequence[Dict]) -> List[Dict]:
    """One row per record: made (and how long it took, when this run made it) or failed."""
    out = {}
    for job, row in zip(jobs, rows):
        key = str(job.cell.record)
        entry = out.setdefault(key, {k: job.meta[k] for k in ("attack", "dataset", "record_seed")})
        entry.update({"defense": "(attack)", "record": key})
        if row.get("record_seconds") is not None:
            entry["seconds"] = row["record_seconds"]
        if (job.cell.record / "attack_result.pt").is_file():
            entry["status"] = "ok"
            facts = read_provenance(job.cell.record) or {}
            entry.update({f"record_{k}": facts.get(k) for k in ("threads", "commit", "date", "torch")})
            entry.setdefault("seconds", facts.get("seconds"))  # its first build's, when not made by this run
        else:
            entry["status"] = "failed"
            entry.setdefault("error", row.get("error", "not made yet"))
    return list(out.values())


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
    preset, protocol = PRESETS[args.preset], PROTOCOLS[args.protocol]
    pratio = args.pratio if args.pratio is not None else preset.pratio
    if not 0 < pratio <= 1:
        raise ConfigError(f"--pratio must lie in (0, 1], got {pratio}")
    datasets = _split(args.datasets, preset.datasets)
    attacks = _split(args.attacks, preset.attacks)
    defenses = _split(args.defenses, preset.defenses)
    seeds, record_seeds = parse_seeds(args.seeds, "--seeds"), parse_seeds(args.attack_seeds, "--attack-seeds")
    changes = dict(parse_assignment(text) for text in args.changes)
    spec = GATES.get((args.preset, args.protocol, pratio))
    if args.check and spec is None:
        raise ConfigError(f"no CI gate is defined for --preset {args.preset} --protocol {args.protocol} "
                          f"--pratio {pratio:g}; gated settings: "
                          + "; ".join(f"{p} {q} {r:g}" for p, q, r in GATES))
    out = Path(args.out or f"out/table2_{args.preset}_{args.protocol}_{pratio:g}")
    executor = executor_spec(args, out)  # checked before anything is written
    jobs = plan_jobs(preset, protocol, args, datasets, attacks, defenses, args.pratio, seeds, record_seeds, changes)
    unmatched = []  # imported cells this table does not cover: --export-cells keeps them
    if args.import_cells:
        archive = read_archive(Path(args.import_cells))  # a bad file stops here, before anything runs
        unmatched = unmatched_entries([j.cell for j in jobs], archive)
        log.info("%s: %d archived cells, %d of them not in this table", args.import_cells, len(archive), len(unmatched))
        jobs = [replace(j, archive=str(Path(args.import_cells).resolve())) for j in jobs]
    if args.plan:
        print(plan_text(jobs, protocol.preset, executor.devices[0]))
        return 0
    if args.status:
        rows = status_rows(jobs)
        counts = state_counts(rows)
        print(f"{len(jobs)} cells: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
        for r in rows:
            if r["status"] == "failed":
                print(f"  failed: {r['defense']} on {r['attack']}/{r['dataset']} seed {r['seed']}: "
                      f"{r.get('error', '')} (log {r.get('log', '')})")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows = status_rows(jobs) if args.assemble else runner_run(jobs, executor, desc="table2 cells")
    if rows is None:
        print(f"submitted {len(jobs)} cells (logs in {executor.folder}); follow them with the same command and "
              "--status, and write the table with --assemble (or rerun it: finished cells are read)")
        return 0
    rows = attack_rows(jobs, rows) + rows
    cells = pd.DataFrame(rows)
    for column in ("ca", "asr", "ra", "dem", "ca_poisoned", "asr_poisoned"):  # absent when every cell failed
        if column not in cells:
            cells[column] = float("nan")
    with atomic_path(out / "cells.csv") as tmp:
        cells.drop(columns=["environment"], errors="ignore").to_csv(tmp, index=False)
    df = seeded_frame(cells, defenses)
    paths = write_seeded_table(df, defenses, out)
    # against the best baseline: PGBD's own variants (NT-PGBD, ...) are not "another defense"
    baselines = [d for d in defenses if "pgbd" not in d]
    paired = paired_vs_best(cells, "pgbd", "dem", others=baselines) if "pgbd" in defenses else []
    facts = {"preset": args.preset, "protocol": args.protocol, "pratio": pratio, "datasets": datasets,
             "attacks": attacks, "defenses": defenses, "seeds": seeds, "record_seeds": record_seeds,
             "protocol_note": protocol.note, "forced": preset.forced, "changes": changes,
             "rates": {j.meta["dataset"]: j.attack.pratio for j in jobs},
             "wall_seconds": round(time.time() - started, 1), "assembled": bool(args.assemble),
             **provenance()}
    # The cells' threads, not this process's: as each cell's summary recorded them, else as the
    # executor was told to run them.
    per_cell = cells_threads(cells)
    if per_cell is None and not args.assemble:
        per_cell = threads_text(executor.threads or max(1, int(facts["threads"]) // max(executor.workers, 1))) \
            + " per cell"
    pool = f", {executor.workers} {executor.kind} workers" if executor.kind != "serial" and not args.assemble else ""
    facts["threads"] = (per_cell + pool if per_cell is not None
                        else "thread counts of the cells not recorded: made before cells kept them")
    if args.export_cells:
        count = export_cells([j.cell for j in jobs], Path(args.export_cells), keep=unmatched)
        log.info("%d finished cells written to %s", count, args.export_cells)
    text = report(facts, df, defenses, paired, cells)
    atomic_write_text(paths["md"], text)
    atomic_write_text(out / "paired.md", paired_markdown(paired) if paired else "")
    dem_bar_chart(df, defenses, out / "dem.png",
                  title=f"Table 2 ({args.preset}, {args.protocol}, {100 * pratio:g}% poisoning): DEM per attack")
    atomic_write_text(out / "run.json", json.dumps(facts, indent=1) + "\n")
    print(text)
    print(f"written: {', '.join(str(p) for p in paths.values())}, {out / 'paired.md'}, {out / 'dem.png'}, "
          f"{out / 'cells.csv'}")
    if args.check:
        failures = gate(cells, spec)
        if failures:
            print("CI gate FAILED:\n  " + "\n  ".join(failures))
            return 1
        print(f"CI gate passed ({spec.source})")
    return 0


def cells_threads(cells: pd.DataFrame) -> Optional[str]:
    """The torch thread counts the finished cells ran at, from their summaries (``1 thread per
    cell``; ``1 thread per cell; 4 cells not recorded: ...`` when older cells did not record it); None
    when no finished cell recorded it."""
    if "environment" not in cells:
        return None
    envs = [e for e in cells["environment"] if isinstance(e, dict)]
    known = sorted({str(e["torch_threads"]) for e in envs if e.get("torch_threads") is not None})
    if not known:
        return None
    missing = sum(1 for e in envs if e.get("torch_threads") is None)
    text = " and ".join(threads_text(c) for c in known) + " per cell"
    return text + (f"; {missing} cells not recorded: made before cells kept it" if missing else "")


def records_line(cells: pd.DataFrame) -> str:
    """The thread count each record was built at (it changes the record: float rounding), from
    the ``provenance.json`` beside it; records made before records kept one are named as such."""
    rows = cells[(cells["defense"] == "(attack)") & (cells["status"] == "ok")]
    if rows.empty:
        return "Records: none made."
    several = rows["record_seed"].nunique() > 1 if "record_seed" in rows else False
    groups: Dict[str, List[str]] = {}
    for _, r in rows.iterrows():
        threads = r.get("record_threads")
        known = threads is not None and not pd.isna(threads)
        key = f"at {threads_text(threads)}" if known else \
            "at a thread count not known (no readable provenance.json: made before records kept one, or elsewhere)"
        name = f"{r['attack']} on {r['dataset']}" + (f" (record seed {r['record_seed']})" if several else "")
        groups.setdefault(key, []).append(name)
    return ("Records built " + "; ".join(f"{key}: {', '.join(names)}" for key, names in groups.items())
            + " (a record rebuilt at another thread count differs).")


def seconds_table(cells: pd.DataFrame, defenses: Sequence[str]) -> str:
    """Wall time per cell, median and range over the replicates, per defense and attack (a cell
    read from the cache shows its first run's time)."""
    done = ok_cells(cells)
    done = done[done["seconds"].notna()] if "seconds" in done else done.iloc[0:0]
    if done.empty:
        return "(no cell has a recorded time)\n"
    lines = ["| defense | " + " | ".join(dict.fromkeys(done["attack"])) + " |",
             "|---|" + "---|" * done["attack"].nunique()]
    for d in defenses:
        part = done[done["defense"] == d]
        if part.empty:
            continue
        cells_text = []
        for attack in dict.fromkeys(done["attack"]):
            s = part[part["attack"] == attack]["seconds"]
            cells_text.append("-" if s.empty else f"{s.median():.0f} ({s.min():.0f}-{s.max():.0f})")
        lines.append(f"| {d} | " + " | ".join(cells_text) + " |")
    return "\n".join(lines) + "\n"


def report(facts: Dict, df: pd.DataFrame, defenses: Sequence[str], paired, cells: pd.DataFrame) -> str:
    n = len(facts["seeds"]) * len(facts["record_seeds"])
    rates = facts.get("rates") or {}
    rate_text = (f"{100 * facts['pratio']:g}% poisoning" if len(set(rates.values())) <= 1 else
                 "poisoning " + ", ".join(f"{d} {100 * r:g}%" for d, r in rates.items()))
    when = ("assembled from the cells finished so far (their seconds below)." if facts.get("assembled")
            else f"{facts['wall_seconds'] / 60:.0f} min in all.")
    head = [f"# Table 2: {facts['preset']} preset, {facts['protocol']} protocol, {rate_text}",
            "",
            f"Protocol: {facts['protocol_note']}.",
            "What differs from the paper's setting: " + "; ".join(facts["forced"]) + ".",
            *([f"Changed for every cell: {', '.join(f'{k}={v}' for k, v in facts['changes'].items())}."]
              if facts.get("changes") else []),
            f"Each cell: mean ± std over {n} replicates (clean-subset seeds {facts['seeds']} x record seeds "
            f"{facts['record_seeds']}); CA and ASR in %, DEM a fraction; '-' a cell that failed.",
            f"Made by commit {facts['commit']} on {facts['date']}, {facts['machine']}, torch {facts['torch']} "
            f"({facts['threads']}); {when}", ""]
    unfinished = cells[~cells["status"].isin(["ok", "cached"])]
    if len(unfinished):
        states = unfinished.groupby("status").size()
        head[-1:-1] = ["**Not finished: " + ", ".join(f"{n} cells {s}" for s, n in states.items())
                       + " (cells.csv lists them; they are '-' or left out of their cells' means).**"]
    head[-1:-1] = [records_line(cells)]
    body = seeded_markdown(df, defenses)
    if paired:
        body += ("\n## PGBD minus the best other defense (DEM), per replicate\n\n"
                 "Paired over the same replicates; 95% interval: Student's t over the differences "
                 "(experiments/stats.py). A verdict is bold only where the interval excludes zero.\n\n"
                 + paired_markdown(paired))
    body += ("\n## Seconds per cell (median, range over replicates; a cached cell's are its first run's)\n\n"
             + seconds_table(cells, defenses))
    return "\n".join(head) + "\n" + body  # a blank line before the table, or Markdown runs them together


if __name__ == "__main__":
    sys.exit(main())
