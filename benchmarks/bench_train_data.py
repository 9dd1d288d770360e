"""Does decoding the pool into memory once pay off? Training batches from memory against batches streamed from tars.

In one run, alternating for R rounds, on the same synthetic pool of small PNGs (the offline pools' kind of image):
  (a) in-memory: ``StepBatches`` over the pool decoded once into a uint8 array (the decode itself is timed apart);
  (b) streamed: ``StepBatches`` reading each drawn sample from its tar by offset and decoding it with PIL;
  (c) the training step alone (forward, loss, backward, AdamW) of the model, on a batch already in memory.
Prints batches/s of each, the ratio (a)/(b) per round and its median, and how much of a training step the data
path costs in each mode (batch time / (batch time + step time)).

    python benchmarks/bench_train_data.py                       # datafilter-micro-vit, 20k samples, batch 256
    python benchmarks/bench_train_data.py --samples 50000 --threads 2
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

from datafilter.models import create_model
from datafilter.train.config import scale_config
from datafilter.train.data import StepBatches, StreamedImages, decoded_pool, subset_rows
from datafilter.train.loop import param_groups

from synthetic import make_pool  # benchmarks/ is on sys.path when a benchmark runs as a script



def batches_per_s(ds: StepBatches, steps: int, first: int) -> float:
    t = time.perf_counter()
    for s in range(first, first + steps):
        ds[s]
    return steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="datafilter-micro-vit")
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--side", type=int, default=40, help="stored image side (the micro pools store 40 px)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8, help="batches per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-data-"))
    os.environ["DATAFILTER_CACHE"] = str(tmp / "cache")
    try:
        pool = make_pool(tmp / "pool", args.samples, 5000, args.side)
        cfg = scale_config("micro", model=args.model, batch_size=args.batch_size,
                           samples_seen=args.batch_size * 10_000)
        model, _, _, tok = create_model(cfg.model)
        size = model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0]
        t = time.perf_counter()
        images, valid = decoded_pool(pool, size, workers=1)
        decode_s = time.perf_counter() - t
        rows = subset_rows(pool, None)
        common = dict(rows=rows, texts=pool.column("text"), tokenizer=tok, seed=0, batch_size_at=cfg.batch_size_at,
                      steps=cfg.steps, rank=0, world_size=1, templates=cfg.caption_templates,
                      jitter_pad=cfg.jitter_pad, colour_jitter=cfg.colour_jitter, mean=model.visual.image_mean,
                      std=model.visual.image_std)
        memory = StepBatches(images=images, valid=valid, **common)
        streamed = StepBatches(images=StreamedImages(pool, size), valid=None, **common)
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
        from open_clip.loss import ClipLoss

        loss_fn = ClipLoss()
        batch = memory[0]

        def train_steps() -> float:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                f = model(batch.images, batch.tokens)
                loss = loss_fn(f[0], f[1], f[2])
                opt.zero_grad()
                loss.backward()
                opt.step()
            return args.steps / (time.perf_counter() - t0)

        print(f"pool: {args.samples} PNGs of {args.side}px; model {cfg.model}; batch {args.batch_size}; "
              f"{args.threads} thread(s); one-off decode into memory: {decode_s:.1f}s "
              f"({args.samples / decode_s:.0f} images/s)")
        print(f"{'round':>5} {'memory b/s':>11} {'streamed b/s':>13} {'train-step b/s':>15} {'memory/streamed':>16}")
        ratios, mem_all, str_all, step_all = [], [], [], []
        for r in range(args.rounds):
            m = batches_per_s(memory, args.steps, 1 + r * args.steps)
            s = batches_per_s(streamed, args.steps, 1 + r * args.steps)
            st = train_steps()
            ratios.append(m / s)
            mem_all.append(m)
            str_all.append(s)
            step_all.append(st)
            print(f"{r:>5} {m:>11.1f} {s:>13.1f} {st:>15.1f} {m / s:>16.1f}")
        med = statistics.median
        step_t = 1 / med(step_all)
        print(f"median: memory {med(mem_all):.1f} b/s, streamed {med(str_all):.1f} b/s, ratio {med(ratios):.1f}x; "
              f"data share of a step: memory {100 * (1 / med(mem_all)) / (1 / med(mem_all) + step_t):.0f}%, "
              f"streamed {100 * (1 / med(str_all)) / (1 / med(str_all) + step_t):.0f}%")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
