"""The results table: DataComp's columns, one row per filter, mean ± std over seeds; CSV first, the rest from it.

Besides the rows, the table says what it is: how many training seeds each row has (a one-seed table shows no ±
and draws no error bars), the chance level and number of test images of each column, the published numbers each
row stands for, and the rank agreement of the Average column with them (``published.agreement``).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from datafilter.bench.published import PublishedTable, agreement, describe_agreement
from datafilter.common.files import atomic_path, write_json
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
        entry: dict[str, Any] = {"filter": name, "size": mine[0]["size"], "seeds": [r["seed"] for r in mine],
                                 "published": mine[0].get("published")}
        for col in COLUMNS:
            vals = np.array([_pct(r["groups"].get(col)) for r in mine])
            entry[col] = float(np.mean(vals))
            entry[f"{col} std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
        out.append(entry)
    return out


def column_facts(coverage: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Chance level (%, the mean of its tasks' chance, as the column is the mean of its tasks), test images and tasks
    of each column, from one run's evaluation ``coverage`` (``datafilter.evaluate.zeroshot.coverage``)."""
    out = {}
    for col in COLUMNS:
        c = coverage["columns"].get(col) or {}
        chance = c.get("chance")
        out[col] = {"chance": float("nan") if chance is None else 100.0 * chance,
                    "test_images": int(c.get("num_samples") or 0), "tasks": int(c.get("scored") or 0),
                    "expected": int(c.get("expected") or 0)}
    return out


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def _seed_note(summary: Sequence[dict[str, Any]]) -> str:
    counts = sorted({len(e["seeds"]) for e in summary})
    if counts == [1]:
        return "one training seed per row, so no standard deviation is shown"
    if len(counts) == 1:
        return f"mean ± standard deviation over {counts[0]} training seeds"
    return (f"mean ± standard deviation over the training seeds of each row ({', '.join(map(str, counts))} seeds; "
            "a row with one seed shows no ±)")


def published_agreement(summary: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rank agreement of our Average with the published Average, over the rows that have one."""
    have = [e for e in summary if e.get("published") and "Average" in e["published"]["values"]]
    return agreement([e["Average"] for e in have], [e["published"]["values"]["Average"] for e in have],
                     [e["filter"] for e in have])


def markdown(summary: Sequence[dict[str, Any]], title: str = "", facts: Mapping[str, Mapping[str, float]] | None
             = None, published: PublishedTable | None = None, agree: Mapping[str, Any] | None = None) -> str:
    with_pub = published is not None and any(e.get("published") for e in summary)
    head = ["Filtering strategy", "Dataset size", *COLUMNS] + (["Published Average"] if with_pub else [])
    lines = ([f"**{title}** (zero-shot, %; {_seed_note(summary)})", ""] if title else []) + [
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        cells = [e["filter"], f"{e['size']:,}"] + [_fmt(e[c], e[f"{c} std"]) for c in COLUMNS]
        if with_pub:
            pub = (e.get("published") or {}).get("values", {})
            cells.append(f"{pub['Average']:.1f}" if "Average" in pub else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if facts:
        pad = [""] if with_pub else []
        lines.append("| *chance* | | " + " | ".join(_fmt(facts[c]["chance"], float("nan")) for c in COLUMNS) + " |"
                     + "".join(f" {p} |" for p in pad))
        lines.append("| *test images (tasks)* | | " + " | ".join(
            f"{facts[c]['test_images']:,} ({facts[c]['tasks']})" for c in COLUMNS) + " |"
            + "".join(f" {p} |" for p in pad))
        missing = {c: f for c, f in facts.items() if f["tasks"] < f["expected"]}
        if missing:
            lines += ["", "Not every task was scored: " + "; ".join(
                f"{c} over {f['tasks']} of {f['expected']} tasks" for c, f in missing.items()) + "."]
    if not title:
        lines += ["", f"{_seed_note(summary).capitalize()}."]
    if with_pub:
        lines += ["", f"Published numbers these rows stand for ({published.title}):", "",
                  "| Row | Published as | Dataset size | " + " | ".join(COLUMNS) + " | Source |",
                  "|" + "---|" * (len(COLUMNS) + 4)]
        for e in summary:
            pub = e.get("published")
            if not pub:
                continue
            vals = [f"{pub['values'][c]:.1f}" if c in pub["values"] else "-" for c in COLUMNS]
            lines.append(f"| {e['filter']} | {pub['label']} | {pub['size']} | " + " | ".join(vals)
                         + f" | {pub['source']} |")
        if agree is not None:
            lines += ["", describe_agreement(agree, published.title)]
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[dict[str, Any]], out_dir: Path, title: str = "",
                 coverage: Mapping[str, Any] | None = None,
                 published: PublishedTable | None = None) -> dict[str, str]:
    """Write ``results.csv`` (one row per filter and seed, with every task), ``results_summary.csv``,
    ``results.md``, ``results.png`` and (with a published table) ``agreement.json``; return their paths.

    ``coverage``: one run's evaluation coverage, for each column's chance level, test images and tasks. Rows carry
    ``published`` (a ``PublishedRow`` as a dict) when their config entry names one."""
    out_dir = Path(out_dir)
    task_names = sorted({t for r in rows for t in r["tasks"]})
    per_seed = out_dir / "results.csv"
    with atomic_path(per_seed) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filter", "seed", "dataset size", *COLUMNS, *task_names])
        for r in rows:
            w.writerow([r["filter"], r["seed"], r["size"], *[f"{_pct(r['groups'].get(c)):.3f}" for c in COLUMNS],
                        *[f"{_pct(r['tasks'].get(t)):.3f}" for t in task_names]])
    summary = aggregate(rows)
    facts = column_facts(coverage) if coverage else None
    summary_csv = out_dir / "results_summary.csv"
    with atomic_path(summary_csv) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filter", "dataset size", "seeds", *[x for c in COLUMNS for x in (c, f"{c} std")],
                    "published row", "published size", *[f"published {c}" for c in COLUMNS]])
        for e in summary:
            pub = e.get("published") or {}
            w.writerow([e["filter"], e["size"], len(e["seeds"]),
                        *[f"{e[x]:.3f}" for c in COLUMNS for x in (c, f"{c} std")],
                        pub.get("key", ""), pub.get("size", ""),
                        *[pub.get("values", {}).get(c, "") for c in COLUMNS]])
    paths = {"csv": str(per_seed), "summary_csv": str(summary_csv)}
    agree = None
    if published is not None:
        agree = {"published_table": published.name, "title": published.title, **published_agreement(summary)}
        write_json(out_dir / "agreement.json", agree)
        paths["agreement"] = str(out_dir / "agreement.json")
    md = out_dir / "results.md"
    with atomic_path(md) as tmp:
        tmp.write_text(markdown(summary, title, facts, published, agree))
    png = out_dir / "results.png"
    _plot(summary, png, title, agree)
    paths.update(markdown=str(md), plot=str(png))
    return paths


def _plot(summary: Sequence[dict[str, Any]], path: Path, title: str, agree: Mapping[str, Any] | None) -> None:
    """Bars per column (error bars only where a row has several seeds) and, with published numbers, our Average
    against the published Average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scatter = agree is not None and agree["rows"] > 0
    fig, axes = plt.subplots(1, 2 if scatter else 1, figsize=(14 if scatter else 10, 4.5),
                             gridspec_kw={"width_ratios": [2.2, 1]} if scatter else None)
    ax = axes[0] if scatter else axes
    width = 0.8 / max(1, len(summary))
    x = np.arange(len(COLUMNS))
    for i, e in enumerate(summary):
        means = [e[c] for c in COLUMNS]
        stds = [e[f"{c} std"] for c in COLUMNS]
        yerr = None if all(math.isnan(s) for s in stds) else [0 if math.isnan(s) else s for s in stds]
        ax.bar(x + i * width, means, width, yerr=yerr, label=f"{e['filter']} ({e['size']:,})",
               capsize=2 if yerr is not None else 0)
    ax.set_xticks(x + width * (len(summary) - 1) / 2, COLUMNS)
    ax.set_ylabel("zero-shot %")
    ax.set_title(f"{title} ({_seed_note(summary)})" if title else _seed_note(summary), fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    if scatter:
        ax2 = axes[1]
        ax2.scatter(agree["published"], agree["ours"])
        for label, px, py in zip(agree["labels"], agree["published"], agree["ours"]):
            ax2.annotate(label, (px, py), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax2.set_xlabel(f"published Average ({agree.get('title', '')})", fontsize=7)
        ax2.set_ylabel("this benchmark's Average")
        if agree.get("spearman") is not None:
            ax2.set_title(f"Spearman {agree['spearman']:.2f}, Kendall {agree['kendall']:.2f} "
                          f"({agree['rows']} rows)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
