"""``datafilter evaluate``: zero-shot evaluation of one checkpoint on a suite."""

from __future__ import annotations

import argparse


def register(commands) -> None:
    p = commands.command(
        "evaluate", "zero-shot evaluation of a model on a suite (classification and retrieval tasks)",
        description="Evaluate a model zero-shot on every task of SUITE_DIR/suite.json (CLIP_benchmark layout) and\n"
                    "write per-task metrics and DataComp's group averages to --out. A killed run resumes at the\n"
                    "first unfinished task.")
    p.add_argument("--model", required=True, help="open_clip model name, e.g. datafilter-micro-vit or ViT-B-32")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="checkpoint file (datafilter or open_clip format; read weights-only)")
    src.add_argument("--pretrained", help="open_clip pretrained tag (downloads; needs internet)")
    p.add_argument("--suite", required=True, help="suite folder with suite.json")
    p.add_argument("--out", required=True, help="results JSON to write")
    p.add_argument("--tasks", nargs="+", help="evaluate only these tasks")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1 ...")
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from datafilter.evaluate.suite import load_suite
    from datafilter.evaluate.zeroshot import evaluate_suite, format_results
    from datafilter.models import ModelSpec, load_model, pick_device

    if not args.checkpoint and not args.pretrained:
        raise ValueError("give --checkpoint PATH (or --pretrained TAG); a model with random weights is not evaluated")
    suite = load_suite(args.suite)
    model = load_model(ModelSpec(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint),
                       device=pick_device(args.device))
    results = evaluate_suite(model, suite, batch_size=args.batch_size, out=args.out, tasks=args.tasks,
                             checkpoint=args.checkpoint)
    print(format_results(results))
    print(f"\nwrote {args.out}")
    return 0
