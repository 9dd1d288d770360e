"""Run a benchmark config end to end, caching every stage so that a rerun (or a run after a kill) resumes.

Stages and where they keep their output (``WORK`` = ``--work``, default ``work``)::

    pool       WORK/pools/RECIPE-HASH/                 (per-shard resume inside)
    suite      WORK/suites/RECIPE-HASH/
    scorer     $DATAFILTER_CACHE/scorer/KEY/            (keyed by the clean pool and the scorer recipe)
    embed      POOL/embeddings/SPACE/                   (per-shard resume inside)
    filter     WORK/bench/NAME/subsets/SLUG.npy         (+ .json sidecar; redone only if its parameters change)
    report     WORK/bench/NAME/subsets/SLUG.report.json (noise removed: precision and recall per noise type)
    train      WORK/bench/NAME/runs/SLUG-seedS/         (resumes from its last checkpoint)
    evaluate   WORK/bench/NAME/runs/SLUG-seedS/eval.json
    table      WORK/bench/NAME/results.csv, results.md, results.png

Each stage is a call into its own package; this module only decides paths and order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datafilter.bench.config import BenchConfig, FilterEntry
from datafilter.common.files import read_json, sha256_file, stable_hash, write_json

log = logging.getLogger(__name__)

STAGES = ("pool", "suite", "scorer", "embed", "filter", "train", "evaluate")


@dataclass(frozen=True)
class BenchPaths:
    work: Path
    pool: Path
    suite: Path
    bench: Path

    def subset(self, entry: FilterEntry) -> Path:
        return self.bench / "subsets" / f"{entry.slug}.npy"

    def run(self, entry: FilterEntry, seed: int, key: str) -> Path:
        """A training run's folder; ``key`` hashes what decides its result, so a changed subset or recipe gets a
        new folder instead of colliding with a finished run."""
        return self.bench / "runs" / f"{entry.slug}-seed{seed}-{key}"


def _stage(name: str) -> None:
    log.info("=== %s ===", name)


def _recipe_tag(recipe_path: str) -> str:
    """NAME-HASH of a recipe: built pools and suites carry it, so an edited recipe never mixes with an old build."""
    from datafilter.micro.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    return f"{recipe.name}-{stable_hash(recipe.to_dict(), 8)}"


def _built_pool(recipe_path: str, work: Path, workers: int) -> Path:
    from datafilter.micro.poolbuild import build_pool
    from datafilter.micro.recipe import load_recipe

    out = work / "pools" / _recipe_tag(recipe_path)
    if not (out / "build.json").exists():
        build_pool(load_recipe(recipe_path), out, workers=workers)
    return out


def _built_suite(recipe_path: str, work: Path, pool_dir: Path, workers: int) -> Path:
    from datafilter.micro.recipe import load_recipe
    from datafilter.micro.suite import build_suite

    out = work / "suites" / _recipe_tag(recipe_path)
    if not (out / "suite.json").exists():
        build_suite(load_recipe(recipe_path), out, pool_dir=pool_dir, workers=workers)
    return out


def paths_for(cfg: BenchConfig, work: Path) -> BenchPaths:
    pool = Path(cfg.pool) if cfg.pool else None
    suite = Path(cfg.suite) if cfg.suite else None
    if pool is None or suite is None:
        tag = _recipe_tag(cfg.recipe)
        pool = pool or work / "pools" / tag
        suite = suite or work / "suites" / tag
    return BenchPaths(work, pool, suite, work / "bench" / cfg.name)


def _scorer_spec(cfg: BenchConfig, work: Path, suite: Path, workers: int, threads: int | None):
    from datafilter.models import ModelSpec

    if cfg.embed_model:
        return ModelSpec(cfg.embed_model, pretrained=cfg.embed_pretrained, checkpoint=cfg.embed_checkpoint)
    from datafilter.train.scorer import scorer_config, train_scorer

    clean = _built_pool(cfg.scorer_recipe, work, workers)
    info = train_scorer(clean, suite, scorer_config(samples_seen=cfg.scorer_samples_seen), threads=threads)
    return ModelSpec(info["model"], checkpoint=str(Path(info["path"]) / info["checkpoint"]))


def _filter(entry: FilterEntry, pool: Path, suite: Path, space: str, out: Path) -> dict[str, Any]:
    """Run one filter unless this config already made its subset (same filter version, parameters, embeddings and
    reference sets, which come from the suite)."""
    from datafilter.filters.harness import filter_pool
    from datafilter.filters.subset import load_subset

    from datafilter.filters.registry import filter_class

    cls, _ = filter_class(entry.name)
    request = {"filter": entry.name, "version": cls.version, "params": entry.params, "space": space,
               "pool": str(pool), "suite": str(suite)}
    request_path = out.with_suffix(".request.json")
    if out.exists() and request_path.exists() and read_json(request_path) == request:
        return load_subset(out)[1]
    request_path.unlink(missing_ok=True)  # a kill while the subset is replaced must not leave the old request
    filter_pool(entry.name, pool, out, params=entry.params, space=space)
    write_json(request_path, request)
    return load_subset(out)[1]


def run_bench(cfg: BenchConfig, work: str | Path = "work", *, workers: int = 2, threads: int | None = None,
              stop_after: str | None = None) -> dict[str, Any]:
    """Run (or resume) every stage of ``cfg``; return a summary with the paths of what it wrote.

    ``workers``: processes for building and decoding; ``threads``: torch threads for training (default: the free
    cores; on a machine shared with other busy processes, 1 is often much faster).
    """
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGES)}")
    from datafilter.micro import sources

    t0 = time.time()
    work = Path(work)
    paths = paths_for(cfg, work)
    paths.bench.mkdir(parents=True, exist_ok=True)
    write_json(paths.bench / "config.json", {"config": _config_json(cfg), "work": str(work)})
    summary: dict[str, Any] = {"name": cfg.name, "bench_dir": str(paths.bench)}

    def done(stage: str) -> bool:
        return stop_after == stage

    if cfg.recipe or cfg.scorer_recipe:
        _stage("sources")
        report = sources.install()
        if report.failed_required:
            raise RuntimeError("required sources are missing; `datafilter sources status` lists them and what "
                               "they feed")

    _stage("pool")
    pool_dir = paths.pool if cfg.pool else _built_pool(cfg.recipe, work, workers)
    summary["pool"] = str(pool_dir)
    if done("pool"):
        return summary
    _stage("suite")
    suite_dir = paths.suite if cfg.suite else _built_suite(cfg.recipe, work, pool_dir, workers)
    summary["suite"] = str(suite_dir)
    if done("suite"):
        return summary

    _stage("scorer")
    spec = _scorer_spec(cfg, work, suite_dir, workers, threads)
    summary["scorer"] = {"model": spec.name, "checkpoint": spec.checkpoint, "pretrained": spec.pretrained}
    if done("scorer"):
        return summary

    _stage("embed")
    from datafilter.embed.pipeline import embed_pool
    from datafilter.embed.reference import embed_reference_sets
    from datafilter.models import load_model, pick_device

    model = load_model(spec, device=pick_device())
    space = embed_pool(pool_dir, model).space
    embed_reference_sets(pool_dir, model, suite_dir, space=space)
    del model
    summary["space"] = space
    if done("embed"):
        return summary

    _stage("filter")
    from datafilter.filters.report import subset_report

    subsets: dict[str, dict[str, Any]] = {}
    for entry in cfg.filters:
        out = paths.subset(entry)
        meta = _filter(entry, pool_dir, suite_dir, space, out)
        report, _ = subset_report(out, pool_dir=pool_dir, plot=False)
        subsets[entry.label] = {"path": str(out), "kept": int(meta["kept"]), "noise": report.get("noise")}
    write_json(paths.bench / "filters.json", subsets)
    summary["subsets"] = subsets
    print(format_filter_table(subsets))
    if done("filter") or not cfg.train:
        return summary

    _stage("train + evaluate")
    from datafilter.bench.table import write_tables
    from datafilter.evaluate.suite import load_suite
    from datafilter.evaluate.zeroshot import evaluate_suite
    from datafilter.models import ModelSpec
    from datafilter.pool import Pool
    from datafilter.train.config import scale_config
    from datafilter.train.loop import train

    suite = load_suite(suite_dir)
    pool_id = Pool(pool_dir).pool_id
    rows = []
    for entry in cfg.filters:
        subset = subsets[entry.label]["path"]
        for seed in cfg.seeds:
            train_cfg = scale_config(cfg.scale, seed=seed, samples_seen=cfg.samples_seen)
            run_dir = paths.run(entry, seed, stable_hash([sha256_file(subset), train_cfg.recipe(), pool_id], 8))
            log.info("training on %s (seed %d) -> %s", entry.label, seed, run_dir)
            result = train(pool_dir, run_dir, train_cfg, subset=subset, threads=threads)
            if done("train"):
                continue
            eval_path = run_dir / "eval.json"
            results = read_json(eval_path) if eval_path.exists() else None
            if results is None or (results.get("checkpoint_id"), results["suite"].get("id")) != \
                    (result.checkpoint_sha256, suite.suite_id):
                trained = load_model(ModelSpec(train_cfg.model, checkpoint=str(result.checkpoint)),
                                     device=pick_device())
                results = evaluate_suite(trained, suite, out=eval_path, checkpoint=result.checkpoint)
            rows.append({"filter": entry.label, "seed": seed, "size": subsets[entry.label]["kept"],
                         "groups": results["groups"], "tasks": {k: v["main"] for k, v in results["tasks"].items()}})
    if done("train"):
        return summary
    summary["tables"] = write_tables(rows, paths.bench, title=f"{cfg.name}: {cfg.scale} scale, "
                                     f"{scale_config(cfg.scale, samples_seen=cfg.samples_seen).samples_seen:,} "
                                     f"samples seen")
    summary["seconds"] = time.time() - t0
    write_json(paths.bench / "summary.json", summary)
    return summary


def _config_json(cfg: BenchConfig) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(cfg)
    d["seeds"] = list(cfg.seeds)
    return d


def format_filter_table(subsets: dict[str, dict[str, Any]]) -> str:
    """What each filter kept and, with ground truth, how clean the subset is and how much noise it removed."""
    lines = [f"{'filter':<36} {'kept':>8} {'clean share':>12} {'noise removed':>14} {'removed = noise':>16}"]
    for label, s in subsets.items():
        noise = s.get("noise") or {}
        anyn = noise.get("any_noise", {})
        cells = [noise.get("kept_clean_fraction"), anyn.get("recall"), anyn.get("precision")]
        shown = [f"{100 * v:.1f}%" if isinstance(v, (int, float)) else "-" for v in cells]
        lines.append(f"{label:<36} {s['kept']:>8,} {shown[0]:>12} {shown[1]:>14} {shown[2]:>16}")
    return "\n".join(lines)
