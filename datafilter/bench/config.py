"""A benchmark config: which pool and suite, which scorer, which filters, which training scale and seeds.

Only the filters vary between the rows of a benchmark's table; everything else is fixed by this one file, as in
DataComp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datafilter.common.files import read_yaml


class BenchConfigError(ValueError):
    pass


@dataclass(frozen=True)
class FilterEntry:
    """One row of the table: a registered filter with its parameters, under a human label."""

    label: str
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    published: str | None = None  # the row of the config's published table this entry stands for

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")


@dataclass(frozen=True)
class BenchConfig:
    name: str
    filters: tuple[FilterEntry, ...]
    # The pool and suite: built from a recipe (pools/*.yaml), or existing directories (e.g. an ingested DataComp
    # pool and DataComp's evaluation sets described by a suite.json).
    recipe: str | None = None
    pool: str | None = None
    suite: str | None = None
    # CLIP scores: the offline scorer trained on this clean-pool recipe, or an open_clip model given here.
    scorer_recipe: str | None = None
    scorer_samples_seen: int | None = None  # None: the scorer's own recipe (several times a micro run)
    embed_model: str | None = None
    embed_pretrained: str | None = None
    embed_checkpoint: str | None = None
    # Training: a scale of ``datafilter.train.config.SCALES``; ``samples_seen`` overrides the scale's budget.
    scale: str = "micro"
    samples_seen: int | None = None
    seeds: tuple[int, ...] = (0,)
    train: bool = True
    # Published results the rows are compared with (a table of ``datafilter/bench/published.yaml``).
    published: str | None = None
    path: str = ""

    def __post_init__(self) -> None:
        if not self.filters:
            raise BenchConfigError(f"{self.path or self.name}: no filters to compare")
        slugs = [f.slug for f in self.filters]
        dup = {s for s in slugs if slugs.count(s) > 1}
        if dup:
            raise BenchConfigError(f"{self.path or self.name}: filter labels must differ: {', '.join(sorted(dup))}")
        if not self.recipe and not (self.pool and self.suite):
            raise BenchConfigError(f"{self.path or self.name}: give a recipe, or both pool and suite directories")
        if not self.scorer_recipe and not self.embed_model:
            raise BenchConfigError(f"{self.path or self.name}: give scorer_recipe (offline scorer) or embed_model")
        if not self.seeds:
            raise BenchConfigError(f"{self.path or self.name}: at least one seed")


def load_bench_config(path: str | Path, **overrides: Any) -> BenchConfig:
    path = Path(path)
    data = read_yaml(path, "benchmark config", BenchConfigError)
    if not isinstance(data, dict):
        raise BenchConfigError(f"{path}: expected a mapping with name, recipe, filters, ...")
    known = set(BenchConfig.__dataclass_fields__) - {"path"}
    unknown = set(data) - known
    if unknown:
        raise BenchConfigError(f"{path}: unknown keys {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    try:
        filters = tuple(FilterEntry(label=str(f["label"]), name=str(f["name"]), params=dict(f.get("params") or {}),
                                    published=f.get("published"))
                        for f in data.pop("filters", []) or [])
    except (KeyError, TypeError) as exc:
        raise BenchConfigError(f"{path}: each filter needs a label and a name ({exc})") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "seeds" in data:
        data["seeds"] = tuple(int(s) for s in data["seeds"])
    try:
        return BenchConfig(filters=filters, path=str(path), **data)
    except TypeError as exc:
        raise BenchConfigError(f"{path}: {exc}") from None
