"""Statistics over seeds for the tables: each cell's mean, standard deviation and count, and
the paired difference of one defense against the best other one.

A replicate is one (record seed, clean-subset seed) pair; every defense of a table runs on
the same replicates, so differences are paired: d_i = metric(PGBD, i) - metric(other, i).
Their 95% interval is Student's t interval, mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n),
exact for normally distributed differences (with n = 3 a bootstrap over seeds would have
only 10 distinct resamples). "The best other defense" is the one with the highest mean of
the metric over the replicates, chosen after seeing them: a difference from the winner of
several is biased towards the winner, so an interval that excludes zero in PGBD's favour is
conservative and one in the winner's favour is optimistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import pandas as pd
from scipy import stats

METRICS = ("ca", "asr", "dem")
HIGHER_IS_BETTER = {"ca": True, "asr": False, "dem": True, "ra": True}
REPLICATE = ("record_seed", "seed")  # what pairs two defenses' cells


def t_interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """(mean, low, high): Student's t interval of the mean; no interval from fewer than 2 values."""
    x = pd.Series(values, dtype=float)
    n = len(x)
    if n == 0 or x.isna().any():
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def ok_cells(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells that finished (run or read from the cache), defenses only."""
    if not len(cells):
        return cells
    return cells[cells["status"].isin(["ok", "cached"]) & (cells["defense"] != "(attack)")]


def seed_summary(cells: pd.DataFrame, metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Per (attack, dataset, defense): each metric's mean and sample std over its replicates,
    and n. A defense whose replicates did not all finish keeps n of those that did (the
    table marks it)."""
    done = ok_cells(cells)
    agg = {f"{m}_{f}": (m, f) for m in metrics for f in ("mean", "std")}
    out = done.groupby(["attack", "dataset", "defense"], sort=False).agg(n=(metrics[0], "size"), **agg)
    return out


def poisoned_summary(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (attack, dataset): the poisoned models' CA and ASR (mean over records)."""
    done = ok_cells(cells)
    return done.groupby(["attack", "dataset"], sort=False).agg(
        ca=("ca_poisoned", "mean"), asr=("asr_poisoned", "mean"), records=("record", "nunique"))


@dataclass
class Paired:
    attack: str
    dataset: str
    other: str  # the best other defense by mean
    differences: List[float]  # per replicate, defense - other
    mean: float
    low: float
    high: float

    @property
    def n(self) -> int:
        return len(self.differences)

    def verdict(self, higher_is_better: bool = True) -> str:
        if any(math.isnan(d) for d in self.differences) or not self.differences:
            return "undefined"
        if math.isnan(self.low):
            return "no interval"
        if self.low > 0:
            return "better" if higher_is_better else "worse"
        if self.high < 0:
            return "worse" if higher_is_better else "better"
        return "tie"


def paired_vs_best(cells: pd.DataFrame, defense: str = "pgbd", metric: str = "dem",
                   others: Optional[Sequence[str]] = None) -> List[Paired]:
    """Per (attack, dataset): ``defense`` minus the best other defense (highest mean ``metric``,
    lowest for ASR) over the replicates both finished."""
    done = ok_cells(cells)
    out = []
    for (attack, dataset), part in done.groupby(["attack", "dataset"], sort=False):
        ours = part[part["defense"] == defense].set_index(list(REPLICATE))[metric]
        if ours.empty:
            continue
        candidates = [d for d in part["defense"].unique() if d != defense and (others is None or d in others)]
        if not candidates:
            continue
        means = {d: part[part["defense"] == d][metric].mean() for d in candidates}
        best = (max if HIGHER_IS_BETTER[metric] else min)(means, key=means.get)
        theirs = part[part["defense"] == best].set_index(list(REPLICATE))[metric]
        common = ours.index.intersection(theirs.index)
        diffs = [float(ours[i] - theirs[i]) for i in sorted(common)]
        mean, low, high = t_interval(diffs)
        out.append(Paired(attack, dataset, best, diffs, mean, low, high))
    return out
