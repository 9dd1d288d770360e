"""``datafilter filters list|show|report`` and ``datafilter filter NAME POOL_DIR``."""

from __future__ import annotations

import argparse

GROUP_HELP = "list the registered filters, show their parameters, report on subsets"


def register(commands) -> None:
    p = commands.subcommand("filters", GROUP_HELP, "list", "list registered filters (built-ins and plugins)")
    p.set_defaults(func=_list)

    p = commands.subcommand("filters", GROUP_HELP, "show", "show a filter's description, needs and parameters")
    p.add_argument("name")
    p.set_defaults(func=_show)

    p = commands.subcommand(
        "filters", GROUP_HELP, "report",
        "counts per reason, overlap with other subsets, and precision/recall of removed noise (ground truth)")
    p.add_argument("subset", help="subset .npy (with its .json sidecar)")
    p.add_argument("--pool", help="pool directory (default: the sidecar's)")
    p.add_argument("--compare", nargs="*", default=[], metavar="SUBSET", help="other subsets for Jaccard overlap")
    p.add_argument("--out", help="report JSON (default: SUBSET.report.json); a PNG plot is written beside it")
    p.set_defaults(func=_report)

    p = commands.command("filter", "run one filter on a pool and write the subset (.npy + .json sidecar)",
                         description="Run one filter on a pool. Parameters: --param key=value (typed by the "
                                     "filter's config; see `datafilter filters show NAME`) or --config file.yaml.")
    p.add_argument("name", help="filter name (see `datafilter filters list`)")
    p.add_argument("pool_dir", help="pool directory")
    p.add_argument("--out", help="subset file (default: work/subsets/POOL/NAME.npy)")
    p.add_argument("--space", help="embedding space (default: the pool's only one)")
    p.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--config", help="YAML file with parameters (--param values override it)")
    p.add_argument("--reference", action="append", default=[], metavar="NAME=PATH.npy",
                   help="an extra reference set of embeddings")
    p.add_argument("--datacomp", choices=("b32", "l14"), metavar="MODEL",
                   help="POOL_DIR is DataComp's released metadata (parquet + npz); use its b32 or l14 embeddings")
    p.add_argument("--arrays", metavar="DIR",
                   help="with --datacomp: where `datafilter datacomp unpack` wrote the arrays (default: POOL_DIR)")
    p.add_argument("--workdir", metavar="DIR",
                   help="where filters keep resumable working files, e.g. D²'s kNN graph (default: work/cache/filters)")
    p.set_defaults(func=_filter)

    p = commands.subcommand(
        "datacomp", "DataComp's released metadata", "unpack",
        "unpack DataComp's compressed .npz embeddings once into memory-mappable .npy files (resumable)",
        description="Write each shard's arrays of MODEL (l14_img, l14_txt or b32_...) as NNNNNNNN_l14_img.npy beside "
                    "the metadata (or in --out). Only needed for compressed .npz files: uncompressed members are "
                    "memory-mapped where they are. Finished files are kept: a killed run resumes; the free disk "
                    "space is checked first.")
    p.add_argument("metadata_dir", help="folder of NNNNNNNN.parquet + NNNNNNNN.npz")
    p.add_argument("--model", choices=("b32", "l14"), default="l14", help="embeddings to unpack (default: l14)")
    p.add_argument("--kinds", nargs="+", choices=("img", "txt"), default=["img", "txt"],
                   help="image and/or text arrays (default: both)")
    p.add_argument("--out", metavar="DIR", help="where to write (default: the metadata folder)")
    p.set_defaults(func=_unpack)


def _list(args: argparse.Namespace) -> int:
    from datafilter.filters.registry import available, filter_class

    rows = []
    for name, ep in available().items():
        try:
            cls, _ = filter_class(name)
            rows.append((name, f"v{cls.version}", cls.description or "(no description)"))
        except Exception as exc:  # a broken plugin must not hide the others
            rows.append((name, "?", f"(failed to load {ep.value}: {exc})"))
    width = max((len(r[0]) for r in rows), default=4)
    for name, version, desc in rows:
        print(f"{name:<{width}}  {version:<4} {desc}")
    return 0


def _show(args: argparse.Namespace) -> int:
    import dataclasses
    import typing

    from datafilter.filters.registry import filter_class

    cls, where = filter_class(args.name)
    print(f"{cls.name} v{cls.version} ({where})\n  {cls.description}")
    hints = typing.get_type_hints(cls.Config)
    fields = dataclasses.fields(cls.Config)
    unset = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    # with defaults for every field, the needs are those of the default config; otherwise as declared ({field})
    needs = cls().required() if not unset else cls.needs
    print(f"needs: {', '.join(needs) or 'nothing'}")
    if fields:
        print("parameters:")
    for f in fields:
        tp = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        if f.name in unset:
            print(f"  {f.name} ({tp}), required")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            print(f"  {f.name} ({tp}) = {default!r}")
    if cls.Config.__doc__ and fields:
        print("\n" + " ".join(cls.Config.__doc__.split()))
    return 0


def _filter(args: argparse.Namespace) -> int:
    from datafilter.filters.base import parse_params
    from datafilter.filters.harness import filter_pool

    refs = {}
    for item in args.reference:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--reference expects NAME=PATH.npy, got {item!r}")
        refs[name] = path
    view = None
    if args.datacomp:
        from datafilter.filters.view import FilterView

        view = FilterView.from_datacomp(args.pool_dir, args.datacomp, references=refs, arrays_dir=args.arrays,
                                        workdir=args.workdir)
    result, out = filter_pool(args.name, args.pool_dir, args.out, params=parse_params(args.param, args.config),
                              space=args.space, references=refs, view=view, workdir=args.workdir)
    reasons = ", ".join(f"{k} {v:,}" for k, v in result.counts.items()) or "none"
    print(f"{args.name}: kept {result.kept:,} of {result.input:,} ({result.elapsed_s:.2f} s); removed: {reasons}")
    print(f"wrote {out}")
    return 0


def _unpack(args: argparse.Namespace) -> int:
    from datafilter.embed.datacomp import DataCompMetadata

    meta = DataCompMetadata(args.metadata_dir, args.model, arrays_dir=args.out)
    written = meta.unpack(args.kinds)
    print(f"unpacked {len(written)} array(s) into {meta.arrays_dir} "
          f"({len(meta.parquets) * len(args.kinds) - len(written)} already there)")
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    from datafilter.filters.report import subset_report

    report, out = subset_report(args.subset, pool_dir=args.pool, compare=args.compare, out=args.out)
    print(json.dumps({k: report[k] for k in ("kept", "input", "counts", "overlap", "noise") if k in report},
                     indent=2))
    print(f"wrote {out}")
    return 0
