"""Assembling results into the paper's Table 2 shape, and writing it as CSV, Markdown and
LaTeX; and the one-record comparison table of ``run --compare``.

Table 2: rows are (attack, dataset), with a MEAN row per attack over its data sets when
there is more than one; columns are the poisoned model's CA and ASR, then CA, ASR and DEM
per defense, each the mean +- standard deviation over the replicates (record seed, clean
subset seed) every defense ran on. CA and ASR are shown in percent, DEM as a fraction, as in
the paper. Which defense is ahead is not marked here: the paired-difference table
(:func:`paired_markdown`) says where a difference exceeds the seed noise."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd

from ..util.atomic import atomic_path, atomic_write_text
from .stats import METRICS, Paired, poisoned_summary, seed_summary

MEAN = "MEAN"
NO_DEFENSE = "No defense"


def seeded_frame(cells: pd.DataFrame, defenses: Sequence[str]) -> pd.DataFrame:
    """One row per (attack, dataset), plus MEAN rows when an attack has several data sets;
    columns (No defense, ca|asr) and (defense, ca_mean|ca_std|asr_mean|...|n). A defense
    that never finished on a row is NaN there."""
    summary = seed_summary(cells)
    poisoned = poisoned_summary(cells)
    rows = {}
    for (attack, dataset), p in poisoned.iterrows():
        entry = {(NO_DEFENSE, "ca"): p["ca"], (NO_DEFENSE, "asr"): p["asr"]}
        for d in defenses:
            if (attack, dataset, d) in summary.index:
                s = summary.loc[(attack, dataset, d)]
                entry.update({(d, k): s[k] for k in summary.columns})
        rows[(attack, dataset)] = entry
    columns = [(NO_DEFENSE, "ca"), (NO_DEFENSE, "asr")] + [
        (d, f"{m}_{f}") for d in defenses for m in METRICS for f in ("mean", "std")] + [(d, "n") for d in defenses]
    df = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=pd.MultiIndex.from_tuples(columns))
    df.index = pd.MultiIndex.from_tuples(df.index, names=["attack", "dataset"])
    df = df.astype(float)
    blocks = []
    for attack in dict.fromkeys(df.index.get_level_values(0)):
        part = df.loc[[attack]]
        blocks.append(part)
        if len(part) > 1:  # a mean over data sets; with one data set it would repeat the row
            mean = part.mean(axis=0, skipna=False).to_frame().T
            mean.loc[:, [c for c in df.columns if c[1].endswith("_std")]] = math.nan
            mean.index = pd.MultiIndex.from_tuples([(attack, MEAN)], names=["attack", "dataset"])
            blocks.append(mean)
    return pd.concat(blocks) if blocks else df


def _number(value: float, metric: str) -> str:
    if pd.isna(value):
        return "-"
    return f"{value:.3f}" if metric == "dem" else f"{100 * value:.2f}"


def _cell(row: pd.Series, defense: str, metric: str, n_full: int, pm: str) -> str:
    mean, std, n = row[(defense, f"{metric}_mean")], row[(defense, f"{metric}_std")], row[(defense, "n")]
    if pd.isna(mean):
        return "-"
    text = _number(mean, metric)
    if not pd.isna(std):
        text += f" {pm} {_number(std, metric)}"
    if not pd.isna(n) and int(n) < n_full:
        text += f" (n={int(n)})"
    return text


def replicates(df: pd.DataFrame, defenses: Sequence[str]) -> int:
    """The number of replicates per cell (the largest seen: a cell with fewer is marked)."""
    ns = [df[(d, "n")].max() for d in defenses if (d, "n") in df.columns]
    return int(max([n for n in ns if not pd.isna(n)], default=0))


def _rows(df: pd.DataFrame, defenses: Sequence[str], pm: str) -> List[List[str]]:
    n_full = replicates(df, defenses)
    out = []
    for (attack, dataset), row in df.iterrows():
        cells = [attack, dataset, _number(row[(NO_DEFENSE, "ca")], "ca"), _number(row[(NO_DEFENSE, "asr")], "asr")]
        cells += [_cell(row, d, m, n_full, pm) for d in defenses for m in METRICS]
        out.append(cells)
    return out


def seeded_markdown(df: pd.DataFrame, defenses: Sequence[str]) -> str:
    head = ["attack", "dataset", "No defense CA", "No defense ASR"] + [f"{d} {m.upper()}" for d in defenses
                                                                        for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in _rows(df, defenses, "±")]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def seeded_latex(df: pd.DataFrame, defenses: Sequence[str]) -> str:
    n = 4 + 3 * len(defenses)
    lines = [r"\begin{tabular}{ll" + "r" * (n - 2) + "}", r"\toprule",
             " & & \\multicolumn{2}{c}{No defense}" + "".join(f" & \\multicolumn{{3}}{{c}}{{{_tex(d)}}}"
                                                             for d in defenses) + r" \\",
             "Attack & Dataset & CA & ASR" + " & CA & ASR & DEM" * len(defenses) + r" \\", r"\midrule"]
    for cells in _rows(df, defenses, "$\\pm$"):
        lines.append(" & ".join(_tex(c) if "$" not in c else c for c in cells) + r" \\")
        if cells[1] == MEAN:
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_seeded_table(df: pd.DataFrame, defenses: Sequence[str], out: Path, stem: str = "table2"
                       ) -> Dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md", "tex": out / f"{stem}.tex"}
    flat = df.copy()
    flat.columns = [f"{d}_{m}" for d, m in df.columns]
    with atomic_path(paths["csv"]) as tmp:
        flat.to_csv(tmp)
    atomic_write_text(paths["md"], seeded_markdown(df, defenses))
    atomic_write_text(paths["tex"], seeded_latex(df, defenses))
    return paths


VERDICT_TEXT = {"better": "**{d} ahead**", "worse": "**{o} ahead**", "tie": "tie", "no interval": "one replicate",
                "undefined": "undefined (a DEM is undefined: the poisoned model shows no backdoor)"}


def paired_markdown(paired: Sequence[Paired], defense: str = "pgbd", metric: str = "dem") -> str:
    """Per attack: ``defense`` minus the best other defense, per replicate, with the mean, the
    95% t interval and the verdict (bold only where the interval excludes zero)."""
    head = ["attack", "dataset", f"best other (by mean {metric.upper()})", f"{defense} - other, per replicate",
            "mean", "95% interval", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in paired:
        per = ", ".join(f"{d:+.3f}" for d in p.differences)
        interval = "-" if math.isnan(p.low) else f"[{p.low:+.3f}, {p.high:+.3f}]"
        verdict = VERDICT_TEXT[p.verdict()].format(d=defense, o=p.other)
        lines.append(f"| {p.attack} | {p.dataset} | {p.other} | {per} | {p.mean:+.3f} | {interval} | {verdict} |")
    return "\n".join(lines) + "\n"


def dem_bar_chart(df: pd.DataFrame, defenses: Sequence[str], path: Path, title: Optional[str] = None) -> Path:
    """Grouped bars: each attack's mean DEM (over its data sets' rows) per defense, with the
    replicates' standard deviation as error bars where there is one data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = df[df.index.get_level_values("dataset") != MEAN]
    means = rows.groupby(level="attack", sort=False).mean()
    attacks = list(means.index)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(attacks), 3.6))
    width = 0.8 / max(len(defenses), 1)
    x = np.arange(len(attacks))
    for i, d in enumerate(defenses):
        heights = means[(d, "dem_mean")].fillna(0).to_numpy()
        errors = means[(d, "dem_std")].fillna(0).to_numpy()
        ax.bar(x + (i - (len(defenses) - 1) / 2) * width, heights, width, yerr=errors, capsize=2, label=d)
    ax.set_xticks(x, attacks)
    ax.set_ylabel("DEM (mean over replicates)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=min(len(defenses), 4), loc="lower right")
    ax.set_title(title or "Defense efficacy (DEM) per attack", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- one record, defenses side by side

COMPARISON_METRICS = {"ca": True, "asr": False, "ra": True, "dem": True}


def comparison_frame(rows: Sequence[Dict]) -> pd.DataFrame:
    """One row per defense: CA, ASR, RA, DEM, seconds, status, log."""
    cols = ["defense", "ca", "asr", "ra", "dem", "seconds", "status", "log"]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in rows], columns=cols)


def _marks(df: pd.DataFrame, metric: str) -> Dict[int, int]:
    ok = df[df["status"].isin(["ok", "cached"])]
    values = pd.to_numeric(ok[metric], errors="coerce").dropna().round(10)
    distinct = sorted(set(values), reverse=COMPARISON_METRICS[metric])[:2]
    return {i: distinct.index(v) + 1 for i, v in values.items() if v in distinct}


def comparison_markdown(df: pd.DataFrame, tex: bool = False) -> str:
    marks = {m: _marks(df, m) for m in COMPARISON_METRICS}
    bold = (lambda t: f"\\textbf{{{t}}}") if tex else (lambda t: f"**{t}**")
    under = (lambda t: f"\\underline{{{t}}}") if tex else (lambda t: f"<u>{t}</u>")
    body = []
    for i, r in df.iterrows():
        cells = [_tex(str(r["defense"])) if tex else str(r["defense"])]
        failed = r["status"] not in ("ok", "cached")
        for m in COMPARISON_METRICS:
            text = "-" if failed or pd.isna(r[m]) else _number(float(r[m]), m)
            rank = marks[m].get(i)
            cells.append(bold(text) if rank == 1 else under(text) if rank == 2 else text)
        cells.append("-" if pd.isna(r["seconds"]) else f"{float(r['seconds']):.0f}")
        note = f"failed: see {r['log']}" if failed else ""
        cells.append(_tex(note) if tex else note)
        body.append(cells)
    head = ["defense", "CA", "ASR", "RA", "DEM", "seconds", "note"]
    if tex:
        lines = [r"\begin{tabular}{lrrrrrl}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
        lines += [" & ".join(c) + r" \\" for c in body] + [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body]) + "\n"


def write_comparison(rows: Sequence[Dict], out: Path, stem: str = "comparison") -> Dict[str, Path]:
    df = comparison_frame(rows)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md", "tex": out / f"{stem}.tex"}
    with atomic_path(paths["csv"]) as tmp:
        df.to_csv(tmp, index=False)
    atomic_write_text(paths["md"], comparison_markdown(df))
    atomic_write_text(paths["tex"], comparison_markdown(df, tex=True))
    return paths
