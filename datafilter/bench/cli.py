"""``datafilter bench CONFIG``: the whole benchmark from one config, resumable."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Run a benchmark end to end: build (or reuse) the pool and evaluation suite, train (or reuse) the offline scorer,
embed the pool, run every filter of the config, report the noise each removed, train a fixed-budget CLIP on each
subset and evaluate it zero-shot. Every stage is cached; rerunning after a kill resumes where it stopped.

examples:
  datafilter bench                               # the default offline benchmark (configs/micro.yaml)
  datafilter bench configs/micro.yaml --seeds 0 1 2
  datafilter bench configs/micro.yaml --stop-after filter   # subsets and the noise report only
"""


def register(commands) -> None:
    p = commands.command("bench", "run a whole benchmark (pool, scorer, embed, filters, train, evaluate, table)",
                         description=DESCRIPTION)
    p.add_argument("config", nargs="?", default="configs/micro.yaml", help="benchmark config (default: %(default)s)")
    p.add_argument("--work", default="work", help="where pools, subsets, runs and tables go (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the config's)")
    p.add_argument("--samples-seen", type=int, help="override the scale's training budget")
    p.add_argument("--workers", type=int, default=0, help="processes for building and decoding (default: free cores)")
    p.add_argument("--threads", type=int, help="torch threads per training run (default: 1 with runs side by side; "
                                            "1 is often much faster on a machine shared with other busy processes)")
    p.add_argument("--parallel", type=int, default=0, help="training runs side by side (default 0: one one-thread run "
                                                          "per free core, or one run at a time if --threads is given)")
    p.add_argument("--stop-after", choices=("pool", "suite", "scorer", "embed", "filter", "train"),
                   help="stop after this stage")
    p.add_argument("--redo", nargs="+", default=(), metavar="STAGE",
                   choices=("pool", "suite", "scorer", "embed", "filter", "train", "evaluate"),
                   help="do these stages again although their cached output is current (train: this benchmark's "
                        "runs from scratch; evaluate: their evaluations only)")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    from datafilter.bench.config import load_bench_config
    from datafilter.bench.run import run_bench
    from datafilter.common.launch import free_cores

    cfg = load_bench_config(args.config, seeds=args.seeds, samples_seen=args.samples_seen)
    summary = run_bench(cfg, args.work, workers=args.workers or free_cores(), threads=args.threads,
                        parallel=args.parallel, stop_after=args.stop_after, redo=tuple(args.redo))
    tables = summary.get("tables")
    if tables:
        print()
        print(open(tables["markdown"]).read())
        print(f"results: {tables['csv']}, {tables['summary_csv']}, {tables['markdown']}, {tables['plot']}")
    return 0
