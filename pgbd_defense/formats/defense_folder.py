"""The defense folder, written the way BackdoorBench's defenses write theirs:
``record/<name>/defense/<defense>/`` with ``defense_result.pt``,
``<defense>_df.csv`` (one row per epoch), ``<defense>_df_summary.csv`` (rows
``last``, ``valid_max``, ``exist_nan_value``), ``log/``, ``index.txt``, plus our
``summary.json`` and the exact ``config.yaml`` used. Every file is written
atomically; an existing result is never replaced without ``overwrite``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List, Sequence

import pandas as pd
import yaml

from ..errors import ConfigError, UserError
from ..util.atomic import atomic_path, atomic_write_text

# BackdoorBench's per-epoch columns, in its order; ours follow them.
BB_COLUMNS = ["epoch", "batch", "train_epoch_loss_avg_over_batch", "train_acc", "clean_test_loss_avg_over_batch",
              "bd_test_loss_avg_over_batch", "test_acc", "test_asr", "test_ra"]
SUMMARY_KEYS = ["attack", "dataset", "defense", "ca_poisoned", "asr_poisoned", "ra_poisoned", "ca", "asr", "ra",
                "dem", "seconds"]


class ExistingResultError(UserError, FileExistsError):
    """A defense folder already holds results; pass --overwrite to replace them."""


def prepare_defense_dir(record_dir: Path, defense: str, overwrite: bool) -> Path:
    out = Path(record_dir) / "defense" / defense
    existing = [p.name for p in (out / "defense_result.pt", out / "summary.json", out / f"{defense}_df.csv")
                if p.exists()]
    if existing and not overwrite:
        raise ExistingResultError(
            f"{out} already holds results ({', '.join(existing)}); nothing was changed. "
            "Pass --overwrite to replace them, or --defense-name to write beside them.")
    (out / "log").mkdir(parents=True, exist_ok=True)
    return out


def log_file_path(out: Path) -> Path:
    return out / "log" / (time.strftime("%Y-%m-%d_%H-%M-%S") + ".log")


def write_epoch_tables(out: Path, defense: str, rows: List[Dict[str, float]]) -> None:
    df = pd.DataFrame(rows)
    ordered = [c for c in BB_COLUMNS if c in df.columns] + [c for c in df.columns if c not in BB_COLUMNS]
    df = df[ordered]
    with atomic_path(out / f"{defense}_df.csv") as tmp:
        df.to_csv(tmp)
    summary = pd.DataFrame([df.iloc[-1], df.max(numeric_only=True), df.isna().any()],
                           index=["last", "valid_max", "exist_nan_value"])[ordered]
    with atomic_path(out / f"{defense}_df_summary.csv") as tmp:
        summary.to_csv(tmp)


def write_index(out: Path, indices: Sequence[int]) -> None:
    atomic_write_text(out / "index.txt", "".join(f"{int(i)}\n" for i in indices))


def read_index(path: Path, n_train: int) -> List[int]:
    text = Path(path).read_text().split()
    try:
        idx = [int(float(t)) for t in text]
    except (ValueError, OverflowError) as e:
        raise ConfigError(f"{path}: clean-subset index file must hold one integer per line ({e})") from None
    bad = [i for i in idx if not 0 <= i < n_train]
    if bad:
        raise ConfigError(f"{path}: indices {bad[:5]} are outside the training split (0..{n_train - 1})")
    return idx


def write_summary(out: Path, summary: Dict, config: Dict) -> None:
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise KeyError(f"summary lacks {missing}")
    # Strict JSON has no NaN: an undefined number (DEM of a model without backdoor) is null.
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}
    atomic_write_text(out / "summary.json", json.dumps(clean, indent=2) + "\n")
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=True))
