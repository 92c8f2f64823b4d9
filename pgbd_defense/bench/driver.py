"""``python -m pgbd_defense.run`` inside a BackdoorBench checkout: the record comes from
``record/<attack>_<ratio>`` (made by the benchmark's own attack script if absent), PGBD
runs through the installed ``defense/pgbd.py``, and ``--compare`` runs the benchmark's
own defense scripts on the same record with PGBD's clean subset (``--index``)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from ..tables import comparison_frame, comparison_markdown, write_comparison
from .compare import (BENCH_DEFENSES, BenchRunError, bench_record_name, defense_config, run_bench_attack,
                      run_bench_defense)

log = logging.getLogger("pgbd_defense.bench")

# Our flags forwarded to defense/pgbd.py when given explicitly (its spelling).
FORWARD = {"epochs": "--epochs", "batch_size": "--batch_size", "lr": "--lr", "lambda": "--lambda",
           "loss_form": "--loss_form", "reduction": "--reduction", "layer": "--layer", "target": "--target",
           "ratio": "--ratio", "random_seed": "--random_seed", "update_gap": "--update_gap", "alpha": "--alpha",
           "mapping": "--mapping", "mapping_components": "--mapping_components", "mapping_steps": "--mapping_steps",
           "inversion_steps": "--inversion_steps", "inversion_batch_size": "--inversion_batch_size",
           "nt_topk": "--nt_topk", "st_steps": "--st_steps"}


def bench_flags(args) -> List[str]:
    """Flags for the benchmark's defense scripts: the budget given on our command line (as the
    standalone comparison passes it to our own baselines), then ``--bench-args`` verbatim, so
    those win where both name a flag."""
    flags: List[str] = []
    for key, flag in (("epochs", "--epochs"), ("batch_size", "--batch_size")):
        if getattr(args, key, None) is not None:
            flags += [flag, str(getattr(args, key))]
    return flags + shlex.split(getattr(args, "bench_args", None) or "")


def run_in_checkout(args, cfg: Dict[str, Any], root: Path) -> int:
    if not (root / "defense" / "pgbd.py").is_file():
        raise BenchRunError(f"{root} does not know PGBD yet: run python -m pgbd_defense.install --bench-root {root}")
    dataset = cfg["dataset"]
    name = Path(args.record).name if args.record else bench_record_name(cfg["attack"], cfg["pratio"])
    record = root / "record" / name
    if (record / "attack_result.pt").is_file():
        log.info("using the record %s", record)
    else:
        record = run_bench_attack(root, cfg["attack"], dataset, name, shlex.split(args.attack_args or ""))
    variant = args.defense if args.defense in ("pgbd", "nt-pgbd", "st-pgbd") else "pgbd"
    cmd = [sys.executable, "./defense/pgbd.py", "--result_file", name,
           "--yaml_path", defense_config(root, "pgbd", dataset), "--dataset", dataset, "--device", args.device,
           "--preset", args.preset, "--variant", variant]
    for key, flag in FORWARD.items():
        value = getattr(args, key, None) if key != "lambda" else vars(args).get("lambda")
        if value is not None:
            cmd += [flag, str(value)]
    cmd += ["--overwrite"] if args.overwrite else []
    cmd += ["--trust_record"] if args.trust_record else []
    started = time.time()
    log.info("running PGBD in the checkout: %s", " ".join(cmd))
    env = {**os.environ, "PGBD_NO_PROGRESS": "1"} if args.no_progress else None
    code = subprocess.run(cmd, cwd=root, env=env).returncode
    if code != 0:
        return code
    out = record / "defense" / variant
    ours = json.loads((out / "summary.json").read_text())
    rows: List[Dict] = [{**ours, "defense": variant, "status": "ok", "log": "",
                         "seconds": ours.get("seconds", round(time.time() - started, 1))}]
    poisoned = {"ca": ours["ca_poisoned"], "asr": ours["asr_poisoned"]}
    for d in args.compare or []:
        if d not in BENCH_DEFENSES:
            log.warning("%s has no BackdoorBench script here; skipped (the benchmark's: %s)", d,
                        ", ".join(BENCH_DEFENSES))
            continue
        rows.append(run_bench_defense(root, d, name, dataset, out / "index.txt", poisoned, args.device,
                                      bench_flags(args)))
    if args.compare:
        paths = write_comparison(rows, record / "defense")
        print(comparison_markdown(comparison_frame(rows)))
        print(f"comparison: {paths['md']} (also .csv, .tex)")
    return 0
