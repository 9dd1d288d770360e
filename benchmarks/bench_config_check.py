"""How long does `bench` take to refuse a broken config? The whole-config check, in fresh processes.

Each repeat starts a new interpreter that loads and checks a config with several filters (the registry, recipes and
scale are consulted) and prints the time from the first import to the verdict; the median is what a user waits
before the first stage (or the error) when a config has a typo.

    python benchmarks/bench_config_check.py                 # configs/micro.yaml, 5 repeats
    python benchmarks/bench_config_check.py --config configs/nano.yaml --repeats 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = """
import sys, time
t = time.perf_counter()
from datafilter.bench.config import load_bench_config
from datafilter.bench.validate import check_bench_config
check_bench_config(load_bench_config(sys.argv[1]))
print(time.perf_counter() - t)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "micro.yaml"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    times = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", CODE, args.config], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
        times.append(float(out.split()[-1]))
    print(f"{args.config}: check {statistics.median(times):.2f} s median of {len(times)} "
          f"({min(times):.2f}-{max(times):.2f}); load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
