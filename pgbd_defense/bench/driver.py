"""``python -m pgbd_defense.run`` inside a BackdoorBench checkout: the record comes from
``record/<attack>_<ratio>`` (made by the benchmark's own attack script if absent), PGBD
runs through the installed ``defense/pgbd.py``, and ``--compare`` runs the benchmark's
own defense scripts on the same record with PGBD's clean subset (``--index``).

Every setting given on our command line reaches its consumer: the attack's to the
benchmark's attack script (by the flag the field table names, ``Field.attack_flag``), the
rest to the launcher (``Field.launcher_flag``). An attack setting the benchmark's scripts
have no flag for is refused rather than dropped.
"""

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

from ..defenses import DEFENSES
from ..errors import ConfigError
from ..experiments.tables import comparison_frame, comparison_markdown, write_comparison
from ..pipeline import check
from ..settings import FIELDS, VARIANT_NAMES, Settings, read_yaml, resolve
from ..settings.cli import launcher_flags, render
from .compare import (
    BENCH_DEFENSES,
    BenchRunError,
    attack_config,
    bench_record_name,
    defense_config,
    run_bench_attack,
    run_bench_defense,
)

log = logging.getLogger("pgbd_defense.bench")

PGBD_VARIANTS = tuple(VARIANT_NAMES.values())  # what defense/pgbd.py runs


def bench_flags(args) -> List[str]:
    """Flags for the benchmark's defense scripts: the budget given on our command line (as the
    standalone comparison passes it to our own baselines), then ``--bench-args`` verbatim, so
    those win where both name a flag."""
    flags: List[str] = []
    for key, flag in (("epochs", "--epochs"), ("batch_size", "--batch_size")):
        if getattr(args, key, None) is not None:
            flags += [flag, str(getattr(args, key))]
    return flags + shlex.split(getattr(args, "bench_args", None) or "")


def absolute(name: str, value: Any) -> Any:
    """A path-valued setting made absolute: the benchmark's scripts run from the checkout root,
    not from where our command was given."""
    if value in (None, "") or not (FIELDS[name].path or name in ("overlays", "mapping")):
        return value
    if name == "overlays":
        return ",".join(str(Path(v).resolve()) for v in str(value).split(",") if v)
    if name == "mapping":
        if value.startswith("torchvision:"):
            head, _, weights = value.rpartition(":")
            return f"{head}:{Path(weights).expanduser().resolve()}"
        return str(Path(value).expanduser().resolve()) if Path(value).expanduser().exists() else value
    return str(Path(value).expanduser().resolve())


def split_explicit(settings: Settings) -> Dict[str, Dict[str, Any]]:
    """The explicit settings by where they go: ``attack`` (the benchmark's attack script),
    ``launcher`` (defense/pgbd.py); an attack setting with no attack-script flag is an error."""
    attack, launcher, refused = {}, {}, []
    for name in sorted(settings.explicit):
        f = FIELDS[name]
        value = absolute(name, settings[name])
        if f.attack_flag and name != "dataset":  # the data set is passed to both scripts anyway
            attack[name] = value
        elif set(f.uses) == {"attack"} and name not in ("attack", "dataset", "model"):
            refused.append(f.flags[0])
        if set(f.uses) - {"attack"} or name == "model":  # the launcher builds the record's model class
            launcher[name] = value
    if refused:
        raise ConfigError(f"inside a BackdoorBench checkout the record is made by the benchmark's own attack "
                          f"script, which has no equivalent of {', '.join(refused)}: drop them, or pass the "
                          "benchmark's attack flags with --attack-args")
    return {"attack": attack, "launcher": launcher}


def run_in_checkout(args, settings: Settings, root: Path) -> int:
    if not (root / "defense" / "pgbd.py").is_file():
        raise BenchRunError(f"{root} does not know PGBD yet: run python -m pgbd_defense.install --bench-root {root}")
    if settings.defense not in PGBD_VARIANTS:
        raise ConfigError(f"inside a checkout, --defense runs PGBD and its variants ({', '.join(PGBD_VARIANTS)}); "
                          f"the benchmark's own {settings.defense} runs with --compare {settings.defense}")
    if args.download:
        raise ConfigError("--download is for the standalone path: inside a checkout the benchmark reads ./data")
    unknown = [d for d in args.compare or [] if d not in DEFENSES]
    if unknown:
        raise ConfigError(f"--compare: unknown defenses {unknown}; choose from {', '.join(DEFENSES.names())}")
    dataset = settings["dataset"]
    yaml_path = str(Path(args.config).resolve()) if args.config else defense_config(root, "pgbd", dataset)
    # The launcher resolves its settings from this YAML (the checkout's, unless --config names one):
    # check them now, before the attack script runs for minutes.
    launcher_view = resolve(settings.preset, settings.defense, read_yaml(str(root / yaml_path)),
                            {k: settings[k] for k in settings.explicit}, source=yaml_path)
    check(launcher_view, [])
    parts = split_explicit(settings)
    name = Path(args.record).name if args.record else bench_record_name(settings["attack"], settings["pratio"])
    record = root / "record" / name
    cmd = [sys.executable, "./defense/pgbd.py", "--result_file", name, "--yaml_path", yaml_path,
           "--dataset", dataset, "--preset", settings.preset, "--variant", settings.defense,
           *launcher_flags(parts["launcher"])]
    cmd += ["--defense_name", args.defense_name] if args.defense_name else []
    cmd += ["--overwrite"] if args.overwrite else []
    cmd += ["--trust_record"] if args.trust_record else []
    cmd += ["--resume"] if args.resume else []
    attack_extra = [a for k, v in parts["attack"].items() for a in (FIELDS[k].attack_flag, render(FIELDS[k], v))]
    attack_extra += shlex.split(args.attack_args or "")
    env = {**os.environ, "PGBD_NO_PROGRESS": "1"} if args.no_progress else None
    if args.dry_run:
        if not (record / "attack_result.pt").is_file():
            print(f"# would make {record} with ./attack/{settings['attack']}.py --yaml_path "
                  f"{attack_config(root, dataset)} --dataset {dataset} {' '.join(attack_extra)}")
        print("# " + " ".join(shlex.quote(c) for c in cmd))
        return subprocess.run(cmd + ["--dry_run"], cwd=root, env=env).returncode
    if (record / "attack_result.pt").is_file():
        log.info("using the record %s", record)
    else:
        record = run_bench_attack(root, settings["attack"], dataset, name, attack_extra)
    started = time.time()
    log.info("running PGBD in the checkout: %s", " ".join(cmd))
    code = subprocess.run(cmd, cwd=root, env=env).returncode
    if code != 0:
        return code
    folder = args.defense_name or settings.defense
    out = record / "defense" / folder
    ours = json.loads((out / "summary.json").read_text())
    rows: List[Dict] = [{**ours, "defense": folder, "status": "ok", "log": "",
                         "seconds": ours.get("seconds", round(time.time() - started, 1))}]
    poisoned = {"ca": ours["ca_poisoned"], "asr": ours["asr_poisoned"]}
    for d in args.compare or []:
        if d not in BENCH_DEFENSES:
            log.warning("%s has no BackdoorBench script here; skipped (the benchmark's: %s)", d,
                        ", ".join(BENCH_DEFENSES))
            continue
        rows.append(run_bench_defense(root, d, name, dataset, out / "index.txt", poisoned, settings["device"],
                                      bench_flags(args)))
    if args.compare:
        paths = write_comparison(rows, record / "defense")
        print(comparison_markdown(comparison_frame(rows)))
        print(f"comparison: {paths['md']} (also .csv, .tex)")
    return 0
