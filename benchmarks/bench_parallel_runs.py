"""Two training runs side by side with one thread each, or one after the other with two threads each?

A benchmark trains one model per (filter, seed), and the tiny CPU models leave threads idle in their small matrix
products. In one run, alternating for R rounds, on the same synthetic pool of small PNGs:
  (a) sequential: run A, then run B, each a fresh process with ``--threads`` (default: the free cores) threads;
  (b) side by side: runs A and B at once, each a fresh process with one thread;
and prints the wall time of each, the ratio (a)/(b) per round and its median (> 1: side by side is faster). The
processes train exactly as ``datafilter bench`` does (``datafilter.train.loop.train``, the in-memory path).

    python benchmarks/bench_parallel_runs.py                       # datafilter-micro-vit, 16k samples seen
    python benchmarks/bench_parallel_runs.py --samples-seen 32768 --rounds 5
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from synthetic import make_pool  # benchmarks/ is on sys.path when a benchmark runs as a script


def _train(pool: str, out: str, model: str, samples_seen: int, seed: int, threads: int) -> None:
    os.environ["TQDM_DISABLE"] = "1"
    logging.basicConfig(level=logging.WARNING)
    from datafilter.train.config import scale_config
    from datafilter.train.loop import train

    cfg = scale_config("micro", model=model, samples_seen=samples_seen, seed=seed)
    train(pool, out, cfg, threads=threads)


def _wall(specs: list[tuple], together: bool) -> float:
    ctx = mp.get_context("spawn")
    t = time.perf_counter()
    if together:
        procs = [ctx.Process(target=_train, args=s) for s in specs]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            if p.exitcode:
                raise SystemExit(f"a training process failed (exit {p.exitcode})")
    else:
        for s in specs:
            p = ctx.Process(target=_train, args=s)
            p.start()
            p.join()
            if p.exitcode:
                raise SystemExit(f"a training process failed (exit {p.exitcode})")
    return time.perf_counter() - t


def main() -> None:
    from datafilter.common.launch import free_cores

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="datafilter-micro-vit")
    ap.add_argument("--samples", type=int, default=20_000, help="synthetic pool size")
    ap.add_argument("--samples-seen", type=int, default=16_384, help="per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=free_cores(), help="threads of each sequential run")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    os.environ["DATAFILTER_CACHE"] = str(tmp / "cache")  # inherited by the spawned runs: one shared decode cache
    try:
        pool = str(make_pool(tmp / "pool", args.samples, 5000, 40).path)
        _wall([(pool, str(tmp / "warm"), args.model, 256, 0, 1)], together=False)  # decodes the pool once
        print(f"pool: {args.samples} PNGs; model {args.model}; {args.samples_seen:,} samples seen per run; "
              f"sequential runs with {args.threads} thread(s), side-by-side runs with 1; {free_cores()} free cores; "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"{'round':>5} {'sequential s':>13} {'side by side s':>15} {'ratio':>7}")
        ratios, seq_all, par_all = [], [], []
        for r in range(args.rounds):
            runs = lambda tag, threads: [(pool, str(tmp / f"{tag}{r}-{i}"), args.model, args.samples_seen, i,  # noqa: E731
                                          threads) for i in range(2)]
            seq = _wall(runs("seq", args.threads), together=False)
            par = _wall(runs("par", 1), together=True)
            ratios.append(seq / par)
            seq_all.append(seq)
            par_all.append(par)
            print(f"{r:>5} {seq:>13.1f} {par:>15.1f} {seq / par:>7.2f}")
        med = statistics.median
        print(f"median: sequential {med(seq_all):.1f} s, side by side {med(par_all):.1f} s, ratio {med(ratios):.2f} "
              f"(> 1: side by side is faster); load average now {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
