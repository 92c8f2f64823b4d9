"""Running BackdoorBench's own scripts from a checkout: an attack that makes a record,
and the benchmark's defenses on a record with a given clean subset, read back from the
files they write."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import pandas as pd

from ..errors import UserError
from ..metrics import dem

log = logging.getLogger("pgbd_defense.bench")

class BenchRunError(UserError, RuntimeError):
    """A benchmark script failed; the message names its log."""


# The benchmark's defense scripts this command can drive, by our names.
BENCH_DEFENSES = {"ft": "ft", "nad": "nad", "i-bau": "i-bau", "ft-sam": "ft-sam"}


def bench_record_name(attack: str, pratio: float = 0.1) -> str:
    """The benchmark's usual folder name, e.g. badnet_0_1."""
    return f"{attack}_{f'{pratio:g}'.replace('.', '_')}"


def attack_config(root: Path, dataset: str) -> str:
    """The benchmark's prototype config of the data set; CIFAR-10's (with ``--dataset``) when
    the checkout has none for it, as for mnist. ``--attack-args "--yaml_path ..."`` overrides
    either, coming later on the command line."""
    specific = f"./config/attack/prototype/{dataset}.yaml"
    if (root / specific).is_file():
        return specific
    fallback = "./config/attack/prototype/cifar10.yaml"
    log.warning("%s has no %s: the attack uses %s with --dataset %s", root, specific[2:], fallback, dataset)
    return fallback


def run_bench_attack(root: Path, attack: str, dataset: str, name: str, extra: Sequence[str] = (),
                     python: str = sys.executable) -> Path:
    """``attack/<attack>.py`` with the benchmark's prototype config for the data set and the
    attack's default config; returns the record folder."""
    script = root / "attack" / f"{attack}.py"
    if not script.is_file():
        raise BenchRunError(f"the checkout has no attack script {script}")
    log_path = root / "record" / f"{name}.attack.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python, f"./attack/{attack}.py", "--yaml_path", attack_config(root, dataset), "--dataset", dataset,
           "--bd_yaml_path", f"./config/attack/{attack}/default.yaml", "--save_folder_name", name, *extra]
    log.info("running the benchmark's attack: %s (log %s)", " ".join(cmd), log_path)
    with open(log_path, "w") as f:
        code = subprocess.run(cmd, cwd=root, stdout=f, stderr=subprocess.STDOUT).returncode
    record = root / "record" / name
    if code != 0 or not (record / "attack_result.pt").is_file():
        raise BenchRunError(f"the benchmark's {attack} attack failed (exit code {code}); see {log_path}")
    return record


def read_bench_summary(folder: Path) -> Optional[Dict[str, float]]:
    """The ``last`` row of a defense's ``*_df_summary.csv`` (top folder or ``log/``; a
    teacher's ``*_te_df_summary.csv`` is skipped)."""
    candidates = [p for p in sorted(folder.glob("*_df_summary.csv")) + sorted(folder.glob("log/*_df_summary.csv"))
                  if not p.name.endswith("_te_df_summary.csv")]
    for path in candidates:
        df = pd.read_csv(path, index_col=0)
        if "last" in df.index and {"test_acc", "test_asr"} <= set(df.columns):
            row = df.loc["last"]
            return {"ca": float(row["test_acc"]), "asr": float(row["test_asr"]),
                    "ra": float(row["test_ra"]) if "test_ra" in df.columns else float("nan"), "csv": str(path)}
    return None


def defense_config(root: Path, name: str, dataset: str) -> str:
    """The benchmark's YAML for a defense on a data set; its generic ``config.yaml`` when the
    checkout has none for this data set (the benchmark ships none for mnist, say)."""
    specific = f"./config/defense/{name}/{dataset}.yaml"
    if (root / specific).is_file():
        return specific
    log.warning("%s has no %s: using ./config/defense/%s/config.yaml with --dataset %s", root, specific[2:], name,
                dataset)
    return f"./config/defense/{name}/config.yaml"


def run_bench_defense(root: Path, defense: str, result_file: str, dataset: str, index_file: Path,
                      poisoned: Dict[str, float], device: str = "cpu", extra: Sequence[str] = (),
                      python: str = sys.executable) -> Dict:
    """One benchmark defense on a record; a failure is a row with its log path, not an exception."""
    name = BENCH_DEFENSES[defense]
    folder = root / "record" / result_file / "defense" / name
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "pgbd_defense_compare.log"
    cmd = [python, f"./defense/{name}.py", "--result_file", result_file, "--yaml_path",
           defense_config(root, name, dataset), "--dataset", dataset, "--index", str(Path(index_file).resolve()),
           "--device", device, *extra]
    started = time.time()
    log.info("running the benchmark's %s: %s", defense, " ".join(cmd))
    with open(log_path, "w") as f:
        code = subprocess.run(cmd, cwd=root, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = round(time.time() - started, 1)
    row = {"defense": f"{defense} (BackdoorBench)", "seconds": seconds, "log": str(log_path)}
    found = read_bench_summary(folder) if code == 0 else None
    if found is None:
        return {**row, "status": "failed", "error": f"exit code {code}" if code else "no *_df_summary.csv written"}
    defined = poisoned["ca"] > 0 and poisoned["asr"] > 0  # a model without backdoor has no DEM
    value = dem(poisoned["ca"], poisoned["asr"], found["ca"], found["asr"]).value if defined else float("nan")
    return {**row, "status": "ok", "ca": found["ca"], "asr": found["asr"], "ra": found["ra"], "dem": value}
