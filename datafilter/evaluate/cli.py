"""``datafilter evaluate``, ``datafilter suite datacomp`` and ``datafilter results show|compare``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(commands) -> None:
    p = commands.command(
        "evaluate", "zero-shot evaluation of a model on a suite (classification, retrieval, WinoGAViL)",
        description="Evaluate a model zero-shot on every task of SUITE_DIR/suite.json and write every task's metrics,\n"
                    "DataComp's group means and the Average to --out. Tasks that cannot be scored (missing,\n"
                    "truncated) are named and the others still evaluate. A killed run resumes at the first\n"
                    "unfinished task.\n\n"
                    "  datafilter suite datacomp ~/datacomp_eval          # DataComp's 38 tasks, downloaded once\n"
                    "  datafilter evaluate --model ViT-B-32 --checkpoint run/checkpoints/epoch_latest.pt \\\n"
                    "      --suite ~/datacomp_eval --out run/eval.json --datacomp-jsonl run/eval_results.jsonl")
    p.add_argument("--model", required=True, help="open_clip model name, e.g. datafilter-micro-vit or ViT-B-32")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="checkpoint file (datafilter or open_clip format; read weights-only)")
    src.add_argument("--pretrained", help="open_clip pretrained tag (downloads; needs internet)")
    p.add_argument("--suite", required=True, help="suite folder with suite.json")
    p.add_argument("--out", required=True, help="results JSON to write (its folder is created)")
    p.add_argument("--datacomp-jsonl", help="also write the results as DataComp's eval_results.jsonl")
    p.add_argument("--tasks", nargs="+", help="evaluate only these tasks")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: half the free cores, at most 8; 0: decode in this process)")
    p.add_argument("--threads", type=int, default=None, help="model threads on CPU (default: free cores - workers)")
    p.add_argument("--precision", choices=("auto", "fp32"), default="auto",
                   help="auto: DataComp's (fp16 autocast for the towers it runs in mixed precision on a GPU, fp32 "
                        "on CPU); fp32: fp32 everywhere")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--decoded-cache-gb", type=float, default=1.0,
                   help="keep each task of up to this many GB of decoded images under $DATAFILTER_CACHE/eval, so "
                        "that the next evaluation of the task skips decoding (default: %(default)s; 0: off)")
    p.set_defaults(func=_evaluate)

    s = commands.subcommand(
        "suite", "build and inspect evaluation suites", "datacomp",
        "write a suite.json for DataComp's 38 tasks in the folder DataComp's download_evalsets.py fills",
        description="Write DATA_DIR/suite.json (or --out DIR/suite.json) listing DataComp's 38 evaluation tasks with\n"
                    "their groups, main metrics and chance levels, reading webdataset folders DATA_DIR/wds_*_test\n"
                    "and the Hugging Face cache DATA_DIR/hf_cache; say which tasks are missing or incomplete.\n"
                    "--download fetches what is missing first (needs a network).")
    s.add_argument("data_dir", help="DataComp's evaluation data folder")
    s.add_argument("--out", help="folder for suite.json (default: DATA_DIR)")
    s.add_argument("--download", action="store_true", help="download missing tasks first (needs a network)")
    s.set_defaults(func=_datacomp_suite)

    for name, help_, fn in (
            ("show", "print results: a table per group and task with chance levels", _show),
            ("compare", "compare results side by side, with each run's difference from the first", _compare)):
        r = commands.subcommand(
            "results", "print and compare evaluation and benchmark results", name, help_,
            description=f"{help_[0].upper()}{help_[1:]}.\nRESULTS: results JSON of `datafilter evaluate` (or a "
                        "benchmark's eval.json), DataComp's eval_results.jsonl,\nor a benchmark's results.csv / "
                        "results_summary.csv (one run per row).")
        r.add_argument("results", nargs="+", help="results files")
        r.set_defaults(func=fn)


def _evaluate(args: argparse.Namespace) -> int:
    from datafilter.common.files import cache_root
    from datafilter.evaluate.decoded import DecodedCache
    from datafilter.evaluate.suite import load_suite
    from datafilter.evaluate.zeroshot import datacomp_jsonl, evaluate_suite, format_results
    from datafilter.models import ModelSpec, load_model, pick_device

    if not args.checkpoint and not args.pretrained:
        raise ValueError("give --checkpoint PATH (or --pretrained TAG); a model with random weights is not evaluated")
    suite = load_suite(args.suite)
    for path in (args.out, args.datacomp_jsonl):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    model = load_model(ModelSpec(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint),
                       device=pick_device(args.device))
    results = evaluate_suite(model, suite, batch_size=args.batch_size, out=args.out, tasks=args.tasks,
                             checkpoint=args.checkpoint, workers=args.workers, precision=args.precision,
                             threads=args.threads,
                             cache=DecodedCache(cache_root() / "eval", int(args.decoded_cache_gb * 1e9)))
    print(format_results(results))
    print(f"\nwrote {args.out}")
    if args.datacomp_jsonl:
        Path(args.datacomp_jsonl).write_text(datacomp_jsonl(results))
        print(f"wrote {args.datacomp_jsonl}")
    return 1 if results["failed"] else 0


def _datacomp_suite(args: argparse.Namespace) -> int:
    from datafilter.evaluate.datacomp import build_datacomp_suite, download, format_status

    if args.download:
        failed = download(args.data_dir)
        if failed:
            log.error("%d task(s) could not be downloaded", len(failed))
    suite = build_datacomp_suite(args.data_dir, args.out)
    print(format_status(suite))
    print(f"wrote {Path(args.out or suite['data_dir']) / 'suite.json'}")
    return 0


def _load(paths: list[str]):
    from datafilter.evaluate.results import load_results

    return [run for p in paths for run in load_results(p)]


def _show(args: argparse.Namespace) -> int:
    from datafilter.evaluate.results import format_run

    for i, run in enumerate(_load(args.results)):
        print(("\n" if i else "") + f"== {run.name}")
        print(format_run(run))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from datafilter.evaluate.results import format_compare

    runs = _load(args.results)
    if len(runs) < 2:
        raise ValueError("compare needs at least two runs (files, or rows of a results.csv)")
    print(format_compare(runs))
    return 0
