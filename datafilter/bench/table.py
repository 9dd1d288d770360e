"""The results table: DataComp's columns, one row per filter, mean ± std over seeds; CSV first, the rest from it."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from datafilter.common.files import atomic_path
from datafilter.evaluate.suite import GROUPS

COLUMNS = (*GROUPS.values(), "Average")


def _pct(v: float | None) -> float:
    return float("nan") if v is None else 100.0 * float(v)


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per filter (in first-seen order) with mean and std (over seeds, ddof=1) of each column, in %."""
    order: list[str] = []
    for r in rows:
        if r["filter"] not in order:
            order.append(r["filter"])
    out = []
    for name in order:
        mine = [r for r in rows if r["filter"] == name]
        entry: dict[str, Any] = {"filter": name, "size": mine[0]["size"], "seeds": [r["seed"] for r in mine]}
        for col in COLUMNS:
            vals = np.array([_pct(r["groups"].get(col)) for r in mine])
            entry[col] = float(np.mean(vals))
            entry[f"{col} std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
        out.append(entry)
    return out


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def markdown(summary: Sequence[dict[str, Any]], title: str = "") -> str:
    head = ["Filtering strategy", "Dataset size", *COLUMNS]
    lines = ([f"**{title}** (zero-shot, %)", ""] if title else []) + [
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        cells = [e["filter"], f"{e['size']:,}"] + [_fmt(e[c], e[f"{c} std"]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({len(e["seeds"]) for e in summary})
    lines += ["", f"Seeds per row: {', '.join(map(str, seeds))}; ± is the standard deviation over seeds."]
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[dict[str, Any]], out_dir: Path, title: str = "") -> dict[str, str]:
    """Write ``results.csv`` (one row per filter and seed, with every task), ``results_summary.csv``,
    ``results.md`` and ``results.png``; return their paths."""
    out_dir = Path(out_dir)
    tasks = sorted({t for r in rows for t in r["tasks"]})
    per_seed = out_dir / "results.csv"
    with atomic_path(per_seed) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filter", "seed", "dataset size", *COLUMNS, *tasks])
        for r in rows:
            w.writerow([r["filter"], r["seed"], r["size"], *[f"{_pct(r['groups'].get(c)):.3f}" for c in COLUMNS],
                        *[f"{_pct(r['tasks'].get(t)):.3f}" for t in tasks]])
    summary = aggregate(rows)
    summary_csv = out_dir / "results_summary.csv"
    with atomic_path(summary_csv) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filter", "dataset size", "seeds", *[x for c in COLUMNS for x in (c, f"{c} std")]])
        for e in summary:
            w.writerow([e["filter"], e["size"], len(e["seeds"]),
                        *[f"{e[x]:.3f}" for c in COLUMNS for x in (c, f"{c} std")]])
    md = out_dir / "results.md"
    with atomic_path(md) as tmp:
        tmp.write_text(markdown(summary, title))
    png = out_dir / "results.png"
    _plot(summary, png, title)
    return {"csv": str(per_seed), "summary_csv": str(summary_csv), "markdown": str(md), "plot": str(png)}


def _plot(summary: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(summary))
    x = np.arange(len(COLUMNS))
    for i, e in enumerate(summary):
        means = [e[c] for c in COLUMNS]
        stds = [0 if math.isnan(e[f"{c} std"]) else e[f"{c} std"] for c in COLUMNS]
        ax.bar(x + i * width, means, width, yerr=stds, label=f"{e['filter']} ({e['size']:,})", capsize=2)
    ax.set_xticks(x + width * (len(summary) - 1) / 2, COLUMNS)
    ax.set_ylabel("zero-shot %")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
