"""Published results a benchmark's rows stand for, and how well the benchmark's ranking of filters agrees with them.

A miniature is only worth running if it orders filters as the real benchmark does. The tables live in
``published.yaml`` (data, not code); a bench config names one (``published: datacomp_small``) and each filter entry
the row it stands for (``published: clip_score_30``). ``agreement`` is the rank correlation of the Average column
over the rows that have a published Average: Spearman's rho and Kendall's tau-b with their p-values and the number
of rows, which at DataComp's handful of baselines is small enough that the p-values matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from datafilter.common.files import read_yaml
from datafilter.common.hints import did_you_mean

PUBLISHED_FILE = Path(__file__).with_name("published.yaml")


class PublishedError(ValueError):
    pass


@dataclass(frozen=True)
class PublishedRow:
    key: str
    label: str
    source: str  # the source's description
    size: str
    values: Mapping[str, float] = field(default_factory=dict)  # table column -> value in %


@dataclass(frozen=True)
class PublishedTable:
    name: str
    title: str
    rows: Mapping[str, PublishedRow]

    def row(self, key: str) -> PublishedRow:
        if key not in self.rows:
            hint = did_you_mean(key, self.rows)
            raise PublishedError(f"published table {self.name!r} has no row {key!r}{hint} "
                                 f"(rows: {', '.join(self.rows)})")
        return self.rows[key]


@lru_cache(maxsize=None)
def _tables() -> dict[str, PublishedTable]:
    data = read_yaml(PUBLISHED_FILE, "published results", PublishedError)
    out = {}
    for name, t in data.items():
        sources = t["sources"]
        rows = {key: PublishedRow(key, r["label"], sources[r["source"]], str(r["size"]),
                                  {k: float(v) for k, v in r.items() if k not in ("label", "source", "size")})
                for key, r in t["rows"].items()}
        out[name] = PublishedTable(name, t["title"], rows)
    return out


def published_table(name: str) -> PublishedTable:
    tables = _tables()
    if name not in tables:
        hint = did_you_mean(name, tables)
        raise PublishedError(f"no published table {name!r}{hint} (known: {', '.join(tables)})")
    return tables[name]


def agreement(ours: Sequence[float], theirs: Sequence[float], labels: Sequence[str] = ()) -> dict[str, Any]:
    """Rank agreement of two columns over the rows both have: Spearman's rho and Kendall's tau-b (ties share
    ranks), each with its two-sided p-value. With fewer than three rows nothing is computed."""
    from scipy import stats

    n = len(ours)
    if n != len(theirs):
        raise ValueError(f"{n} values against {len(theirs)} published values")
    out: dict[str, Any] = {"rows": n, "labels": list(labels), "ours": [float(v) for v in ours],
                           "published": [float(v) for v in theirs]}
    if n < 3:
        out.update(spearman=None, spearman_p=None, kendall=None, kendall_p=None)
        return out
    rho, rho_p = stats.spearmanr(ours, theirs)
    tau, tau_p = stats.kendalltau(ours, theirs)  # tau-b: ties in either column are accounted for

    def num(x: float) -> float | None:
        return None if x is None or math.isnan(float(x)) else float(x)

    out.update(spearman=num(rho), spearman_p=num(rho_p), kendall=num(tau), kendall_p=num(tau_p))
    return out


def describe_agreement(a: Mapping[str, Any], title: str) -> str:
    """One sentence for the results table and the log."""
    if a["spearman"] is None:
        return (f"Rank agreement with {title}: needs at least three rows with a published Average "
                f"({a['rows']} here).")
    return (f"Rank agreement of the Average column with {title}, over the {a['rows']} rows that have a published "
            f"Average: Spearman {a['spearman']:.2f} (p = {a['spearman_p']:.3f}), Kendall {a['kendall']:.2f} "
            f"(p = {a['kendall_p']:.3f}). {a['rows']} rows are few: one swapped pair moves Kendall's tau by "
            f"{4 / (a['rows'] * (a['rows'] - 1)):.2f}.")
