"""Reading, printing and comparing evaluation results: ``datafilter results show|compare RESULTS...``.

Reads the results JSON of ``datafilter evaluate`` (and a benchmark's ``runs/*/eval.json``), DataComp's own
``eval_results.jsonl``, and a benchmark's ``results.csv`` (one run per filter and seed) or ``results_summary.csv``.
Every input becomes a list of ``Run``s: per task its main metric, group and chance level where the input has them,
and DataComp's columns. Tables are per group and task, in percent, with chance levels beside the scores.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from datafilter.evaluate.suite import GROUPS

COLUMNS = (*GROUPS.values(), "Average")
OTHER = "Other tasks"  # DataComp's 18 tasks outside the four columns count in the Average only


@dataclass
class Run:
    name: str
    tasks: dict[str, dict[str, Any]]  # name -> main, metric, group (key of GROUPS or None), chance, label
    groups: dict[str, float | None]
    note: str = ""
    failed: dict[str, str] = field(default_factory=dict)


class ResultsError(ValueError):
    pass


def _datacomp_groups() -> dict[str, dict[str, Any]]:
    from datafilter.evaluate.datacomp import datacomp_tasks

    table = {}
    for t in datacomp_tasks():
        table[t["key"]] = table[t["name"]] = t
    return table


def _from_json(path: Path, doc: dict[str, Any]) -> Run:
    if not isinstance(doc.get("tasks"), dict):
        raise ResultsError(f"{path}: not a results file of `datafilter evaluate` (no 'tasks' object)")
    tasks = {name: {"main": r.get("main"), "metric": r.get("metric", "?"), "group": r.get("group"),
                    "chance": r.get("chance"), "label": r.get("label", name)} for name, r in doc["tasks"].items()}
    note = (doc.get("coverage") or {}).get("note", "")
    groups = doc.get("groups") or {}
    return Run(str(path), tasks, {c: groups.get(c) for c in COLUMNS}, note, dict(doc.get("failed") or {}))


def _from_jsonl(path: Path, lines: list[str]) -> Run:
    """DataComp's ``eval_results.jsonl``: groups and chance levels from DataComp's task table."""
    from datafilter.evaluate.zeroshot import group_averages

    table = _datacomp_groups()
    tasks = {}
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            name, metrics = row["dataset"], row["metrics"]
        except (ValueError, KeyError, TypeError):
            raise ResultsError(f"{path}:{i + 1}: not a DataComp results line (needs 'dataset' and 'metrics')") from None
        known = table.get(row.get("key")) or table.get(name) or {}
        if metrics.get("main_metric") is None:
            continue  # DataComp's aggregate drops tasks without a main metric (FairFace, UTKFace)
        tasks[known.get("key", name)] = {"main": metrics["main_metric"], "metric": known.get("metric", "main_metric"),
                                         "group": known.get("group"), "chance": known.get("chance"),
                                         "label": known.get("name", name)}
    note = "" if len(tasks) == 38 else f"{len(tasks)} of DataComp's 38 tasks"
    return Run(str(path), tasks, group_averages(tasks), note)


def _pct_or_none(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return None if math.isnan(v) else v / 100


def _from_csv(path: Path) -> list[Run]:
    """A benchmark's ``results.csv`` (filter, seed, size, columns, tasks in %) or ``results_summary.csv``."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "filter" not in rows[0]:
        raise ResultsError(f"{path}: not a benchmark results table (no 'filter' column)")
    head = rows[0]
    table = _datacomp_groups()
    runs = []
    for r in rows[1:]:
        d = dict(zip(head, r))
        name = d["filter"] + (f" seed {d['seed']}" if "seed" in d else f" ({d.get('seeds', '?')} seeds)")
        first_task = head.index("Average") + 1 if "Average" in head else len(head)
        tasks = {}
        if "seed" in head:  # per-seed rows carry every task
            for t in head[first_task:]:
                known = table.get(t, {})
                tasks[t] = {"main": _pct_or_none(d[t]), "metric": known.get("metric", "main"),
                            "group": known.get("group"), "chance": known.get("chance"),
                            "label": known.get("name", t)}
        runs.append(Run(f"{path}: {name}", tasks, {c: _pct_or_none(d.get(c, "")) for c in COLUMNS}))
    return runs


def load_results(path: str | Path) -> list[Run]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    if path.suffix == ".csv":
        return _from_csv(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [_from_jsonl(path, [ln for ln in text.splitlines() if ln.strip()])]
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ResultsError(f"{path}: not valid JSON ({exc})") from None
    return [_from_json(path, doc)]


# --- tables -----------------------------------------------------------------------------------------------------------
def _pct(v: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if v is None else f"{100 * v:>{width - 1}.2f}%"


def _sections(runs: Sequence[Run]) -> list[tuple[str, list[str]]]:
    """(heading, task names) per group in table order, tasks in the order they first appear."""
    names: list[str] = []
    for run in runs:
        names += [n for n in run.tasks if n not in names]
    group_of = {}
    for run in runs:
        for n, t in run.tasks.items():
            group_of.setdefault(n, t.get("group"))
    out = [(label, [n for n in names if group_of[n] == key]) for key, label in GROUPS.items()]
    out.append((OTHER, [n for n in names if group_of[n] not in GROUPS]))
    return [(h, ns) for h, ns in out if ns]


def _task_info(runs: Sequence[Run], name: str) -> dict[str, Any]:
    for run in runs:
        if name in run.tasks:
            return run.tasks[name]
    return {}


def format_run(results: dict[str, Any] | Run) -> str:
    """One run: a table per group (task, metric, score, chance), then DataComp's columns and the Average."""
    run = results if isinstance(results, Run) else _from_json(Path("results"), results)
    return _table([run], diff=False)


def format_compare(runs: Sequence[Run]) -> str:
    """Several runs side by side, with each later run's difference from the first (in points)."""
    return _table(runs, diff=len(runs) > 1)


def _table(runs: Sequence[Run], diff: bool) -> str:
    w = 26
    labels = [f"[{i + 1}]" for i in range(len(runs))] if len(runs) > 1 else ["score"]
    deltas = [f"[{i + 1}]-[1]" for i in range(1, len(runs))] if diff else []
    head = f"{'task':<{w}} {'metric':<20} " + " ".join(f"{x:>7}" for x in labels + deltas) + f" {'chance':>7}"
    lines = []
    if len(runs) > 1:
        lines += [f"[{i + 1}] {r.name}" + (f"  ({r.note})" if r.note else "") for i, r in enumerate(runs)] + [""]

    def row(label: str, metric: str, values: list[float | None], chance: float | None) -> str:
        cells = [_pct(v) for v in values]
        if diff:
            cells += [f"{'-':>7}" if v is None or values[0] is None else f"{100 * (v - values[0]):>+7.2f}"
                      for v in values[1:]]
        return f"{label[:w]:<{w}} {metric[:20]:<20} " + " ".join(cells) + f" {_pct(chance)}"

    for heading, names in _sections(runs):
        lines += [heading, head]
        for n in names:
            info = _task_info(runs, n)
            lines.append(row(info.get("label", n), info.get("metric", "?"),
                             [r.tasks.get(n, {}).get("main") for r in runs], info.get("chance")))
        lines.append("")
    lines.append("DataComp's columns (mean main metric of each group; Average over all tasks)" +
                 ("; [n]-[1] in points" if diff else ""))
    for col in COLUMNS:
        lines.append(row(col, "", [r.groups.get(col) for r in runs], None))
    if len(runs) == 1 and runs[0].note:
        lines.append(f"({runs[0].note})")
    for i, r in enumerate(runs):
        for msg in r.failed.values():
            lines.append(f"not scored{f' in [{i + 1}]' if len(runs) > 1 else ''}: {msg}")
    return "\n".join(lines)
