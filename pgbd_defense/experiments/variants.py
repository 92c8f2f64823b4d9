"""PGBD's variants side by side on BadNets, all-to-one and all-to-all, in one command.

    python -m pgbd_defense.variants_table
    python -m pgbd_defense.variants_table --modes all2one --variants pgbd,st-pgbd

Rows: PGBD with the target known (read from the record), NT-PGBD (no target),
ST-PGBD (synthesized trigger), PGBD with the target inferred (``--target auto``)
and NT-PGBD cycling over the top 3 inferred classes; CA, ASR, DEM and seconds,
on records made like the ``ci`` Table 2 preset's (shared with it under
``--record-root``). Cells are cached as in Table 2. Writes ``variants.csv`` and
``variants.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd

from ..errors import UserError
from ..util.atomic import atomic_path, atomic_write_text
from ..util.logs import setup_logging
from .cells import Cell, add_cell_arguments
from .runner import CellJob, add_executor_arguments, executor_spec, record_folder
from .runner import run as runner_run
from .table2 import PRESETS as TABLE_PRESETS
from .table2 import PROTOCOLS

# The variants' cells: the ci scale at its poisoning rate, every defense on the equal budget.
PROTOCOL = "equal-budget"

log = logging.getLogger("pgbd_defense.variants_table")

# label -> (defense, its settings)
VARIANTS: Dict[str, tuple] = {
    "pgbd": ("pgbd", {}),
    "nt-pgbd": ("nt-pgbd", {}),
    "st-pgbd": ("st-pgbd", {}),
    "pgbd-auto": ("pgbd", {"target": "auto"}),
    "nt-pgbd-top3": ("nt-pgbd", {"target": "auto", "nt_topk": 3}),
    "ft": ("ft", {}),
}
DESCRIPTIONS = {
    "pgbd": "PGBD, target known (from the record)",
    "nt-pgbd": "NT-PGBD, no target (cycles through all classes)",
    "st-pgbd": "ST-PGBD, synthesized trigger for the known target",
    "pgbd-auto": "PGBD, target inferred (--target auto)",
    "nt-pgbd-top3": "NT-PGBD over the top 3 inferred classes",
    "ft": "plain fine-tuning (reference: same budget, no sanitization)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pgbd_defense.variants_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attack", default="badnet")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--modes", default="all2one,all2all", help="label modes of the attack")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    add_cell_arguments(p, "out/variants")
    add_executor_arguments(p)
    return p


def markdown(df: pd.DataFrame) -> str:
    lines = ["| labels | variant | CA | ASR | DEM | seconds | targets used | note |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        if r["status"] in ("ok", "cached"):
            nums = [f"{100 * r['ca']:.2f}", f"{100 * r['asr']:.2f}", f"{r['dem']:.3f}", f"{r['seconds']:.0f}"]
        else:
            nums = ["-", "-", "-", "-"]
        lines.append(f"| {r['mode']} | {DESCRIPTIONS.get(r['variant'], r['variant'])} | " + " | ".join(nums)
                     + f" | {_text(r.get('targets_used'))} | {_text(r.get('note'))} |")
    return "\n".join(lines) + "\n"


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def _targets_text(row: Dict) -> str:
    targets = row.get("targets") or []
    if not targets:
        return ""
    if row.get("defense") == "nt-pgbd" or str(row.get("variant", "")).startswith("nt"):
        return "cycled"
    distinct = sorted(set(targets) - {-1})
    return "c+1 mod K" if len(distinct) > 1 else str(distinct[0]) if distinct else ""


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    modes = [m for m in args.modes.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    preset = TABLE_PRESETS["ci"]
    out = Path(args.out)
    try:
        executor = executor_spec(args, out)
    except UserError as e:
        log.error("%s", e)
        return 2
    jobs: List[CellJob] = []
    skipped: List[Dict] = []
    for mode in modes:
        settings = replace(preset.attack_settings(args.attack, args.dataset, preset.pratio, PROTOCOL, args.seed),
                           label_mode=mode)
        record = record_folder(Path(args.record_root), settings)
        index = record / f"clean_subset_{preset.ratio:g}_{args.seed}.txt"  # cells.shared_index's file
        for label in variants:
            defense, extra = VARIANTS[label]
            if label == "st-pgbd" and mode == "all2all":
                skipped.append({"mode": mode, "variant": label, "status": "n/a",
                                "note": "not applicable: ST-PGBD synthesizes one target's trigger"})
                continue
            cell = Cell(record, defense, {"index": str(index), "random_seed": args.seed, **preset.defense_settings,
                                          **extra}, preset=PROTOCOLS[PROTOCOL].preset, label=label)
            jobs.append(CellJob(cell, settings, (preset.ratio, args.seed), args.data_root, args.recompute,
                                {"mode": mode, "variant": label}))
    out.mkdir(parents=True, exist_ok=True)
    results = runner_run(jobs, executor, desc="variants cells")
    if results is None:
        print(f"submitted {len(jobs)} cells (logs in {executor.folder}); rerun the same command to collect them")
        return 0
    rows: List[Dict] = list(skipped)
    for job, result in zip(jobs, results):
        label = job.meta["variant"]
        row = {**result, **job.meta}
        row["targets_used"] = _targets_text(row)
        if "target_inference" in result:
            inf = result["target_inference"]
            row["note"] = f"inferred {inf['target']} ({'flagged' if inf['flagged'] else 'top of ranking'})"
        if label == "st-pgbd" and "synthesized_trigger" in result:
            st = result["synthesized_trigger"]
            size = st.get("mask_l1", st.get("changed_pixels", 0.0))
            row["note"] = (f"trigger ({st.get('method', 'nc')}) size {size:.1f}, flips {100 * st['flip_rate']:.0f}% "
                           "of D_S")
        if result["status"] == "failed":
            row["note"] = str(result.get("error", ""))
        rows.append(row)
    order = {(m, v): i for i, (m, v) in enumerate((m, v) for m in modes for v in variants)}
    rows.sort(key=lambda r: order[(r["mode"], r["variant"])])
    df = pd.DataFrame(rows)
    keep = [c for c in ("mode", "variant", "status", "ca", "asr", "ra", "dem", "seconds", "ca_poisoned",
                        "asr_poisoned", "targets_used", "note", "record", "cell", "log") if c in df.columns]
    with atomic_path(out / "variants.csv") as tmp:
        df[keep].to_csv(tmp, index=False)
    poisoned = df.groupby("mode")[["ca_poisoned", "asr_poisoned"]].first() if "ca_poisoned" in df else None
    text = markdown(df)
    if poisoned is not None:
        text += "\nPoisoned models: " + "; ".join(f"{m} CA {100 * r.ca_poisoned:.2f} ASR {100 * r.asr_poisoned:.2f}"
                                                  for m, r in poisoned.iterrows()) + "\n"
    atomic_write_text(out / "variants.md", text)
    (out / "run.json").write_text(json.dumps({"modes": modes, "variants": variants, "note": preset.note}) + "\n")
    print(text)
    print(f"written: {out / 'variants.md'}, {out / 'variants.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
