"""How long does the README's main command take from a fresh clone, and how long a rerun with everything cached?

For each repeat: clone the repository (the committed HEAD) into a new folder, run ``bash run.sh`` there with an
empty ``DATAFILTER_CACHE`` (so the render cache, the scorer and the decoded pools are made anew; the npm sources
are installed into that cache too, the Debian packages stay as the machine has them) and an empty pip cache (so
the PyPI packages are fetched as on a new machine), then run ``bash run.sh`` again in the same clone ``--reruns``
times. Prints the wall time of each, the time of each benchmark stage (from the progress lines) and, over the
repeats, their medians.

    python benchmarks/bench_run_sh.py                     # one repeat, the default config
    python benchmarks/bench_run_sh.py --repeats 3 --keep  # keep the clones (for a look at their work/ folders)
    python benchmarks/bench_run_sh.py --args "--threads 1"
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = re.compile(r"bench \S+ · stage \d+/\d+: (?P<stage>.+?) · (?P<clock>\d+:\d+(?::\d+)?) elapsed")
ELAPSED = re.compile(r"bench \S+ · .*? · (?P<clock>\d+:\d+(?::\d+)?) elapsed")


def _seconds(m: re.Match) -> int:
    """The progress line's clock, M:SS or H:MM:SS, in seconds."""
    parts = [int(p) for p in m.group("clock").split(":")]
    return parts[0] * 3600 + parts[1] * 60 + parts[2] if len(parts) == 3 else parts[0] * 60 + parts[1]


def stage_times(log: str, total: float) -> dict[str, float]:
    """Seconds of the set-up before the benchmark starts, then from each stage's start to the next one's (the last
    stage to the benchmark's last progress line)."""
    marks = [(m.group("stage"), _seconds(m)) for m in STAGE.finditer(log)]
    last = [m for m in ELAPSED.finditer(log)]
    end = max(_seconds(m) for m in last) if last else total
    out = {"set-up": total - end}
    for (name, t), nxt in zip(marks, marks[1:] + [("end", end)]):
        out[name] = nxt[1] - t
    return out


def run(cmd: str, cwd: Path, env: dict, log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{cmd!r} failed (exit {proc.returncode}); see {log}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--args", default="", help="extra arguments for run.sh (they go to datafilter bench)")
    ap.add_argument("--reruns", type=int, default=3, help="cached reruns after each fresh run (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the clones")
    args = ap.parse_args()

    results = []
    for r in range(args.repeats):
        tmp = Path(tempfile.mkdtemp(prefix="bench-run-sh-"))
        clone = tmp / "datafilter"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        env = dict(os.environ, DATAFILTER_CACHE=str(tmp / "cache"), PIP_CACHE_DIR=str(tmp / "pip-cache"))
        env.pop("VIRTUAL_ENV", None)
        cmd = "bash run.sh " + " ".join(shlex.quote(a) for a in shlex.split(args.args))
        print(f"repeat {r}: {clone} (load average {os.getloadavg()[0]:.1f})", flush=True)
        first = run(cmd, clone, env, tmp / "first.log")
        stages = stage_times((tmp / "first.log").read_text(errors="replace"), first)
        again = [run(cmd, clone, env, tmp / f"again-{i}.log") for i in range(args.reruns)]
        results.append((first, again, stages))
        print(f"  fresh clone: {first / 60:.1f} min; reruns with everything cached: "
              f"{', '.join(f'{a:.0f} s' for a in again)}", flush=True)
        print("  stages: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in stages.items()), flush=True)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median
    print(f"median over {len(results)} fresh clone(s): {med(r[0] for r in results) / 60:.1f} min; over "
          f"{sum(len(r[1]) for r in results)} cached reruns: {med(a for r in results for a in r[1]):.0f} s")
    order = list(results[0][2])
    print("median per stage: " + ", ".join(f"{k} {med(r[2].get(k, 0) for r in results) / 60:.1f} min"
                                           for k in order))


if __name__ == "__main__":
    main()
