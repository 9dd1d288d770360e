"""``datafilter pool ...`` commands: ingest and info."""

from __future__ import annotations

import argparse

GROUP_HELP = "create and inspect pools (WebDataset shards + parquet metadata)"

INGEST_DESCRIPTION = """\
Turn raw image-text data into a pool: NNNNNNNN.tar (KEY.jpg, KEY.txt, KEY.json) + NNNNNNNN.parquet + NNNNNNNN_stats.json
per shard, with a stable 128-bit uid per sample.

SOURCE kinds (--kind, guessed when omitted):
  folder  a folder of images with sidecar captions (a.jpg + a.txt, .caption or .json), searched recursively
  table   a CSV/TSV/Parquet/JSONL table with an image path column and a caption column (paths relative to the table)
  shards  an img2dataset/DataComp folder of *.tar shards: validated and indexed in place (or copied to --out)
  urls    a table with a URL column (--url-col): downloaded by img2dataset, then indexed

Images are decoded, checked, downscaled to --max-side (ratio kept, never upscaled) and re-encoded; shards are
indexed without re-encoding. Bad samples are skipped and counted by reason. A killed ingest resumes when rerun with
the same arguments; a rerun with different options into the same --out is refused.

examples:
  datafilter pool ingest photos/ --out work/pools/photos --workers 2
  datafilter pool ingest pairs.csv --image-col file --caption-col alt --out work/pools/pairs
  datafilter pool ingest datacomp_small/shards            # index in place
  datafilter pool ingest urls.parquet --url-col url --caption-col text --out work/pools/web
"""


INFO_DESCRIPTION = """\
Print what a pool holds: shards, samples written of inputs read, skipped by reason, bytes.

Each shard lists its skipped inputs in NNNNNNNN_skipped.jsonl beside its stats (position among the shard's inputs,
the file, tar key or URL, the reason and a detail); --skipped prints them all.

examples:
  datafilter pool info work/pools/photos
  datafilter pool info work/pools/photos --skipped
  datafilter pool info work/pools/photos --skipped --reason undecodable_image --json
"""


def register(commands) -> None:
    p = commands.subcommand("pool", GROUP_HELP, "ingest", "ingest images + captions (folder, table, shards, URLs)",
                            description=INGEST_DESCRIPTION)
    p.add_argument("source", help="folder of images, table file, folder of *.tar shards, or table of URLs")
    p.add_argument("--out", help="pool directory to write (default: work/pools/<source name>; shards: in place)")
    p.add_argument("--kind", choices=("folder", "table", "shards", "urls"),
                   help="source kind (default: shards if SOURCE holds *.tar, folder for other folders, "
                        "urls for a table given --url-col, else table)")
    p.add_argument("--format", dest="table_format", choices=("csv", "tsv", "parquet", "jsonl"),
                   help="table format (default: from the file extension)")
    p.add_argument("--image-col", default="image", help="table column with image paths (default: %(default)s)")
    p.add_argument("--caption-col", default="caption", help="table column with captions (default: %(default)s)")
    p.add_argument("--url-col", help="table column with image URLs; makes a table a URL source")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel shard workers (default: the cores this process may use)")
    p.add_argument("--threads", type=int, default=32,
                   help="download threads per worker, URLs only (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="download timeout in seconds (default: %(default)s)")
    p.add_argument("--max-side", type=int, default=512,
                   help="downscale so the longer side is at most this, keeping the ratio (default: %(default)s)")
    p.add_argument("--encode-format", choices=("jpg", "png", "webp"), default="jpg",
                   help="image format stored in the shards (default: %(default)s)")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default: %(default)s)")
    p.add_argument("--resample", choices=("area", "lanczos", "bicubic"), default="area",
                   help="downscaling filter; area is img2dataset's (DataComp's) and the fastest (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the resulting pool summary as JSON")
    p.set_defaults(func=_ingest)

    p = commands.subcommand("pool", GROUP_HELP, "info", "print a pool's counts: shards, samples, skipped by reason, bytes",
                            description=INFO_DESCRIPTION)
    p.add_argument("pool_dir", help="pool directory")
    p.add_argument("--skipped", action="store_true",
                   help="list every skipped input (shard, position, reason, file or key, detail)")
    p.add_argument("--reason", help="with --skipped: only this reason (e.g. undecodable_image)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_info)


def _ingest(args: argparse.Namespace) -> int:
    from pathlib import Path

    from datafilter.common.launch import free_cores
    from datafilter.pool.images import ImageConfig
    from datafilter.pool.ingest import IngestConfig, detect_kind, ingest

    source = Path(args.source)
    kind = args.kind or detect_kind(source, url_col_given=args.url_col is not None)
    cfg = IngestConfig(
        kind=kind,
        shard_size=args.shard_size,
        workers=args.workers or free_cores(),
        image=ImageConfig(max_side=args.max_side, encode_format=args.encode_format, quality=args.quality,
                          resample=args.resample),
        table_format=args.table_format,
        image_col=args.image_col,
        caption_col=args.caption_col,
        url_col=args.url_col or "url",
        timeout=args.timeout,
        threads=args.threads,
    )
    out = ingest(source, args.out, cfg)
    return _print_summary(out, args.json)


def _info(args: argparse.Namespace) -> int:
    if args.skipped:
        return _print_skipped(args.pool_dir, args.reason, args.json)
    if args.reason:
        raise ValueError("--reason selects entries of the skip list; add --skipped")
    return _print_summary(args.pool_dir, args.json)


def _print_skipped(pool_dir, reason: str | None, as_json: bool) -> int:
    import json

    from datafilter.pool.pool import Pool

    listed, unlisted = Pool(pool_dir).skipped(reason)
    if as_json:
        print(json.dumps({"skipped": listed, "unlisted": unlisted}, indent=2, ensure_ascii=False))
        return 0
    print(f"{'shard':<10} {'#':>6}  {'reason':<26} input")
    for e in listed:
        detail = f"  ({e['detail']})" if e.get("detail") else ""
        print(f"{e['shard']:<10} {e['index']:>6}  {e['reason']:<26} {e.get('input') or '-'}{detail}")
    print(f"{len(listed):,} skipped input(s) listed" + (f" with reason {reason}" if reason else ""))
    if unlisted:
        print(f"note     {unlisted:,} more counted in the stats of shards written without a skip list")
    return 0


def _print_summary(pool_dir, as_json: bool) -> int:
    import json

    from datafilter.pool.pool import Pool

    summary = Pool(pool_dir).summary()
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"pool     {summary['path']}")
    print(f"shards   {summary['shards']}")
    print(f"samples  {summary['samples']:,} written of {summary['input']:,} read")
    print(f"skipped  {summary['skipped_total']:,}")
    for reason, n in summary["skipped"].items():
        print(f"  {reason:<28} {n:,}")
    print(f"bytes    {summary['bytes']:,}")
    if summary["shards_without_stats"]:
        print(f"warning  {len(summary['shards_without_stats'])} shard(s) without stats (incomplete or foreign)")
    return 0
