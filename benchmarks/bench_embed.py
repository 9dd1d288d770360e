"""Is the embed pipeline the bottleneck? Its end-to-end throughput against the same model's bare forward pass.

In one run, for each model, alternating for R rounds:
  (a) bare forward: both towers on batches of preprocessed image tensors and tokens already in memory (on the
      model's device), with the same batch size, precision and intra-op threads as the pipeline;
  (b) the full ``embed_pool``: read shards, decode, tokenise (in workers), both towers, write the shard files.
Prints samples/s of each, the ratio (b)/(a) per round and the median ratio (target: >= 0.9), and the CPU time each
takes: on a machine whose cores are all busy, wall-clock throughput follows CPU time, and the CPU ratio says how much
of the pipeline's CPU goes to the model.

Models have random weights (speed does not depend on them); the pool is synthetic shapes stored at ``--image-side``
(default: the model's input size, as in the project's micro pools; pass e.g. 256 for DataComp-like JPEGs).

    python benchmarks/bench_embed.py                                  # datafilter-scorer-vit, datafilter-micro-vit
    python benchmarks/bench_embed.py --models ViT-B-32 --samples 20000 --image-side 256 --workers 4 8   # on a GPU
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from datafilter.common.launch import free_cores
from datafilter.embed.pipeline import EmbedConfig, Embedder, embed_pool
from datafilter.embed.store import EmbeddingStore
from datafilter.models import ModelSpec, load_model, pick_device
from datafilter.pool import Pool

from synthetic import make_pool  # benchmarks/ is on sys.path when a benchmark runs as a script



def bare_inputs(pool: Pool, embedder: Embedder) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample preprocessed exactly as the pipeline does, held on the model's device."""
    dec, model = embedder.decoder, embedder.model
    images, texts = [], []
    for s in pool.iter_samples():
        images.append(dec(s.image))
        texts.append(s.text)
    x = embedder.normalise(dec.stack(images))
    return x, model.tokenizer(texts).to(embedder.device)


@torch.inference_mode()
def bare_forward(embedder: Embedder, images: torch.Tensor, tokens: torch.Tensor, batch: int) -> float:
    """Seconds for both towers over all inputs (L2-normalised outputs, as the pipeline produces)."""
    model = embedder.model.model
    sync = torch.cuda.synchronize if embedder.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        with embedder.autocast():
            a = model.encode_image(images[i : i + batch])
            b = model.encode_text(tokens[i : i + batch])
        torch.nn.functional.normalize(a.float(), dim=-1)
        torch.nn.functional.normalize(b.float(), dim=-1)
    sync()
    return time.perf_counter() - t0


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (decoding workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``fn()``."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu_seconds() - c0


def bench_model(name: str, args: argparse.Namespace, root: Path) -> dict[int, float]:
    device = pick_device(args.device)
    model = load_model(ModelSpec(name), device=device, seed=0)
    side = args.image_side or model.image_size
    pool = make_pool(root / f"pool-{name}-{side}", args.samples, args.shard_size, side)
    threads = args.threads or max(1, free_cores() - max(1, *args.workers))
    cfgs = {w: EmbedConfig(batch_size=args.batch_size, workers=w, threads=threads, progress=False)
            for w in args.workers}
    embedder = Embedder(model, cfgs[args.workers[0]])
    if device.type == "cpu":
        torch.set_num_threads(threads)
    images, tokens = bare_inputs(pool, embedder)
    n = pool.num_samples
    store = EmbeddingStore(pool, "bench")

    def pipeline(cfg: EmbedConfig) -> None:
        shutil.rmtree(store.dir, ignore_errors=True)
        embed_pool(pool, model, space="bench", cfg=cfg)

    def bare() -> None:
        bare_forward(embedder, images, tokens, args.batch_size)

    bare_forward(embedder, images[: args.batch_size], tokens[: args.batch_size], args.batch_size)  # warm-up
    for cfg in cfgs.values():
        pipeline(cfg)
    print(f"\n{name}: {n} samples of {side}x{side}, batch {args.batch_size}, device {device}, precision "
          f"{embedder.precision}, {threads} model thread(s); pipeline with {' / '.join(map(str, cfgs))} decoding "
          f"worker(s) (0: a decoding thread)")
    print("wall: samples/s; cpu: CPU ms per 1,000 samples (all threads and worker processes); ratio = pipeline / bare "
          "in samples/s, cpu ratio = bare CPU / pipeline CPU")
    print(f"{'round':>5} {'workers':>7} {'bare/s':>8} {'pipeline/s':>10} {'ratio':>6} {'bare cpu':>9} "
          f"{'pipe cpu':>9} {'cpu ratio':>9}")
    ratios: dict[int, list[float]] = {w: [] for w in cfgs}
    cpu_ratios: dict[int, list[float]] = {w: [] for w in cfgs}
    for r in range(args.rounds):
        for w, cfg in cfgs.items():
            bare_wall, bare_cpu = timed(bare)
            pipe_wall, pipe_cpu = timed(lambda: pipeline(cfg))
            ratios[w].append(bare_wall / pipe_wall)
            cpu_ratios[w].append(bare_cpu / pipe_cpu)
            print(f"{r:>5} {w:>7} {n / bare_wall:>8,.0f} {n / pipe_wall:>10,.0f} {ratios[w][-1]:>6.3f} "
                  f"{bare_cpu / n * 1e6:>9,.0f} {pipe_cpu / n * 1e6:>9,.0f} {cpu_ratios[w][-1]:>9.3f}")
    out = {}
    for w in cfgs:
        out[w] = statistics.median(ratios[w])
        print(f"median ratio pipeline / bare forward, {w} worker(s): {out[w]:.3f} (target >= 0.9); "
              f"median CPU ratio {statistics.median(cpu_ratios[w]):.3f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["datafilter-scorer-vit", "datafilter-micro-vit"])
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--shard-size", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1],
                   help="decoding processes of the pipeline; several values are measured side by side")
    p.add_argument("--threads", type=int, default=None, help="model threads on CPU (default: free cores - workers)")
    p.add_argument("--image-side", type=int, default=None, help="stored image side (default: the model's input)")
    p.add_argument("--device", default="auto")
    p.add_argument("--keep", type=Path, default=None, help="build pools here and keep them (default: a temp dir)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        results = {name: bench_model(name, args, root) for name in args.models}
    print("\nsummary (median ratio): " + "; ".join(f"{k} " + ", ".join(f"{w} worker(s) {r:.3f}" for w, r in v.items())
                                                for k, v in results.items()))


if __name__ == "__main__":
    main()
