"""Assembling results into the paper's Table 2 shape, and writing it as CSV, Markdown
and LaTeX with the best value of each metric in bold and the second underlined.

Rows are (attack, dataset) with a MEAN row per attack over its datasets; columns are
the poisoned model's CA and ASR, then CA, ASR and DEM per defense. CA and ASR are
shown in percent, DEM as a fraction, as in the paper."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pandas as pd

from ..util.atomic import atomic_path, atomic_write_text

METRICS = ("ca", "asr", "dem")
HIGHER_IS_BETTER = {"ca": True, "asr": False, "dem": True}
MEAN = "MEAN"


def wide_table(rows: Sequence[Dict], defenses: Sequence[str]) -> pd.DataFrame:
    """One row per (attack, dataset) plus MEAN rows; columns ('No defense', 'ca'|'asr') and
    (defense, 'ca'|'asr'|'dem'). A missing or failed cell is NaN."""
    records = {}
    for r in rows:
        key = (r["attack"], r["dataset"])
        entry = records.setdefault(key, {})
        if r.get("ca_poisoned") is not None:
            entry[("No defense", "ca")] = r["ca_poisoned"]
            entry[("No defense", "asr")] = r["asr_poisoned"]
        if r.get("status") in ("ok", "cached"):
            for m in METRICS:
                entry[(r["defense"], m)] = r.get(m, math.nan)
    columns = [("No defense", "ca"), ("No defense", "asr")] + [(d, m) for d in defenses for m in METRICS]
    df = pd.DataFrame.from_dict(records, orient="index").reindex(columns=pd.MultiIndex.from_tuples(columns))
    df.index = pd.MultiIndex.from_tuples(df.index, names=["attack", "dataset"])
    df = df.astype(float)
    blocks = []
    for attack in dict.fromkeys(df.index.get_level_values(0)):
        part = df.loc[[attack]]
        mean = part.mean(axis=0, skipna=False).to_frame().T
        mean.index = pd.MultiIndex.from_tuples([(attack, MEAN)], names=["attack", "dataset"])
        blocks.extend([part, mean])
    return pd.concat(blocks) if blocks else df


def ranks(row: pd.Series, defenses: Sequence[str], metric: str) -> Dict[str, int]:
    """1 for the best defense on this metric, 2 for the second (ties share a rank)."""
    values = {d: row[(d, metric)] for d in defenses if not pd.isna(row[(d, metric)])}
    distinct = sorted(set(round(v, 10) for v in values.values()), reverse=HIGHER_IS_BETTER[metric])
    return {d: distinct.index(round(v, 10)) + 1 for d, v in values.items() if distinct.index(round(v, 10)) < 2}


def _fmt(value: float, metric: str) -> str:
    if pd.isna(value):
        return "-"
    return f"{value:.3f}" if metric == "dem" else f"{100 * value:.2f}"


def _styled(df: pd.DataFrame, defenses: Sequence[str], bold, underline) -> List[List[str]]:
    out = []
    for (attack, dataset), row in df.iterrows():
        cells = [attack, dataset, _fmt(row[("No defense", "ca")], "ca"), _fmt(row[("No defense", "asr")], "asr")]
        marks = {m: ranks(row, defenses, m) for m in METRICS}
        for d in defenses:
            for m in METRICS:
                text = _fmt(row[(d, m)], m)
                rank = marks[m].get(d)
                cells.append(bold(text) if rank == 1 else underline(text) if rank == 2 else text)
        out.append(cells)
    return out


def to_markdown(df: pd.DataFrame, defenses: Sequence[str]) -> str:
    head1 = ["attack", "dataset", "No defense CA", "No defense ASR"] + [f"{d} {m.upper()}" for d in defenses
                                                                          for m in METRICS]
    lines = ["| " + " | ".join(head1) + " |", "|" + "---|" * len(head1)]
    for cells in _styled(df, defenses, lambda t: f"**{t}**", lambda t: f"<u>{t}</u>"):
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def to_latex(df: pd.DataFrame, defenses: Sequence[str]) -> str:
    n = 4 + 3 * len(defenses)
    lines = [r"\begin{tabular}{ll" + "r" * (n - 2) + "}", r"\toprule",
             " & & \\multicolumn{2}{c}{No defense}" + "".join(f" & \\multicolumn{{3}}{{c}}{{{_tex(d)}}}"
                                                             for d in defenses) + r" \\",
             "Attack & Dataset & CA & ASR" + " & CA & ASR & DEM" * len(defenses) + r" \\", r"\midrule"]
    for cells in _styled(df, defenses, lambda t: f"\\textbf{{{t}}}", lambda t: f"\\underline{{{t}}}"):
        lines.append(" & ".join(_tex(c) if not c.startswith("\\") else c for c in cells) + r" \\")
        if cells[1] == MEAN:
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_table(df: pd.DataFrame, defenses: Sequence[str], out: Path, stem: str = "table2") -> Dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md", "tex": out / f"{stem}.tex"}
    flat = df.copy()
    flat.columns = [f"{d}_{m}" for d, m in df.columns]
    with atomic_path(paths["csv"]) as tmp:
        flat.to_csv(tmp)
    atomic_write_text(paths["md"], to_markdown(df, defenses))
    atomic_write_text(paths["tex"], to_latex(df, defenses))
    return paths


def dem_bar_chart(df: pd.DataFrame, defenses: Sequence[str], path: Path, title: Optional[str] = None) -> Path:
    """Grouped bars: the mean DEM per attack (its MEAN row), one bar per defense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    means = df.xs(MEAN, level="dataset")
    attacks = list(means.index)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(attacks), 3.6))
    width = 0.8 / max(len(defenses), 1)
    x = np.arange(len(attacks))
    for i, d in enumerate(defenses):
        ax.bar(x + (i - (len(defenses) - 1) / 2) * width, means[(d, "dem")].fillna(0).to_numpy(), width, label=d)
    ax.set_xticks(x, attacks)
    ax.set_ylabel("DEM (mean over data sets)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=min(len(defenses), 3), loc="lower right")
    ax.set_title(title or "Defense efficacy (DEM) per attack")
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
            text = "-" if failed or pd.isna(r[m]) else _fmt(float(r[m]), m)
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
