"""Is evaluation the bottleneck, and does it stream? Two measurements on synthetic classification tasks.

throughput: in one run, alternating for R rounds,
  (a) the bare forward pass: the image tower on batches of the task's images already preprocessed and in memory
      (on the model's device, same batch size, precision and intra-op threads as the evaluation), normalised;
  (b) the whole ``evaluate_task``: read the tars, decode in workers, image tower, classifier, top-5, metrics;
  (c) the same with the task's decoded copy (``datafilter.evaluate.decoded``, written by a pass before the rounds),
      as every evaluation after a task's first one runs (each run of a benchmark, each checkpoint).
  Prints images/s of each, the ratios (b)/(a) and (c)/(a) per round and their medians (target: >= 0.9), and the
  CPU time ratio of (b): on a machine whose cores are busy with other work, wall-clock throughput follows CPU
  time, and the CPU ratio says how much of the evaluation's CPU goes to the model.
memory: the peak resident memory (main process and decoding workers) of evaluating a task of --memory-samples
  images (default 50,000) against one a tenth of its size, each in a fresh process: streaming keeps the two alike,
  and both far below the task's decoded size.

Models have random weights (speed does not depend on them). Images are noisy discs stored at --image-side (default:
the model's input size; 256 gives DataComp-like JPEGs that the model's transform resizes).

    python benchmarks/bench_eval.py                                   # datafilter-micro-vit on CPU
    python benchmarks/bench_eval.py --skip-memory --model ViT-B-32 --device cuda --samples 50000 \\
        --image-side 256 --classes 1000 --templates 80 --workers 8 --batch-size 256      # an ImageNet-sized task
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthetic import disc_image  # benchmarks/ is on sys.path when a benchmark runs as a script


def write_task(folder: Path, samples: int, classes: int, templates: int, side: int, shard_size: int = 10_000,
               seed: int = 0) -> Path:
    """A classification task in CLIP_benchmark's layout: noisy discs, PNG up to 64 pixels, JPEG above."""
    if (folder / "done").exists():
        return folder
    rng = np.random.default_rng(seed)
    (folder / "test").mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("\n".join(f"class {i}" for i in range(classes)) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text(
        "\n".join(f"a photo number {t} of a {{c}}." for t in range(templates)) + "\n")
    fmt, ext = ("PNG", "png") if side <= 64 else ("JPEG", "jpg")
    shards = -(-samples // shard_size)
    for s in range(shards):
        with tarfile.open(folder / "test" / f"{s}.tar", "w") as tf:
            for i in range(s * shard_size, min(samples, (s + 1) * shard_size)):
                buf = io.BytesIO()
                Image.fromarray(disc_image(rng, side)).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
                for name, data in ((f"s{i:08d}.{ext}", buf.getvalue()), (f"s{i:08d}.cls", str(i % classes).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    (folder / "test" / "nshards.txt").write_text(f"{shards}\n")
    (folder / "done").write_text("")
    return folder


def load_task(folder: Path):
    from datafilter.evaluate.suite import load_suite

    (folder.parent / "suite.json").write_text(json.dumps({"name": "bench", "tasks": [
        {"name": folder.name, "type": "classification", "metric": "acc1", "path": folder.name}]}))
    return load_suite(folder.parent).tasks[0]


def bare_inputs(task, encoder) -> torch.Tensor:
    """Every image of the task preprocessed exactly as the evaluation does, held on the model's device."""
    from datafilter.evaluate.kinds import get_kind
    from datafilter.evaluate.stream import task_batches

    decoder = encoder.decoder(task)
    parts = [b["images"] for b in task_batches(task, get_kind("classification"), decoder, 1024, workers=0)]
    return decoder.normaliser(encoder.device)(torch.cat(parts))


@torch.inference_mode()
def bare_forward(encoder, images: torch.Tensor, batch: int) -> float:
    precision = encoder.precision("classification")[1]
    sync = torch.cuda.synchronize if encoder.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        encoder.images(images[i : i + batch], lambda x: x, precision)
    sync()
    return time.perf_counter() - t0


def throughput(args: argparse.Namespace, root: Path) -> float:
    from datafilter.common.launch import free_cores
    from datafilter.evaluate.decoded import DecodedCache
    from datafilter.evaluate.kinds import Encoder
    from datafilter.evaluate.zeroshot import evaluate_task
    from datafilter.models import ModelSpec, load_model, pick_device

    device = pick_device(args.device)
    model = load_model(ModelSpec(args.model), device=device, seed=0)
    side = args.image_side or model.image_size
    task = load_task(write_task(root / f"tp-{args.samples}-{side}-{args.classes}", args.samples, args.classes,
                                args.templates, side))
    threads = args.threads or max(1, free_cores() - max(1, args.workers))
    if device.type == "cpu":
        torch.set_num_threads(threads)
    encoder = Encoder(model, args.batch_size, args.precision)
    images = bare_inputs(task, encoder)
    bare_forward(encoder, images[: args.batch_size], args.batch_size)  # warm-up
    cache = DecodedCache(root / "decoded")
    evaluate_task(model, task, args.batch_size, args.workers, encoder=encoder, cache=cache)  # warm-up, writes the copy
    n = len(images)
    print(f"\n{args.model}: {n} images of {side}x{side}, {args.classes} classes x {args.templates} templates, batch "
          f"{args.batch_size}, device {device}, precision {encoder.precision('classification')}, {threads} model "
          f"thread(s), {args.workers} decoding worker(s)")
    print(f"{'round':>5} {'bare img/s':>10} {'eval img/s':>10} {'ratio':>6} {'cpu ratio':>9} {'cached img/s':>12} "
          f"{'ratio':>6}")
    ratios, cpu_ratios, cached_ratios = [], [], []
    for r in range(args.rounds):
        c0 = cpu_seconds()
        bare = bare_forward(encoder, images, args.batch_size)
        c1, t0 = cpu_seconds(), time.perf_counter()
        evaluate_task(model, task, args.batch_size, args.workers, encoder=encoder)
        full, c2 = time.perf_counter() - t0, cpu_seconds()
        t0 = time.perf_counter()
        evaluate_task(model, task, args.batch_size, args.workers, encoder=encoder, cache=cache)
        cached = time.perf_counter() - t0
        ratios.append(bare / full)
        cpu_ratios.append((c1 - c0) / (c2 - c1))
        cached_ratios.append(bare / cached)
        print(f"{r:>5} {n / bare:>10,.0f} {n / full:>10,.0f} {ratios[-1]:>6.3f} {cpu_ratios[-1]:>9.3f} "
              f"{n / cached:>12,.0f} {cached_ratios[-1]:>6.3f}")
    median = statistics.median(ratios)
    print(f"median ratio evaluation / bare forward: decoding {median:.3f}, from the decoded copy "
          f"{statistics.median(cached_ratios):.3f} (target >= 0.9); median CPU ratio (decoding) "
          f"{statistics.median(cpu_ratios):.3f}")
    return median


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (decoding workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _peak_child(args: argparse.Namespace, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--measure-one", str(folder), "--model", args.model, "--device", args.device,
           "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_one(args: argparse.Namespace) -> None:
    """Run in a fresh process: evaluate one task, print peak RSS of this process and of its decoding workers."""
    from datafilter.evaluate.zeroshot import evaluate_task
    from datafilter.models import ModelSpec, load_model, pick_device

    logging.disable(logging.WARNING)
    model = load_model(ModelSpec(args.model), device=pick_device(args.device), seed=0)
    task = load_task(Path(args.measure_one))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = evaluate_task(model, task, args.batch_size, args.workers)
    print(json.dumps({"samples": res["num_samples"], "main_before_mb": before / 1024,
                      "main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def memory(args: argparse.Namespace, root: Path) -> None:
    from datafilter.models import ModelSpec, load_model

    side = args.image_side or load_model(ModelSpec(args.model), seed=0).image_size
    big, small = args.memory_samples, args.memory_samples // 10
    print(f"\npeak memory, {args.model}, {side}x{side} images, batch {args.batch_size}, {args.workers} worker(s)")
    print(f"{'images':>8} {'on disk MB':>10} {'decoded MB':>10} {'main MB':>8} {'(at start)':>10} {'worker MB':>9}")
    for n in (small, big):
        folder = write_task(root / f"mem-{n}-{side}", n, args.classes, args.templates, side)
        disk = sum(p.stat().st_size for p in (folder / "test").glob("*.tar")) / 2**20
        m = _peak_child(args, folder)
        print(f"{m['samples']:>8,} {disk:>10,.0f} {n * side * side * 3 / 2**20:>10,.0f} {m['main_mb']:>8,.0f} "
              f"{m['main_before_mb']:>10,.0f} {m['worker_mb']:>9,.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="datafilter-micro-vit")
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--templates", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=1, help="decoding processes")
    p.add_argument("--threads", type=int, default=None, help="model threads on CPU (default: free cores - workers)")
    p.add_argument("--image-side", type=int, default=None, help="stored image side (default: the model's input)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32"))
    p.add_argument("--device", default="auto")
    p.add_argument("--memory-samples", type=int, default=50_000)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--keep", type=Path, default=None, help="write tasks here and keep them (default: a temp dir)")
    p.add_argument("--measure-one", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.measure_one:
        measure_one(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        if not args.skip_throughput:
            throughput(args, root)
        if not args.skip_memory:
            memory(args, root)


if __name__ == "__main__":
    main()
