"""Run a benchmark config end to end, caching every stage so that a rerun (or a run after a kill) resumes.

Stages and where they keep their output (``WORK`` = ``--work``, default ``work``)::

    pool       WORK/pools/RECIPE-HASH/                 (per-shard resume inside)
    suite      WORK/suites/RECIPE-HASH/
    scorer     $DATAFILTER_CACHE/scorer/KEY/            (keyed by the clean pool and the scorer recipe; a matching
                                                        release is installed there instead of training one)
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
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from datafilter.bench.config import BenchConfig, FilterEntry
from datafilter.bench.progress import BenchProgress
from datafilter.bench.published import published_table
from datafilter.common.files import read_json, sha256_file, stable_hash, write_json

log = logging.getLogger(__name__)

STAGES = ("pool", "suite", "scorer", "embed", "filter", "train", "evaluate")  # each can be stopped after or redone


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


def _recipe_tag(recipe_path: str, what: str) -> str:
    """NAME-HASH of what decides a built pool (the recipe without its suite section) or suite (the whole recipe and
    the suite builder's version): an edited recipe never mixes with an old build, and suite settings alone never
    rebuild the pool."""
    from datafilter.micro.recipe import load_recipe
    from datafilter.micro.suite import SUITE_VERSION

    recipe = load_recipe(recipe_path)
    key = recipe.pool_settings() if what == "pool" else {"recipe": recipe.to_dict(), "suite_version": SUITE_VERSION}
    return f"{recipe.name}-{stable_hash(key, 8)}"


def _built_pool(recipe_path: str, work: Path, workers: int, redo: bool = False) -> Path:
    from datafilter.micro.poolbuild import build_pool
    from datafilter.micro.recipe import load_recipe

    out = work / "pools" / _recipe_tag(recipe_path, "pool")
    if redo:
        shutil.rmtree(out, ignore_errors=True)
    if not (out / "build.json").exists():
        build_pool(load_recipe(recipe_path), out, workers=workers)
    return out


def _built_suite(recipe_path: str, work: Path, pool_dir: Path, workers: int, redo: bool = False) -> Path:
    from datafilter.micro.recipe import load_recipe
    from datafilter.micro.suite import build_suite

    out = work / "suites" / _recipe_tag(recipe_path, "suite")
    if redo:
        shutil.rmtree(out, ignore_errors=True)
    if not (out / "suite.json").exists():
        build_suite(load_recipe(recipe_path), out, pool_dir=pool_dir, workers=workers)
    return out


def paths_for(cfg: BenchConfig, work: Path) -> BenchPaths:
    pool = Path(cfg.pool) if cfg.pool else None
    suite = Path(cfg.suite) if cfg.suite else None
    if pool is None or suite is None:
        pool = pool or work / "pools" / _recipe_tag(cfg.recipe, "pool")
        suite = suite or work / "suites" / _recipe_tag(cfg.recipe, "suite")
    return BenchPaths(work, pool, suite, work / "bench" / cfg.name)


def _scorer_spec(cfg: BenchConfig, work: Path, suite: Path, workers: int, threads: int | None, redo: bool = False):
    from datafilter.models import ModelSpec

    if cfg.embed_model:
        return ModelSpec(cfg.embed_model, pretrained=cfg.embed_pretrained, checkpoint=cfg.embed_checkpoint)
    from datafilter.train.scorer import scorer_config, train_scorer, use_release

    recipe = scorer_config(samples_seen=cfg.scorer_samples_seen)
    info = None
    if cfg.scorer_release and not redo:  # the released scorer stands in for the one the recipe would train
        info = use_release(cfg.scorer_release, cfg.scorer_recipe, recipe, suite)
    if info is None:
        clean = _built_pool(cfg.scorer_recipe, work, workers)
        info = train_scorer(clean, suite, recipe, threads=threads, retrain=redo)
    return ModelSpec(info["model"], checkpoint=str(Path(info["path"]) / info["checkpoint"]))


def expand_params(params: dict[str, Any], **dirs: Path) -> dict[str, Any]:
    """Filter parameters with ``{pool}`` and ``{suite}`` replaced by the benchmark's folders, so a config can name
    a file the suite provides (e.g. the text-based filter's class names) without knowing where the suite was built."""
    def expand(value: Any) -> Any:
        if isinstance(value, str):
            for name, folder in dirs.items():
                value = value.replace("{" + name + "}", str(folder))
        return value

    return {k: expand(v) for k, v in params.items()}


def _filter(entry: FilterEntry, pool: Path, suite: Path, space: str, out: Path, redo: bool = False
            ) -> dict[str, Any]:
    """Run one filter unless this config already made its subset (same filter version and code, parameters,
    embeddings and reference sets, which come from the suite)."""
    from datafilter.filters.harness import filter_pool
    from datafilter.filters.subset import load_subset

    from datafilter.filters.registry import filter_class

    from datafilter.filters.fingerprint import plugin_code_hash

    cls, _ = filter_class(entry.name)
    # The plugin's code is part of the request: an edited filter is rerun even if its author kept its version.
    request = {"filter": entry.name, "version": cls.version, "code": plugin_code_hash(cls), "params": entry.params,
               "space": space, "pool": str(pool), "suite": str(suite)}
    request_path = out.with_suffix(".request.json")
    if not redo and out.exists() and request_path.exists() and read_json(request_path) == request:
        return load_subset(out)[1]
    request_path.unlink(missing_ok=True)  # a kill while the subset is replaced must not leave the old request
    filter_pool(entry.name, pool, out, params=expand_params(entry.params, pool=pool, suite=suite), space=space)
    write_json(request_path, request)
    return load_subset(out)[1]


def run_bench(cfg: BenchConfig, work: str | Path = "work", *, workers: int = 2, threads: int | None = None,
              parallel: int = 0, stop_after: str | None = None, redo: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run (or resume) every stage of ``cfg``; return a summary with the paths of what it wrote.

    ``redo``: stages to do again although their cached output is current (``STAGES``): a pool or suite built
    from a recipe is rebuilt, the scorer retrained, the pool embedded again, the filters rerun, this benchmark's
    training runs trained again from scratch (``train``) or only evaluated again (``evaluate``).

    ``workers``: processes for building and decoding; ``threads``: torch threads per training run; ``parallel``:
    training runs side by side (0: one one-thread run per free core, unless ``threads`` is given; see
    ``datafilter.bench.runs``).
    """
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGES)}")
    from datafilter.bench.validate import check_bench_config
    from datafilter.micro import sources

    check_bench_config(cfg)  # every problem of the config now, not when its stage comes
    bad = sorted(set(redo) - set(STAGES))
    if bad:
        raise ValueError(f"cannot redo {', '.join(bad)}; stages: {', '.join(STAGES)}")
    for stage, given in (("pool", cfg.pool), ("suite", cfg.suite), ("scorer", cfg.embed_model)):
        if stage in redo and given:
            raise ValueError(f"--redo {stage}: this config gives its {stage} ({given}), there is nothing to rebuild")

    t0 = time.time()
    progress = BenchProgress(cfg.name, ("sources", *STAGES[:-2], "train + evaluate"))
    work = Path(work)
    paths = paths_for(cfg, work)
    paths.bench.mkdir(parents=True, exist_ok=True)
    write_json(paths.bench / "config.json", {"config": _config_json(cfg), "work": str(work)})
    summary: dict[str, Any] = {"name": cfg.name, "bench_dir": str(paths.bench)}

    def done(stage: str) -> bool:
        return stop_after == stage

    if cfg.recipe or cfg.scorer_recipe:
        progress.stage("sources")
        report = sources.install()
        if report.failed_required:
            raise RuntimeError("required sources are missing; `datafilter sources status` lists them and what "
                               "they feed")

    progress.stage("pool")
    pool_dir = paths.pool if cfg.pool else _built_pool(cfg.recipe, work, workers, redo="pool" in redo)
    summary["pool"] = str(pool_dir)
    if done("pool"):
        return summary
    progress.stage("suite")
    suite_dir = paths.suite if cfg.suite else _built_suite(cfg.recipe, work, pool_dir, workers,
                                                           redo="suite" in redo)
    summary["suite"] = str(suite_dir)
    if done("suite"):
        return summary

    progress.stage("scorer")
    spec = _scorer_spec(cfg, work, suite_dir, workers, threads, redo="scorer" in redo)
    summary["scorer"] = {"model": spec.name, "checkpoint": spec.checkpoint, "pretrained": spec.pretrained}
    if done("scorer"):
        return summary

    progress.stage("embed")
    from datafilter.embed.pipeline import embed_pool
    from datafilter.embed.reference import embed_reference_sets
    from datafilter.models import load_model, pick_device

    model = load_model(spec, device=pick_device())
    if "embed" in redo:
        from datafilter.embed.pipeline import default_space

        shutil.rmtree(Path(pool_dir) / "embeddings" / default_space(model.name, model.checkpoint_id),
                      ignore_errors=True)
    space = embed_pool(pool_dir, model).space
    embed_reference_sets(pool_dir, model, suite_dir, space=space)
    del model
    summary["space"] = space
    if done("embed"):
        return summary

    progress.stage("filter")
    from datafilter.filters.report import subset_report

    subsets: dict[str, dict[str, Any]] = {}
    for entry in cfg.filters:
        out = paths.subset(entry)
        meta = _filter(entry, pool_dir, suite_dir, space, out, redo="filter" in redo)
        report, _ = subset_report(out, pool_dir=pool_dir, plot=False)
        subsets[entry.label] = {"path": str(out), "kept": int(meta["kept"]), "noise": report.get("noise")}
    write_json(paths.bench / "filters.json", subsets)
    summary["subsets"] = subsets
    print(format_filter_table(subsets))
    if done("filter") or not cfg.train:
        return summary

    progress.stage("train + evaluate")
    from datafilter.bench.runs import RunJob, finished_row, plan_parallel, run_all
    from datafilter.evaluate.suite import load_suite
    from datafilter.pool import Pool
    from datafilter.train.config import scale_config

    suite = load_suite(suite_dir)
    pool_id = Pool(pool_dir).pool_id
    table = published_table(cfg.published) if cfg.published else None
    side_by_side, per_run = plan_parallel(parallel, threads, len(cfg.filters) * len(cfg.seeds))
    jobs = []
    for entry in cfg.filters:
        subset = subsets[entry.label]["path"]
        pub = asdict(table.row(entry.published)) if table is not None and entry.published else None
        for seed in cfg.seeds:
            train_cfg = scale_config(cfg.scale, seed=seed, samples_seen=cfg.samples_seen)
            run_dir = paths.run(entry, seed, stable_hash([sha256_file(subset), train_cfg.recipe(), pool_id], 8))
            jobs.append(RunJob(entry.label, seed, subsets[entry.label]["kept"], subset, str(run_dir), train_cfg,
                               str(pool_dir), str(suite_dir), per_run, pub,
                               decoded_cache=str(work / "cache" / "eval")))
    for job in jobs:
        if "train" in redo:  # asked for: this benchmark's finished runs are trained again from scratch
            shutil.rmtree(job.run_dir, ignore_errors=True)
        elif "evaluate" in redo:
            (Path(job.run_dir) / "eval.json").unlink(missing_ok=True)
    if any(finished_row(job, suite.suite_id) is None for job in jobs):
        from datafilter.train.loop import prepare_data

        prepare_data(pool_dir, jobs[0].train_cfg, workers)  # once, with every core, before runs side by side
    progress.start_runs(len(jobs), side_by_side)
    log.info("%d training runs (%d filters x %d seeds), %d at a time with %s thread(s) each", len(jobs),
             len(cfg.filters), len(cfg.seeds), side_by_side, per_run or "all free")
    rows = run_all(jobs, suite.suite_id, parallel=side_by_side, train_only=done("train"),
                   on_done=lambda job, row, seconds: progress.run_finished(job.label, job.seed, seconds))
    if done("train"):
        return summary
    from datafilter.bench.table import write_tables

    summary["tables"] = write_tables(rows, paths.bench, title=f"{cfg.name}: {cfg.scale} scale, "
                                     f"{scale_config(cfg.scale, samples_seen=cfg.samples_seen).samples_seen:,} "
                                     f"samples seen", coverage=rows[0]["coverage"] if rows else None, published=table)
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
