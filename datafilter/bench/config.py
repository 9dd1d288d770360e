"""A benchmark config: which pool and suite, which scorer, which filters, which training scale and seeds.

Only the filters vary between the rows of a benchmark's table; everything else is fixed by this one file, as in
DataComp. ``load_bench_config`` checks every key's type and reports every problem at once, each with the file and the
key; ``datafilter.bench.validate`` checks what needs more than the file itself (the filter registry, the scales,
paths) before any stage runs. Every key is described in ``docs/bench.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from datafilter.common.files import read_yaml


class BenchConfigError(ValueError):
    pass


# A benchmark's name is a folder under WORK/bench: one path component, nothing that climbs out or hides.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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
    # A released scorer (``datafilter scorer release``) used instead of training when it is the one the recipe
    # would train (``datafilter.train.scorer.use_release``).
    scorer_release: str | None = None
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
        where = self.path or self.name
        bad_name = _name(self.name)
        if bad_name:
            raise BenchConfigError(f"{where}: name: {bad_name}")
        if not self.filters:
            raise BenchConfigError(f"{where}: no filters to compare")
        empty = [f.label for f in self.filters if not f.slug]
        if empty:
            raise BenchConfigError(f"{where}: filter label {empty[0]!r} has no letter or digit to name its files by")
        slugs = [f.slug for f in self.filters]
        dup = {s for s in slugs if slugs.count(s) > 1}
        if dup:
            raise BenchConfigError(f"{where}: filter labels must differ: {', '.join(sorted(dup))}")
        if not self.recipe and not (self.pool and self.suite):
            raise BenchConfigError(f"{where}: give a recipe, or both pool and suite directories")
        if not self.scorer_recipe and not self.embed_model:
            raise BenchConfigError(f"{where}: give scorer_recipe (offline scorer) or embed_model")
        if not self.seeds:
            raise BenchConfigError(f"{where}: at least one seed")


# --- reading a file ---------------------------------------------------------------------------------------------------
def _name(value: Any) -> str | None:
    if isinstance(value, str) and NAME_RE.fullmatch(value):
        return None
    return (f"{value!r} is not a plain folder name (letters, digits, '.', '_' and '-', not starting with '.'); "
            f"results go to WORK/bench/NAME")


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return None
    return f"expected text, got {value!r}"


def _count(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return None
    return f"expected a positive whole number such as 131072, got {value!r}"


def _flag(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    hint = " (quoted, so it is text; write true or false without quotes)" if isinstance(value, str) else ""
    return f"expected true or false, got {value!r}{hint}"


def _seeds(value: Any) -> str | None:
    ok = isinstance(value, (list, tuple)) and value and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
    if not ok:
        return f"expected a list of whole numbers >= 0 such as [0] or [0, 1, 2], got {value!r}"
    if len(set(value)) != len(value):
        return f"{list(value)} repeats a seed; each seed is one training run, and a repeat would count twice in the std"
    return None


# Each key of a benchmark config and the check of its value (None values mean "not given", as if absent).
KEY_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "name": _name, "recipe": _text, "pool": _text, "suite": _text, "scorer_recipe": _text,
    "scorer_samples_seen": _count, "scorer_release": _text, "embed_model": _text, "embed_pretrained": _text, "embed_checkpoint": _text,
    "scale": _text, "samples_seen": _count, "seeds": _seeds, "train": _flag, "published": _text,
}
FILTER_KEYS = ("label", "name", "params", "published")


def _filters(value: Any, problems: list[str]) -> tuple[FilterEntry, ...]:
    if not isinstance(value, list):
        problems.append(f"filters: expected a list of {{label, name, params}} entries, got {value!r}")
        return ()
    out = []
    for i, f in enumerate(value):
        where = f"filters[{i}]"
        if not isinstance(f, dict):
            problems.append(f"{where}: expected a mapping with label, name and params, got {f!r}")
            continue
        unknown = sorted(set(f) - set(FILTER_KEYS))
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(FILTER_KEYS)})")
        bad = False
        for key in ("label", "name"):
            if key not in f:
                problems.append(f"{where}: each filter needs a label and a name ({key} missing)")
                bad = True
            elif not isinstance(f[key], (str, int, float)) or isinstance(f[key], bool) or not str(f[key]).strip():
                problems.append(f"{where}.{key}: expected text, got {f[key]!r}")
                bad = True
        params = f.get("params")
        if params is not None and not isinstance(params, dict):
            problems.append(f"{where}.params: expected a mapping of parameter names to values, got {params!r}")
            bad = True
        published = f.get("published")
        if published is not None and _text(published):
            problems.append(f"{where}.published: {_text(published)}")
            bad = True
        if not bad:
            out.append(FilterEntry(label=str(f["label"]), name=str(f["name"]), params=dict(params or {}),
                                   published=published))
    return tuple(out)


def load_bench_config(path: str | Path, **overrides: Any) -> BenchConfig:
    """Read and type-check a benchmark config; ``overrides`` (``seeds``, ``samples_seen`` from the command line;
    ``None`` ignored) replace the file's values. Every problem found is reported at once, each with its key."""
    path = Path(path)
    data = read_yaml(path, "benchmark config", BenchConfigError)
    if not isinstance(data, dict):
        raise BenchConfigError(f"{path}: expected a mapping with name, recipe, filters, ... (see docs/bench.md)")
    known = {f.name for f in fields(BenchConfig)} - {"path"}
    problems = []
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        import difflib

        hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k, known, n=1)) else k
                 for k in unknown]
        problems.append(f"unknown keys {', '.join(hints)}; known: {', '.join(sorted(known))}")
    if data.get("name") is None:
        problems.append("name: missing (results go to WORK/bench/NAME)")
    filters = _filters(data.pop("filters", None) or [], problems)
    values = {k: v for k, v in data.items() if k in known and v is not None}
    given = {k: v for k, v in overrides.items() if v is not None}
    for key, value in {**values, **given}.items():
        message = KEY_CHECKS[key](value)
        if message:
            problems.append(f"{key}: {message}" if key not in given else f"--{key.replace('_', '-')}: {message}")
    if problems:
        raise BenchConfigError(format_problems(path, problems))
    values.update(given)
    if "seeds" in values:
        values["seeds"] = tuple(values["seeds"])
    return BenchConfig(filters=filters, path=str(path), **values)


def format_problems(path: Path | str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{path}: {problems[0]}"
    return f"{path}: {len(problems)} problems:\n  " + "\n  ".join(problems)
