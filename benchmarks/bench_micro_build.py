"""Time building the micro pool (and its suite) with a cold render cache, then again with the cache warm.

The sources must already be installed (``datafilter sources install``); the run uses a temporary cache whose
``sources`` folder links to the real one, so "cold" means an empty render cache and nothing else. Each timing runs the
real command line in a fresh process. Targets on a 2-core machine: cold <= 10 min, warm <= 2 min.

    python benchmarks/bench_micro_build.py [--recipe pools/micro.yaml] [--repeats 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="pools/micro.yaml")
    ap.add_argument("--repeats", type=int, default=1, help="cold and warm runs each (median reported)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", help="keep the last built pool and suite under this folder")
    args = ap.parse_args()

    from datafilter.micro.sources import cache_root, status

    missing = [s.source.name for s in status() if not s.ok]
    if missing:
        print(f"sources missing: {', '.join(missing)}; run: datafilter sources install", file=sys.stderr)
        return 1
    exe = [sys.executable, "-m", "datafilter", "-q"]
    results: dict[str, list[float]] = {"pool_cold": [], "pool_warm": [], "suite_cold": [], "suite_warm": []}
    with tempfile.TemporaryDirectory(prefix="bench-micro-") as tmp:
        tmp = Path(tmp)
        for r in range(args.repeats):
            cache = tmp / f"cache{r}"
            cache.mkdir()
            os.symlink(cache_root() / "sources", cache / "sources")
            env = {**os.environ, "DATAFILTER_CACHE": str(cache)}
            for phase in ("cold", "warm"):
                out = tmp / f"run{r}-{phase}"
                results[f"pool_{phase}"].append(timed(exe + ["pool", "build", args.recipe, "--out", str(out / "pool"),
                                                             "--workers", str(args.workers)], env))
                results[f"suite_{phase}"].append(timed(exe + ["suite", "build", args.recipe, "--out",
                                                              str(out / "suite"), "--workers", str(args.workers)], env))
                if args.keep and r == args.repeats - 1 and phase == "warm":
                    shutil.copytree(out, args.keep, dirs_exist_ok=True)
                shutil.rmtree(out)
            shutil.rmtree(cache)
    summary = {k: round(statistics.median(v), 1) for k, v in results.items()}
    summary["cold_total"] = round(summary["pool_cold"] + summary["suite_cold"], 1)
    summary["warm_total"] = round(summary["pool_warm"] + summary["suite_warm"], 1)
    summary["cold_over_warm"] = round(summary["pool_cold"] / summary["pool_warm"], 2)
    # The machine may be shared: the load average says how much of it the build had.
    print(json.dumps({"recipe": args.recipe, "repeats": args.repeats, "workers": args.workers,
                      "seconds_median": summary, "raw": results,
                      "load_average_after": [round(x, 2) for x in os.getloadavg()]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
