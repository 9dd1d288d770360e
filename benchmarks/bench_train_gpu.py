"""On a GPU: DataComp small's training speed through the real data path, and ``datafilter embed``'s throughput.

In one run (a few minutes on one GPU; it stops well within eight):
  (a) data path: ``datafilter.train.train`` with the small scale's recipe (ViT-B-32, amp, local loss with gathered
      gradients, gradient checkpointing, open_clip's train transform) at its per-GPU batch on 8 GPUs (4096 / 8 = 512),
      streaming a synthetic pool of 224-pixel JPEG shards from disk with W loader workers; steps/s from the run's
      metrics, after its first steps;
  (b) bare loop: the same training step (model, optimiser, loss, amp with its loss scaler, gradient checkpointing)
      on one batch already on the GPU;
  (c) ``datafilter embed`` of the same pool with the ViT-B-32 that (a) trained (a local checkpoint: nothing is
      downloaded): images/s.
Prints (a), (b), their ratio and (c), and writes them as JSON with ``--out``.

    python benchmarks/bench_train_gpu.py --out gpu.json         # on a GPU
    python benchmarks/bench_train_gpu.py --tiny                 # seconds on CPU: the nano model at 32 px
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from datafilter.models import pick_device
from datafilter.train import read_metrics, scale_config, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import bare_steps_per_s, make_pool  # noqa: E402


def embed_images_per_s(pool: Path, model: str, checkpoint: Path, batch: int, workers: int, device: str) -> float:
    """``datafilter embed`` through its command line, in this process; its own samples/s."""
    from datafilter.cli import main as cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(["-q", "embed", str(pool), "--model", model, "--checkpoint", str(checkpoint), "--batch-size",
                    str(batch), "--workers", str(workers), "--device", device, "--space", "bench", "--no-progress"])
    if code:
        raise RuntimeError(f"datafilter embed failed ({code}): {out.getvalue()}")
    found = re.search(r"samples at ([\d,]+)/s", out.getvalue())
    if not found:
        raise RuntimeError(f"no rate in datafilter embed's output: {out.getvalue()!r}")
    return float(found.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run of every part on CPU (nano model)")
    ap.add_argument("--samples", type=int, help="pool size (default 8,192; tiny 128)")
    ap.add_argument("--steps", type=int, help="training steps per measurement (default 60; tiny 8)")
    ap.add_argument("--workers", type=int,
                    help="loader workers (default: the free cores less 2, at most 16; tiny: 0, in the process)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", help="write the numbers here as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    tiny = args.tiny
    device = pick_device("cpu" if tiny else args.device)
    if device.type != "cuda" and not tiny:
        raise SystemExit("no GPU here; run with --tiny for the CPU check of this script")
    samples = args.samples or (128 if tiny else 8192)
    steps = args.steps or (8 if tiny else 60)
    workers = args.workers if args.workers is not None else (
        0 if tiny else max(1, min(16, len(os.sched_getaffinity(0)) - 2)))
    # DataComp small's recipe at its per-GPU batch on 8 GPUs; tiny keeps the recipe with the nano model at 32 px.
    batch = 16 if tiny else 4096 // 8
    log_every = 2 if tiny else 10
    cfg = scale_config("small", batch_size=batch, samples_seen=batch * steps, log_every=log_every,
                       checkpoint_every=10**9, workers=workers, **({"model": "datafilter-nano-vit"} if tiny else {}))
    if tiny:
        cfg = replace(cfg, shuffle_buffer=64, shuffle_initial=16)
    resolved = cfg.resolved(device.type, 0)

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-gpu-"))
    os.environ["DATAFILTER_CACHE"] = str(tmp / "cache")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "model": cfg.model, "per_gpu_batch": batch,
                              "precision": resolved.precision, "workers": workers, "steps": steps}
    try:
        t = time.perf_counter()
        side = 40 if tiny else 224
        pool = make_pool(tmp / "pool", samples, max(1, samples // 8), side).path
        result["pool"] = f"{samples:,} {'PNG' if side <= 64 else 'JPEG'} images of {side} px in 8 shards"
        print(f"{result['device']}: pool of {result['pool']} written in {time.perf_counter() - t:.0f}s; "
              f"{cfg.model}, batch {batch}, {resolved.precision}, {workers} loader workers")

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run = tmp / "run"
        train(pool, run, cfg, device=str(device), threads=None if device.type == "cuda" else 1)
        m = read_metrics(run)
        skip = 1 if len(m) > 2 else 0
        result["data_path_steps_per_s"] = (m[-1]["step"] - m[skip]["step"]) / (m[-1]["seconds"] - m[skip]["seconds"])
        if device.type == "cuda":
            result["data_path_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        result["bare_steps_per_s"] = bare_steps_per_s(resolved, device, max(2, steps - 10))
        if device.type == "cuda":
            result["bare_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["ratio"] = result["data_path_steps_per_s"] / result["bare_steps_per_s"]
        print(f"training steps/s: data path {result['data_path_steps_per_s']:.2f}, bare loop "
              f"{result['bare_steps_per_s']:.2f}, ratio {result['ratio']:.2f} "
              f"({result['data_path_steps_per_s'] * batch:,.0f} samples/s through the data path)")

        # the model the run just trained (ViT-B-32 on a GPU): a local checkpoint, so nothing is downloaded
        result["embed_images_per_s"] = embed_images_per_s(pool, cfg.model, run / "checkpoint.pt", 64 if tiny else 512,
                                                          workers, str(device))
        print(f"datafilter embed, {cfg.model}: {result['embed_images_per_s']:,.0f} images/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
