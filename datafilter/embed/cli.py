"""``datafilter embed``: image and text embeddings and CLIP scores for a pool (and an evaluation suite's references)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Embed every shard of a pool with an open_clip model and write, per shard and row-aligned with its parquet,
L2-normalised image and text embeddings (float16) and the CLIP score (cosine similarity).

The model is one of:
  --model ViT-B-32 --pretrained openai       open_clip weights by tag (downloads; needs a network)
  --model NAME --checkpoint PATH              a local checkpoint (open_clip or this project's)
  (no --model)                                the project's offline scorer, once trained: one trained for this
                                              pool's micro world if cached, else the newest; it is named, and a
                                              warning says when the pool's captions look unlike its training data.
                                              It knows the micro world only: real data needs an open_clip model.

Resumable: finished shards are skipped. Under torchrun or Slurm, ranks split the shards.
"""


def register(commands) -> None:
    p = commands.command("embed", "embed a pool's images and captions and compute CLIP scores", DESCRIPTION)
    p.add_argument("pool_dir", help="pool directory")
    p.add_argument("--model", help="open_clip model name (default: the project's offline scorer)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pretrained", metavar="TAG", help="open_clip pretrained tag, e.g. openai, laion2b_s34b_b79k")
    src.add_argument("--checkpoint", metavar="PATH", help="local checkpoint for --model (loaded weights-only)")
    p.add_argument("--space", help="embedding space name (default: model name + pretrained tag or checkpoint hash)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (default: 256)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes; 0 decodes in a thread of the main process (default: half the free "
                        "cores, at least 1, at most 8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto, the GPU if any)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="autocast precision (default: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads of the model (default: free cores minus decoders, at least 1)")
    p.add_argument("--reference", metavar="SUITE_DIR",
                   help="also embed the reference sets listed in SUITE_DIR/suite.json into the same space")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_embed)


def _embed(args: argparse.Namespace) -> int:
    from datafilter.common.launch import launch_env
    from datafilter.embed.pipeline import EmbedConfig, default_workers, embed_pool, resolve_spec
    from datafilter.embed.reference import embed_reference_sets
    from datafilter.models import load_model, pick_device
    from datafilter.pool.pool import Pool

    env = launch_env()
    pool = Pool(args.pool_dir)
    spec = resolve_spec(args.model, args.pretrained, args.checkpoint, pool=pool)
    device = pick_device(args.device, env.local_rank)
    workers = args.workers if args.workers is not None else default_workers()
    cfg = EmbedConfig(batch_size=args.batch_size, workers=workers, precision=args.precision,
                      threads=args.threads, progress=not args.no_progress)
    model = load_model(spec, device=device)
    result = embed_pool(pool, model, space=args.space, cfg=cfg, env=env)
    print(f"{result.space}: {len(result.written)} shard(s) embedded, {result.already_done} already done, "
          f"{result.samples:,} samples at {result.samples_per_s:,.0f}/s; invalid: {sum(result.invalid.values()):,} "
          f"{result.invalid or ''}".rstrip())
    if args.reference:
        if env.rank == 0:
            for name, path in embed_reference_sets(pool, model, args.reference, space=result.space, cfg=cfg).items():
                print(f"reference {name}: {path}")
    return 0
