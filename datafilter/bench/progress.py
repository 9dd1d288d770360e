"""One progress line for a whole benchmark: which stage, which run of how many, and how long the rest will take.

Stages log their own detail (a pool build's shards, a training run's steps); this line is the one a user watches
to know where the benchmark as a whole stands. The estimate for the remaining runs is the mean wall time of the runs
finished in this process divided by the number running side by side; runs reused from the cache take no time and
do not count.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

log = logging.getLogger("datafilter.bench")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class BenchProgress:
    def __init__(self, name: str, stages: Sequence[str]):
        self.name = name
        self.stages = list(stages)
        self.t0 = time.time()
        self.runs_total = 0
        self.runs_done = 0
        self.run_seconds: list[float] = []
        self.parallel = 1

    def line(self, text: str) -> str:
        return f"bench {self.name} · {text} · {_clock(time.time() - self.t0)} elapsed"

    def stage(self, stage: str) -> None:
        i = self.stages.index(stage) + 1 if stage in self.stages else 0
        log.info(self.line(f"stage {i}/{len(self.stages)}: {stage}"))

    def start_runs(self, total: int, parallel: int) -> None:
        self.runs_total, self.runs_done, self.parallel = total, 0, max(1, parallel)

    def eta(self) -> str:
        left = self.runs_total - self.runs_done
        if left <= 0:
            return "done"
        if not self.run_seconds:
            return "ETA after the first run"
        per = sum(self.run_seconds) / len(self.run_seconds)
        return f"ETA {_clock(per * -(-left // self.parallel))}"

    def run_finished(self, label: str, seed: int, seconds: float | None) -> None:
        """``seconds`` is None for a run found finished in the cache."""
        self.runs_done += 1
        if seconds is not None:
            self.run_seconds.append(seconds)
        how = "cached" if seconds is None else f"{_clock(seconds)}"
        log.info(self.line(f"run {self.runs_done} of {self.runs_total} done: {label}, seed {seed} ({how}) · "
                           f"{self.eta()}"))
