"""``datafilter train`` (fixed-budget CLIP training) and ``datafilter scorer train|eval|list|release`` (the offline
scorer)."""

from __future__ import annotations

import argparse

from datafilter.train.config import AUGMENTS, DATA_PATHS, PRECISION_ALIASES, PRECISIONS

SCORER_HELP = "the offline scorer: a CLIP trained on a clean pool, used for CLIP scores when no OpenAI CLIP is at hand"


def register(commands) -> None:
    p = commands.command(
        "train", "train a CLIP on a pool or a subset of it, for a fixed number of samples seen",
        description="Train a CLIP on POOL_DIR (or the uids of --subset, repeats meaning up-sampling) with DataComp's\n"
                    "fixed recipe of the chosen scale. Samples are drawn with replacement, so the samples seen are\n"
                    "the same whatever the subset size. DataComp's scales stream the shards as open_clip does; small\n"
                    "pools are decoded into memory once. Resumes from the output's last checkpoint after a kill;\n"
                    "under torchrun or srun (WORLD_SIZE or SLURM_NTASKS > 1) it trains with DDP.")
    p.add_argument("pool_dir", help="pool directory")
    p.add_argument("--subset", help="subset .npy of u8,u8 uids (a repeated uid is drawn more often)")
    p.add_argument("--scale", default="micro", help="row of the scale table: nano, micro, small, medium, large, "
                                                    "xlarge (default: micro)")
    p.add_argument("--model", help="override the scale's model (open_clip name)")
    p.add_argument("--samples-seen", type=int, help="override the scale's samples seen")
    p.add_argument("--batch-size", type=int, help="override the scale's global batch size")
    p.add_argument("--lr", type=float, help="override the scale's learning rate")
    p.add_argument("--warmup", type=int, help="override the scale's warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=(*PRECISIONS, *PRECISION_ALIASES),
                   help="open_clip's names: amp (fp16 autocast, loss scaling), amp_bf16, bf16 and fp16 (weights in "
                        "that type), fp32; default auto: amp on a GPU, fp32 on CPU")
    p.add_argument("--data", choices=DATA_PATHS,
                   help="memory (decode the pool once, draw every batch) or stream (read shards with resampling, "
                        "as open_clip); default: the scale's (auto: memory when the decoded pool fits)")
    p.add_argument("--augment", choices=AUGMENTS, help="override the scale's augmentation (open_clip needs --data "
                                                       "stream)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass: less memory, same result (default: on at "
                        "DataComp's scales, as its train.py)")
    p.add_argument("--fresh-stream", action="store_true",
                   help="resume a streamed run under another number of ranks or --workers with new streams")
    _add_runtime(p)
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, final checkpoint.pt)")
    p.set_defaults(func=_train)

    p = commands.subcommand("scorer", SCORER_HELP, "train", "train (or resume) the scorer on a clean pool and cache it",
                            description="Train datafilter-scorer-vit on a clean pool (official names and tags, no "
                                        "noise) for several\ntimes a micro benchmark's samples seen, and cache it by "
                                        "(pool id, recipe). Without --pool, the\npool is built from "
                                        "pools/scorer.yaml into work/pools/scorer first.")
    p.add_argument("--pool", help="clean pool directory (default: build work/pools/scorer from pools/scorer.yaml)")
    p.add_argument("--suite", help="evaluate the scorer on this suite and store the results with it")
    p.add_argument("--samples-seen", type=int, help="samples seen (default: the scorer recipe's)")
    p.add_argument("--seed", type=int)
    _add_runtime(p)
    p.set_defaults(func=_scorer_train)

    p = commands.subcommand("scorer", SCORER_HELP, "eval", "zero-shot accuracy of a cached scorer, per task, vs chance")
    p.add_argument("--suite", help="evaluate on this suite now (default: print the results stored at training)")
    p.add_argument("--key", help="scorer cache key or a unique prefix (default: the newest)")
    p.set_defaults(func=_scorer_eval)

    p = commands.subcommand("scorer", SCORER_HELP, "list", "list the cached scorers, oldest first")
    p.set_defaults(func=_scorer_list)

    p = commands.subcommand("scorer", SCORER_HELP, "release", "copy a cached scorer into a folder to ship",
                            description="Copy a cached scorer (its weights, recipe and zero-shot results) into OUT, "
                                        "with the clean-pool\nrecipe it was trained from, after checking that the "
                                        "recipe builds its pool. A benchmark config's\nscorer_release then uses it "
                                        "instead of training one (see docs/scorer.md).")
    p.add_argument("out", help="release folder to write (e.g. scorers/micro)")
    p.add_argument("--recipe", required=True, help="the clean-pool recipe the scorer was trained from "
                                                   "(e.g. pools/scorer.yaml)")
    p.add_argument("--key", help="scorer cache key or a unique prefix (default: the newest)")
    p.add_argument("--pool", help="the clean pool built from --recipe (default: the one the scorer records)")
    p.set_defaults(func=_scorer_release)


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="torch threads per rank (default: free cores / local ranks)")
    p.add_argument("--workers", type=int, help="DataLoader workers per rank (default: the scale's; 4 at DataComp's "
                                                "scales). A streamed run reads one stream per worker")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--device", default="auto", help="auto (the rank's GPU if present), cpu, cuda ...")


def _train(args: argparse.Namespace) -> int:
    from datafilter.train.config import scale_config
    from datafilter.train.loop import train

    cfg = scale_config(args.scale, model=args.model, samples_seen=args.samples_seen, batch_size=args.batch_size,
                       lr=args.lr, warmup=args.warmup, seed=args.seed, precision=args.precision, data=args.data,
                       augment=args.augment, grad_checkpointing=args.grad_checkpointing, workers=args.workers,
                       checkpoint_every=args.checkpoint_every)
    result = train(args.pool_dir, args.out, cfg, subset=args.subset, threads=args.threads, device=args.device,
                   fresh_stream=args.fresh_stream)
    print(f"checkpoint  {result.checkpoint}")
    print(f"model       {result.model}")
    print(f"samples     {result.samples_seen:,} in {result.steps:,} steps, final loss {result.final_loss:.4f}")
    return 0


def _scorer_train(args: argparse.Namespace) -> int:
    from datafilter.evaluate import format_results
    from datafilter.train.scorer import default_pool, scorer_config, train_scorer

    cfg = scorer_config(args.samples_seen, args.seed, workers=args.workers, checkpoint_every=args.checkpoint_every)
    pool = args.pool or default_pool()
    info = train_scorer(pool, args.suite, cfg, threads=args.threads, device=args.device)
    print(f"scorer      {info['key']}  ({info['path']})")
    print(f"model       {info['model']}  sha256 {info['checkpoint_sha256'][:16]}")
    print(f"pool        {info['pool']}  ({info['pool_samples']:,} samples, id {info['pool_id']})")
    if info.get("zeroshot"):
        print()
        print(format_results(info["zeroshot"]))
    return 0


def _scorer_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from datafilter.evaluate import format_results
    from datafilter.train.scorer import evaluate_scorer, find_scorer

    info = find_scorer(args.key)
    if args.suite:
        info = {**evaluate_scorer(Path(info["path"]), args.suite), "path": info["path"]}
    if not info.get("zeroshot"):
        raise ValueError(f"scorer {info['key']} has no stored zero-shot results; pass --suite SUITE_DIR")
    print(f"scorer {info['key']} ({info['model']}, trained on pool {info['pool_id']})")
    print(format_results(info["zeroshot"]))
    return 0


def _scorer_list(args: argparse.Namespace) -> int:
    from datafilter.train.scorer import list_scorers, scorer_root

    scorers = list_scorers()
    if not scorers:
        print(f"no scorers in {scorer_root()}")
    for s in scorers:
        avg = (s.get("zeroshot") or {}).get("groups", {}).get("Average")
        print(f"{s['key']}  {s['created']}  {s['model']}  pool {s['pool_id']}  "
              f"{s['config']['samples_seen']:,} samples  average {'-' if avg is None else f'{100 * avg:.2f}%'}")
    return 0


def _scorer_release(args: argparse.Namespace) -> int:
    from datafilter.train.scorer import release_scorer

    info = release_scorer(args.out, args.recipe, key=args.key, pool_dir=args.pool)
    print(f"released scorer {info['key']} ({info['model']}, sha256 {info['checkpoint_sha256'][:16]}) trained from "
          f"{args.recipe} -> {info['path']}")
    return 0
