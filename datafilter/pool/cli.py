"""``datafilter pool ...`` commands: ingest and info."""

from __future__ import annotations

import argparse

GROUP_HELP = "create and inspect pools (WebDataset shards + parquet metadata)"


def register(commands) -> None:
    p = commands.subcommand("pool", GROUP_HELP, "info", "print a pool's counts: shards, samples, skipped by reason, bytes")
    p.add_argument("pool_dir", help="pool directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    import json

    from datafilter.pool.pool import Pool

    summary = Pool(args.pool_dir).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"pool     {summary['path']}")
    print(f"shards   {summary['shards']}")
    print(f"samples  {summary['samples']:,} written of {summary['input']:,} read")
    print(f"skipped  {summary['skipped_total']:,}")
    for reason, n in summary["skipped"].items():
        print(f"  {reason:<24} {n:,}")
    print(f"bytes    {summary['bytes']:,}")
    return 0
