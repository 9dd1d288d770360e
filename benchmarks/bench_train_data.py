"""Does the training data path keep the model busy? The real training loop, fed from tars, against a bare loop.

At the micro scale on CPU, alternating for R rounds in one run, on one synthetic pool of 40-pixel PNGs (the kind of
image the offline pools hold):
  (a) streamed: ``datafilter.train.train`` with ``data="stream"`` and one loader worker: shards drawn with
      replacement and read in order, samples shuffled, decoded and augmented in the worker, the training step in the
      main process (one thread);
  (b) in memory: the same run with ``data="memory"`` (the pool decoded once into memory; the decode is not timed);
  (c) bare: the training step alone (forward, loss, backward, AdamW, logit-scale clamp) on a batch already in
      memory, with the same model, optimiser and loss.
Steps/s of (a) and (b) come from the runs' own metrics (the ``seconds`` of each logged step), leaving out the first
steps (loader start-up, shuffle-buffer fill); the order of the three alternates from round to round. Prints every
round and the medians of (a)/(c) and (b)/(c), and the share of (a)'s time its loop waited for the loader: what is
left of the gap is the loader worker's CPU taken from a machine with no core to spare.

    python benchmarks/bench_train_data.py                       # datafilter-micro-vit, batch 256
    python benchmarks/bench_train_data.py --steps 40 --rounds 5
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from datafilter.train import read_metrics, scale_config, train

from synthetic import bare_steps_per_s, make_pool  # benchmarks/ is on sys.path when a benchmark runs as a script


def run_steps_per_s(pool: Path, run: Path, cfg, skip: int) -> tuple[float, float]:
    """Steps/s of a real training run, from its metrics, over the steps after the first ``skip``, and the share of
    that time the loop waited for its loader."""
    train(pool, run, cfg, threads=1, device="cpu")
    m = read_metrics(run)
    seconds = m[-1]["seconds"] - m[skip]["seconds"]
    return (m[-1]["step"] - m[skip]["step"]) / seconds, (m[-1]["data_seconds"] - m[skip]["data_seconds"]) / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20_000, help="pool size")
    ap.add_argument("--shard-size", type=int, default=2_000)
    ap.add_argument("--side", type=int, default=40, help="stored image side (the micro pools store 40 px)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="training steps per run")
    ap.add_argument("--skip", type=int, default=4, help="first steps left out of each rate")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-data-"))
    os.environ["DATAFILTER_CACHE"] = str(tmp / "cache")
    try:
        pool = make_pool(tmp / "pool", args.samples, args.shard_size, args.side).path
        base = scale_config("micro", batch_size=args.batch_size, samples_seen=args.batch_size * args.steps,
                            log_every=1, checkpoint_every=10**9, decode_workers=1)
        streamed, memory = replace(base, data="stream", workers=1), replace(base, data="memory")
        print(f"pool: {args.samples:,} PNGs of {args.side} px in shards of {args.shard_size:,}; {base.model}, batch "
              f"{args.batch_size}; training on 1 thread, streamed with 1 loader worker; steps/s over steps "
              f"{args.skip}..{args.steps - 1} of each run; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
        print(f"{'round':>5} {'streamed':>9} {'memory':>7} {'bare':>7} {'streamed/bare':>14} {'memory/bare':>12} "
              f"{'data wait':>11}")
        rows = []
        for r in range(args.rounds):
            # the order alternates, so that a change in the machine's load does not always hit the same one
            order = ("stream", "memory", "bare") if r % 2 == 0 else ("bare", "memory", "stream")
            rates, waits = {}, {}
            for what in order:
                if what == "bare":
                    rates[what] = bare_steps_per_s(base.resolved("cpu", 0), torch.device("cpu"), args.steps - args.skip)
                else:
                    rates[what], waits[what] = run_steps_per_s(pool, tmp / f"{what}-{r}",
                                                               streamed if what == "stream" else memory, args.skip)
            a, b, c = rates["stream"], rates["memory"], rates["bare"]
            rows.append((a, b, c, waits["stream"]))
            print(f"{r:>5} {a:>9.2f} {b:>7.2f} {c:>7.2f} {a / c:>14.2f} {b / c:>12.2f} {100 * waits['stream']:>10.1f}%")
        med = statistics.median
        print(f"median steps/s: streamed {med(r[0] for r in rows):.2f}, memory {med(r[1] for r in rows):.2f}, "
              f"bare {med(r[2] for r in rows):.2f}; ratio streamed/bare {med(r[0] / r[2] for r in rows):.2f}, "
              f"memory/bare {med(r[1] / r[2] for r in rows):.2f}; the streamed loop waited for data "
              f"{100 * med(r[3] for r in rows):.1f}% of its time; load now {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
