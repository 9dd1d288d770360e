"""Is the embed pipeline the bottleneck? Its end-to-end throughput against the same model's bare forward pass.

In one run, for each model, alternating for R rounds:
  (a) bare forward: both towers on batches of preprocessed image tensors and tokens already in memory (on the
      model's device), with the same batch size, precision and intra-op threads as the pipeline;
  (b) the full ``embed_pool``: read shards, decode, tokenise (in workers), both towers, write the shard files.
Prints samples/s of each, the ratio (b)/(a) per round and the median ratio. Target: >= 0.9.

Models have random weights (speed does not depend on them); the pool is synthetic shapes stored at ``--image-side``
(default: the model's input size, as in the project's micro pools; pass e.g. 256 for DataComp-like JPEGs).

    python benchmarks/bench_embed.py                                  # datafilter-scorer-vit, datafilter-micro-vit
    python benchmarks/bench_embed.py --models ViT-B-32 --samples 20000 --image-side 256 --workers 8   # on a GPU
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datafilter.common.launch import free_cores
from datafilter.embed.pipeline import EmbedConfig, Embedder, embed_pool
from datafilter.embed.store import EmbeddingStore
from datafilter.models import ModelSpec, load_model, pick_device
from datafilter.pool import ImageConfig, Pool, ShardWriter, make_uid

WORDS = ("red", "green", "blue", "yellow", "square", "circle", "bar", "small", "large", "icon", "photo", "drawing")


def make_pool(path: Path, samples: int, shard_size: int, side: int, seed: int = 0) -> Pool:
    """Synthetic noisy shapes with short captions, written through the real shard writer."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    fmt = "png" if side <= 64 else "jpg"
    yy, xx = np.mgrid[:side, :side]
    for shard in range((samples + shard_size - 1) // shard_size):
        w = ShardWriter(path, shard, ImageConfig(max_side=side, encode_format=fmt, quality=90))
        for i in range(shard * shard_size, min(samples, (shard + 1) * shard_size)):
            arr = rng.integers(0, 256, 3, dtype=np.uint8)[None, None] * np.ones((side, side, 1), np.uint8)
            cy, cx, r = rng.integers(side // 4, 3 * side // 4, 3)
            arr[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = rng.integers(0, 256, 3, dtype=np.uint8)
            arr = np.clip(arr.astype(int) + rng.integers(-10, 11, arr.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "PNG")
            caption = " ".join(rng.choice(WORDS, rng.integers(2, 8)))
            w.add(buf.getvalue(), caption, make_uid("bench", str(seed), str(i)))
        w.close()
    return Pool(path)


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


def bench_model(name: str, args: argparse.Namespace, root: Path) -> float:
    device = pick_device(args.device)
    model = load_model(ModelSpec(name), device=device, seed=0)
    side = args.image_side or model.image_size
    pool = make_pool(root / f"pool-{name}-{side}", args.samples, args.shard_size, side)
    threads = args.threads or max(1, free_cores() - args.workers)
    cfg = EmbedConfig(batch_size=args.batch_size, workers=args.workers, threads=threads, progress=False)
    embedder = Embedder(model, cfg)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    images, tokens = bare_inputs(pool, embedder)
    n = pool.num_samples
    store = EmbeddingStore(pool, "bench")

    def pipeline() -> float:
        shutil.rmtree(store.dir, ignore_errors=True)
        t0 = time.perf_counter()
        embed_pool(pool, model, space="bench", cfg=cfg)
        return time.perf_counter() - t0

    bare_forward(embedder, images[: args.batch_size], tokens[: args.batch_size], args.batch_size)  # warm-up
    pipeline()
    print(f"\n{name}: {n} samples of {side}x{side}, batch {args.batch_size}, device {device}, precision "
          f"{embedder.precision}, {args.workers} decoding worker(s), {threads} model thread(s)")
    print(f"{'round':>5} {'bare samples/s':>15} {'pipeline samples/s':>19} {'ratio':>6}")
    ratios = []
    for r in range(args.rounds):
        bare = n / bare_forward(embedder, images, tokens, args.batch_size)
        piped = n / pipeline()
        ratios.append(piped / bare)
        print(f"{r:>5} {bare:>15,.0f} {piped:>19,.0f} {ratios[-1]:>6.3f}")
    med = statistics.median(ratios)
    print(f"median ratio pipeline / bare forward: {med:.3f} (target >= 0.9)")
    return med


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["datafilter-scorer-vit", "datafilter-micro-vit"])
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=1, help="decoding processes of the pipeline")
    p.add_argument("--threads", type=int, default=None, help="model threads on CPU (default: free cores - workers)")
    p.add_argument("--image-side", type=int, default=None, help="stored image side (default: the model's input)")
    p.add_argument("--device", default="auto")
    p.add_argument("--keep", type=Path, default=None, help="build pools here and keep them (default: a temp dir)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        results = {name: bench_model(name, args, root) for name in args.models}
    print("\nsummary (median ratio): " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
