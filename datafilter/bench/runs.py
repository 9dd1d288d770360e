"""The train-and-evaluate runs of a benchmark, one per (filter, seed), run one after another or side by side.

Every run is independent (its own folder, its own seed), so on a machine with several cores a few runs can go at
once, each with fewer threads. For the tiny CPU models small matrix products leave threads idle, so two one-thread
runs finish sooner than the same two runs one after the other with two threads each
(``benchmarks/bench_parallel_runs.py`` measures it); the default, ``parallel=0``, therefore runs one one-thread run
per free core. A run is a pure function of its inputs, so results do not depend on how runs were scheduled (up to
float summation order across thread counts).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from datafilter.common.files import read_json
from datafilter.common.launch import free_cores
from datafilter.evaluate.suite import results_current

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunJob:
    """Everything one run needs, picklable so that it can go to a worker process."""

    label: str
    seed: int
    size: int
    subset: str
    run_dir: str
    train_cfg: Any  # datafilter.train.config.TrainConfig
    pool_dir: str
    suite_dir: str
    threads: int | None
    published: dict[str, Any] | None = None
    decoded_cache: str | None = None  # where the suite's tasks are kept decoded: every run evaluates the same suite


def finished_row(job: RunJob, suite_id: str) -> dict[str, Any] | None:
    """The job's table row if its run and evaluation are already complete for this suite, else None."""
    train_done = Path(job.run_dir) / "train.json"
    eval_path = Path(job.run_dir) / "eval.json"
    if not (train_done.exists() and eval_path.exists()):
        return None
    results = read_json(eval_path)
    if not results_current(results, read_json(train_done).get("checkpoint_sha256"), suite_id):
        return None
    return _row(job, results)


def _row(job: RunJob, results: dict[str, Any]) -> dict[str, Any]:
    if results.get("failed"):
        log.warning("%s (seed %d): %d task(s) could not be scored and are left out of its averages: %s", job.label,
                    job.seed, len(results["failed"]), "; ".join(results["failed"].values()))
    return {"filter": job.label, "seed": job.seed, "size": job.size, "groups": results["groups"],
            "tasks": {k: v["main"] for k, v in results["tasks"].items()}, "coverage": results.get("coverage"),
            "failed": results.get("failed") or {}, "published": job.published}


def train_and_evaluate(job: RunJob, train_only: bool = False) -> tuple[dict[str, Any] | None, float]:
    """Train (or resume) one run, then evaluate it unless its evaluation is current; returns (row, seconds)."""
    import torch

    from datafilter.evaluate.decoded import DecodedCache
    from datafilter.evaluate.suite import load_suite
    from datafilter.evaluate.zeroshot import evaluate_suite
    from datafilter.models import ModelSpec, load_model, pick_device
    from datafilter.train.loop import train

    t0 = time.time()
    if job.threads:
        torch.set_num_threads(job.threads)
    result = train(job.pool_dir, job.run_dir, job.train_cfg, subset=job.subset, threads=job.threads)
    if train_only:
        return None, time.time() - t0
    suite = load_suite(job.suite_dir)
    eval_path = Path(job.run_dir) / "eval.json"
    results = read_json(eval_path) if eval_path.exists() else None
    if not results_current(results, result.checkpoint_sha256, suite.suite_id):
        trained = load_model(ModelSpec(job.train_cfg.model, checkpoint=str(result.checkpoint)), device=pick_device())
        # A one-thread run beside others decodes in its own process: decoding workers would only compete for the
        # cores the other runs use.
        cache = DecodedCache(job.decoded_cache) if job.decoded_cache else None
        results = evaluate_suite(trained, suite, out=eval_path, checkpoint=result.checkpoint,
                                 workers=0 if job.threads == 1 else None, threads=job.threads, cache=cache)
    return _row(job, results), time.time() - t0


def _worker_init(level: int) -> None:
    """Runs side by side print nothing of their own but warnings: the benchmark's progress line speaks for them."""
    os.environ["TQDM_DISABLE"] = "1"
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("datafilter").setLevel(max(level, logging.WARNING))


def plan_parallel(parallel: int, threads: int | None, runs: int) -> tuple[int, int | None]:
    """(runs side by side, torch threads per run): ``parallel=0`` is one one-thread run per free core; an explicit
    ``threads`` above 1 alone keeps one run at a time with that many threads."""
    if parallel == 0:
        if threads and threads > 1:
            return 1, threads
        parallel, threads = free_cores(), 1
    return max(1, min(parallel, runs)), threads


def run_all(jobs: Sequence[RunJob], suite_id: str, *, parallel: int = 1,
            on_done: Callable[[RunJob, dict[str, Any] | None, float | None], None] | None = None,
            train_only: bool = False) -> list[dict[str, Any]]:
    """Run every job (finished ones are only read back) and return the rows in job order.

    ``on_done(job, row, seconds)`` is called as each job completes (``seconds`` None for a cached one). A failing
    run stops the benchmark with its error once the runs already under way have finished, so no finished run is
    lost."""
    rows: dict[int, dict[str, Any] | None] = {}
    todo = []
    for i, job in enumerate(jobs):
        row = None if train_only else finished_row(job, suite_id)
        if row is not None:
            rows[i] = row
            if on_done:
                on_done(job, row, None)
        else:
            todo.append(i)
    if parallel <= 1 or len(todo) <= 1:
        for i in todo:
            rows[i], seconds = train_and_evaluate(jobs[i], train_only)
            if on_done:
                on_done(jobs[i], rows[i], seconds)
    else:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        with ProcessPoolExecutor(max_workers=parallel, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(logging.getLogger("datafilter").getEffectiveLevel(),)) as ex:
            futures = {ex.submit(train_and_evaluate, jobs[i], train_only): i for i in todo}
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = futures[fut]
                    if fut.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise RuntimeError(f"run {jobs[i].label!r} (seed {jobs[i].seed}) failed: "
                                           f"{fut.exception()}") from fut.exception()
                    rows[i], seconds = fut.result()
                    if on_done:
                        on_done(jobs[i], rows[i], seconds)
    return [rows[i] for i in range(len(jobs)) if rows[i] is not None]
