"""Time building the micro pool (and its suite) with a cold render cache, then again with the cache warm.

The sources must already be installed (``datafilter sources install``); the run uses a temporary cache whose
``sources`` folder links to the real one, so "cold" means an empty render cache and nothing else. Each timing runs the
real command line in a fresh process: pool build and suite build, cold then warm, then ``suite check`` of the warm
suite against every image of the warm pool. Targets on a 2-core machine: cold <= 10 min, warm <= 2 min.

    python benchmarks/bench_micro_build.py [--recipe pools/micro.yaml] [--repeats 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


CPU: dict[str, list[float]] = {}


def timed(name: str, cmd: list[str], env: dict, ok_codes: tuple[int, ...] = (0,)) -> float:
    """Wall seconds of ``cmd``; its CPU seconds (all its processes) go to ``CPU[name]``. On a shared machine the
    CPU time divided by the cores is what the wall time would be with the machine to itself."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode
    if rc not in ok_codes:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {rc}")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.setdefault(name, []).append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="pools/micro.yaml")
    ap.add_argument("--repeats", type=int, default=1, help="cold and warm runs each (median reported)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", help="keep the last built pool and suite under this folder")
    args = ap.parse_args()

    from datafilter.common.files import cache_root
    from datafilter.micro.sources import status

    missing = [s.source.name for s in status() if not s.ok]
    if missing:
        print(f"sources missing: {', '.join(missing)}; run: datafilter sources install", file=sys.stderr)
        return 1
    exe = [sys.executable, "-m", "datafilter", "-q"]
    results: dict[str, list[float]] = {"pool_cold": [], "suite_cold": [], "pool_warm": [], "suite_warm": [],
                                       "check_pool": []}
    with tempfile.TemporaryDirectory(prefix="bench-micro-") as tmp:
        tmp = Path(tmp)
        for r in range(args.repeats):
            cache = tmp / f"cache{r}"
            cache.mkdir()
            os.symlink(cache_root() / "sources", cache / "sources")
            env = {**os.environ, "DATAFILTER_CACHE": str(cache)}
            for phase in ("cold", "warm"):
                out = tmp / f"run{r}-{phase}"
                w = ["--workers", str(args.workers)]
                results[f"pool_{phase}"].append(timed(f"pool_{phase}", exe + ["pool", "build", args.recipe, "--out",
                                                                            str(out / "pool")] + w, env))
                results[f"suite_{phase}"].append(timed(f"suite_{phase}", exe + ["suite", "build", args.recipe,
                                                                              "--out", str(out / "suite")] + w, env))
                if phase == "warm":
                    # The independent check of the built suite against every image of the built pool.
                    # Exit code 1 means it found copies (the suite was built without --pool); that is a result.
                    results["check_pool"].append(timed("check_pool", exe + ["suite", "check", str(out / "suite"),
                                                                            "--pool", str(out / "pool")], env, (0, 1)))
                if args.keep and r == args.repeats - 1 and phase == "warm":
                    shutil.copytree(out, args.keep, dirs_exist_ok=True)
                shutil.rmtree(out)
            shutil.rmtree(cache)
    summary = {k: round(statistics.median(v), 1) for k, v in results.items()}
    summary["cold_total"] = round(summary["pool_cold"] + summary["suite_cold"], 1)
    summary["warm_total"] = round(summary["pool_warm"] + summary["suite_warm"], 1)
    summary["cold_over_warm"] = round(summary["pool_cold"] / summary["pool_warm"], 2)
    cpu = {k: round(statistics.median(v), 1) for k, v in CPU.items()}
    # The machine may be shared: the load average says how much of it the build had.
    print(json.dumps({"recipe": args.recipe, "repeats": args.repeats, "workers": args.workers,
                      "seconds_median": summary, "cpu_seconds_median": cpu, "raw": results,
                      "load_average_after": [round(x, 2) for x in os.getloadavg()]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
