"""Run independent per-shard jobs in a process pool, resumably.

A job is done when its completion marker exists; the job itself writes the marker last, atomically. A rerun (with any
worker count, or as another launch rank) skips finished jobs, so a kill never costs more than the shards in flight.
This mirrors datatrove's executors: the steps know nothing about processes, the executor knows nothing about steps.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from datafilter.common.launch import LaunchEnv, launch_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardJob:
    """One unit of per-shard work. ``marker`` exists exactly when the job's output is complete."""

    shard_id: str
    marker: Path
    payload: Any = None

    @property
    def done(self) -> bool:
        return self.marker.exists()


class ShardJobError(RuntimeError):
    def __init__(self, shard_id: str, cause: BaseException):
        super().__init__(f"shard {shard_id} failed: {type(cause).__name__}: {cause}")
        self.shard_id = shard_id
        self.__cause__ = cause


def _limit_threads(threads: int) -> None:
    # Several workers that each use every core slow each other down badly on small machines.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # torch sizes its thread pool from OMP_NUM_THREADS when imported; importing it here would cost seconds per worker
    # for jobs that never use it (ingest), so only an already imported torch is told directly.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def run_shard_jobs(
    jobs: Sequence[ShardJob],
    fn: Callable[[ShardJob], Any],
    *,
    workers: int = 1,
    desc: str = "shards",
    env: LaunchEnv | None = None,
) -> list[Any]:
    """Run ``fn(job)`` for this rank's unfinished jobs; return their results in job order.

    ``fn`` must be a picklable top-level function when ``workers > 1``. A failing job raises ``ShardJobError`` after
    the jobs already running have finished, so their output is kept.
    """
    env = env or launch_env()
    mine = env.take(list(jobs))
    todo = [j for j in mine if not j.done]
    if len(mine) > len(todo):
        log.info("%s: %d of %d already done, skipping them", desc, len(mine) - len(todo), len(mine))
    results: dict[str, Any] = {}
    bar = tqdm(total=len(todo), desc=desc, unit="shard", **({} if todo else {"disable": True}))
    try:
        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                try:
                    results[job.shard_id] = fn(job)
                except Exception as exc:
                    raise ShardJobError(job.shard_id, exc) from exc
                bar.update(1)
        else:
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_limit_threads,
                                     initargs=(1,)) as pool:
                pending = {pool.submit(fn, job): job for job in todo}
                failure: ShardJobError | None = None
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        job = pending.pop(fut)
                        exc = fut.exception()
                        if exc is not None:
                            if failure is None:
                                failure = ShardJobError(job.shard_id, exc)
                                for other in pending:  # let running jobs finish; drop queued ones
                                    other.cancel()
                            continue
                        results[job.shard_id] = fut.result()
                        bar.update(1)
                    pending = {f: j for f, j in pending.items() if not f.cancelled()}
                if failure is not None:
                    raise failure
    finally:
        bar.close()
    return [results[j.shard_id] for j in todo if j.shard_id in results]
