"""Streaming over many shards: open files per loader worker and the loader's resident memory, step after step.

Writes a synthetic pool of many tiny shards (default 2,000 shards of 8 PNGs), then runs the training data path alone
(``StreamBatches`` in a DataLoader with W workers, the nano scale's augmentation, open_clip's default shuffle buffer
of 5,000 samples) for S steps and samples, every K steps, each worker's open file descriptors and resident memory
(``/proc/PID/fd``, ``VmRSS``) and the main process's. Prints the peak open files per worker and the median resident
memory of the workers over the first and the last thousand steps, and their ratio.

    python benchmarks/bench_train_stream.py                        # 2,000 shards, 3,000 steps of 16, 2 workers
    python benchmarks/bench_train_stream.py --shards 500 --steps 2000
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from datafilter.pool import Pool
from datafilter.train.config import TrainConfig
from datafilter.train.stream import StreamBatches, prepare_source
from datafilter.train.transforms import JitterAugment

from synthetic import make_pool  # benchmarks/ is on sys.path when a benchmark runs as a script


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return sorted(out)


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=8)
    ap.add_argument("--side", type=int, default=16, help="stored image side")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--every", type=int, default=25, help="sample the processes every this many steps")
    ap.add_argument("--window", type=int, default=1000, help="steps compared at the start and the end")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-stream-"))
    try:
        t = time.perf_counter()
        pool = make_pool(tmp / "pool", args.shards * args.shard_size, args.shard_size, args.side)
        print(f"pool: {len(pool.shards):,} shards of {args.shard_size} PNGs of {args.side} px, written in "
              f"{time.perf_counter() - t:.0f}s")
        cfg = TrainConfig()  # open_clip's shuffle buffer sizes
        source = prepare_source(pool, None, None, tmp / "stream")
        augment = JitterAugment(32, (0.5,) * 3, (0.25,) * 3, pad=2, colour=0.1)
        ds = StreamBatches(source, augment=augment, tokenizer=lambda c: torch.zeros(len(c), 16, dtype=torch.long),
                           seed=0, origin=0, rank=0, world_size=1, streams=args.workers, start=0, steps=args.steps,
                           batch_size_at=lambda s: args.batch_size, buffer=cfg.shuffle_buffer,
                           initial=cfg.shuffle_initial)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers, collate_fn=lambda x: x,
                                             prefetch_factor=2)
        samples: list[tuple[int, list[int], list[float], float]] = []
        t = time.perf_counter()
        last = None
        for step, batch in enumerate(loader):
            last = batch
            if step % args.every == 0:
                pids = children(os.getpid())
                samples.append((step, [open_files(p) for p in pids], [rss_mib(p) for p in pids], rss_mib(os.getpid())))
        seconds = time.perf_counter() - t
        draws = last.state["draws"] if last is not None else 0
        first = [s for s in samples if s[0] < args.window]
        end = [s for s in samples if s[0] >= args.steps - args.window]
        med = statistics.median
        rss_first, rss_end = med(sum(s[2]) / len(s[2]) for s in first), med(sum(s[2]) / len(s[2]) for s in end)
        print(f"{args.steps:,} steps of {args.batch_size} in {seconds:.0f}s ({args.steps / seconds:.0f} steps/s) with "
              f"{args.workers} workers; one worker's stream drew {draws:,} shards")
        print(f"open files per worker: peak {max(max(s[1]) for s in samples)}, first sample {samples[0][1]}")
        print(f"worker resident memory (MiB, mean over workers, median over samples): first {args.window} steps "
              f"{rss_first:.1f}, last {args.window} steps {rss_end:.1f}, ratio {rss_end / rss_first:.3f}")
        print(f"main process resident memory (MiB): first {med(s[3] for s in first):.1f}, "
              f"last {med(s[3] for s in end):.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
