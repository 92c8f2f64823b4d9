"""A settings study over clean-subset seeds, as markdown: every setting's numbers per attack
(mean +- std of DEM, median and range of ASR, mean CA) and its paired DEM differences from a
reference setting and from a baseline, per attack and pooled over the attacks.

Paired means: the same record and clean subset (``attack``, ``seed``) for both settings. The
95% interval is Student's t over the differences (``stats.t_interval``); with n = 3 per
attack it is wide, so the pooled column (every attack and seed, n = attacks x seeds) is where
a small, consistent difference can show. Bold marks an interval that excludes zero.
"""

from __future__ import annotations

from typing import List

import pandas as pd

from .stats import t_interval

PAIR = ["attack", "seed"]


def _ok(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"].isin(["ok", "cached"])]


def _numbers(part: pd.DataFrame) -> str:
    if part.empty:
        return "-"
    dem = part["dem"]
    asr = 100 * part["asr"]
    std = f" ± {dem.std(ddof=1):.3f}" if len(dem) > 1 else ""
    return (f"{dem.mean():.3f}{std} / {asr.median():.2f} ({asr.min():.2f}-{asr.max():.2f}) / "
            f"{100 * part['ca'].mean():.2f}")


def _difference(ours: pd.DataFrame, theirs: pd.DataFrame) -> str:
    a, b = ours.set_index(PAIR)["dem"], theirs.set_index(PAIR)["dem"]
    common = sorted(a.index.intersection(b.index))
    if not common:
        return "-"
    mean, low, high = t_interval([float(a[i] - b[i]) for i in common])
    if low != low:  # fewer than two pairs: no interval
        return f"{mean:+.3f} (n={len(common)})"
    text = f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"
    return f"**{text}**" if low > 0 or high < 0 else text


def _comparison(ok: pd.DataFrame, settings: List[str], attacks: List[str], against: str) -> List[str]:
    lines = ["| setting | " + " | ".join(attacks) + " | all attacks |", "|---" * (len(attacks) + 2) + "|"]
    other = ok[ok["setting"] == against]
    for setting in settings:
        if setting == against:
            continue
        ours = ok[ok["setting"] == setting]
        cells = [_difference(ours[ours["attack"] == a], other[other["attack"] == a]) for a in attacks]
        lines.append(f"| {setting} | " + " | ".join(cells) + f" | {_difference(ours, other)} |")
    return lines


def study_markdown(runs: pd.DataFrame, reference: str, baseline: str, header: str = "") -> str:
    """The study's tables. ``reference`` and ``baseline`` are setting labels of ``runs``
    (e.g. the preset's PGBD and plain fine-tuning)."""
    ok = _ok(runs)
    attacks = list(dict.fromkeys(runs["attack"]))
    settings = list(dict.fromkeys(runs["setting"]))
    failed = runs[~runs["status"].isin(["ok", "cached"])]
    lines = ["# Settings study", ""]
    if header:
        lines += [header, ""]
    lines += ["Each cell: DEM mean ± std / ASR median (range) in % / mean CA in %, over the clean-subset seeds. "
              "'collapsed': runs stopped by the collapse guard (every epoch below it: the model returned unchanged).",
              "", "| setting | " + " | ".join(attacks) + " | mean DEM | worst ASR | collapsed |",
              "|---" * (len(attacks) + 4) + "|"]
    for setting in settings:
        part = ok[ok["setting"] == setting]
        cells = [_numbers(part[part["attack"] == a]) for a in attacks]
        worst = f"{100 * part['asr'].max():.2f}" if len(part) else "-"
        mean = f"{part['dem'].mean():.3f}" if len(part) else "-"
        collapsed = int(part["collapsed"].fillna(False).astype(bool).sum()) if "collapsed" in part else 0
        lines.append(f"| {setting} | " + " | ".join(cells) + f" | {mean} | {worst} | {collapsed} |")
    for title, against in (("minus the reference", reference), ("minus the baseline", baseline)):
        lines += ["", f"## DEM {title} ({against}), paired by record and clean subset",
                  "", "Mean [95% t interval]; bold where the interval excludes zero.", ""]
        lines += _comparison(ok, settings, attacks, against)
    if len(failed):
        lines += ["", f"{len(failed)} runs failed: " + ", ".join(
            f"{r.setting} on {r.attack} seed {r.seed}" for r in failed.itertuples())]
    return "\n".join(lines) + "\n"
