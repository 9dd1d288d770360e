"""Check a whole benchmark config before any stage runs, so that a typo costs seconds, not the pool, suite, scorer
and embedding stages that run before the first filter or training run.

``load_bench_config`` has checked each key's type; this checks what needs more than the file: filter names and
parameters through the filter registry (with "did you mean"), the training scale and its recipe, the recipes and
directories named, and which keys make sense together. It imports no torch and reads no pool data, so it takes well
under two seconds. Every problem is reported at once, each with the file and the key.
"""

from __future__ import annotations

import logging
from pathlib import Path

from datafilter.common.hints import did_you_mean
from datafilter.bench.config import BenchConfig, BenchConfigError, format_problems

log = logging.getLogger(__name__)


def check_bench_config(cfg: BenchConfig) -> BenchConfig:
    """Raise ``BenchConfigError`` listing every problem of ``cfg``; log warnings for what is allowed but
    probably not meant. Returns ``cfg`` unchanged, so a caller can write ``cfg = check_bench_config(load(...))``."""
    problems = [*_filter_problems(cfg), *_scale_problems(cfg), *_source_problems(cfg), *_model_problems(cfg),
                *_published_problems(cfg)]
    if problems:
        raise BenchConfigError(format_problems(cfg.path or cfg.name, problems))
    if cfg.embed_model and not (cfg.embed_pretrained or cfg.embed_checkpoint):
        log.warning("%s: embed_model %s has neither embed_pretrained nor embed_checkpoint: its CLIP scores come from "
                    "random weights and rank pairs at random", cfg.path or cfg.name, cfg.embed_model)
    return cfg


def _filter_problems(cfg: BenchConfig) -> list[str]:
    from datafilter.filters.base import FilterError, make_config
    from datafilter.filters.registry import filter_class

    out = []
    for i, entry in enumerate(cfg.filters):
        where = f"filters[{i}] ({entry.label})"
        try:
            cls, _ = filter_class(entry.name)
        except FilterError as exc:
            out.append(f"{where}.name: {exc}")
            continue
        try:
            make_config(cls.Config, entry.params, owner=entry.name)
        except ValueError as exc:
            out.append(f"{where}.params: {exc}")
    return out


def _scale_problems(cfg: BenchConfig) -> list[str]:
    from datafilter.train.config import SCALES, scale_config

    if cfg.scale not in SCALES:
        hint = did_you_mean(cfg.scale, SCALES)
        return [f"scale: unknown scale {cfg.scale!r}{hint} (known: {', '.join(SCALES)})"]
    try:
        scale_config(cfg.scale, samples_seen=cfg.samples_seen)
    except ValueError as exc:
        return [f"samples_seen: {exc}"]
    return []


def _source_problems(cfg: BenchConfig) -> list[str]:
    from datafilter.micro.recipe import RecipeError, load_recipe

    out = []
    for key in ("recipe", "scorer_recipe"):
        path = getattr(cfg, key)
        if path is None:
            continue
        if not Path(path).is_file():
            out.append(f"{key}: recipe not found: {path} (relative paths are taken from the folder bench runs in, "
                       f"{Path.cwd()})")
            continue
        try:
            load_recipe(path)
        except RecipeError as exc:
            out.append(f"{key}: {exc}")
    if cfg.pool is not None:
        pool = Path(cfg.pool)
        if not pool.is_dir():
            out.append(f"pool: pool directory not found: {pool}")
        elif not any(pool.glob("[0-9]*.parquet")):
            out.append(f"pool: {pool} holds no shards (NNNNNNNN.tar with NNNNNNNN.parquet); ingest one with "
                       f"`datafilter pool ingest SOURCE --out {pool}`")
    if cfg.suite is not None:
        suite = Path(cfg.suite)
        if not (suite / "suite.json").is_file():
            out.append(f"suite: {suite} has no suite.json (an evaluation suite directory; see docs/evaluation.md)")
    return out


def _model_problems(cfg: BenchConfig) -> list[str]:
    out = []
    if cfg.embed_model and cfg.scorer_recipe:
        out.append("embed_model and scorer_recipe: give one; with embed_model the offline scorer is not trained and "
                   "scorer_recipe would be ignored")
    if not cfg.embed_model:
        for key in ("embed_pretrained", "embed_checkpoint"):
            if getattr(cfg, key):
                out.append(f"{key}: needs embed_model (the open_clip architecture the weights belong to)")
    if cfg.embed_pretrained and cfg.embed_checkpoint:
        out.append("embed_pretrained and embed_checkpoint: give one (a pretrained tag or a checkpoint file)")
    if cfg.embed_checkpoint and not Path(cfg.embed_checkpoint).is_file():
        out.append(f"embed_checkpoint: checkpoint not found: {cfg.embed_checkpoint}")
    if cfg.scorer_samples_seen is not None and not cfg.scorer_recipe:
        out.append("scorer_samples_seen: only used with scorer_recipe (the offline scorer's training budget)")
    if cfg.scorer_release is not None:
        from datafilter.train.scorer import ReleaseError, read_release

        if not cfg.scorer_recipe:
            out.append("scorer_release: only used with scorer_recipe (the recipe the release must have been "
                       "trained from)")
        try:  # the files only: whether it matches the recipe is decided (and said) when the scorer stage runs
            read_release(cfg.scorer_release, check_checkpoint=False)
        except ReleaseError as exc:
            out.append(f"scorer_release: {exc}")
    return out


def _published_problems(cfg: BenchConfig) -> list[str]:
    from datafilter.bench.published import PublishedError, published_table

    rows = [(i, e) for i, e in enumerate(cfg.filters) if e.published]
    if cfg.published is None:
        return [f"filters[{i}] ({e.label}).published: needs the config's published table (e.g. published: "
                f"datacomp_small)" for i, e in rows]
    try:
        table = published_table(cfg.published)
    except PublishedError as exc:
        return [f"published: {exc}"]
    out = []
    for i, e in rows:
        try:
            table.row(e.published)
        except PublishedError as exc:
            out.append(f"filters[{i}] ({e.label}).published: {exc}")
    return out
