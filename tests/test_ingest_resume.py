"""A killed ingest resumes: finished shards are not redone, no sample is lost or written twice."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from datafilter.pool import ImageConfig, Pool
from datafilter.pool.ingest import IngestConfig, ingest

SHARDS, PER_SHARD = 6, 8


def test_killed_ingest_resumes_without_redoing_or_losing_samples(tmp_path: Path):
    # Big images with the slow filter, so that a shard takes a few tenths of a second and the kill lands mid-run.
    arr = np.random.default_rng(0).integers(0, 255, (1400, 1400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    src = tmp_path / "src"
    src.mkdir()
    n = SHARDS * PER_SHARD
    for i in range(n):
        (src / f"{i:03d}.jpg").write_bytes(buf.getvalue())  # identical bytes, distinct names: distinct samples
        (src / f"{i:03d}.txt").write_text(f"picture number {i}" if i % 7 else "")  # every 7th: empty caption
    out = tmp_path / "pool"
    args = [sys.executable, "-m", "datafilter", "-q", "pool", "ingest", str(src), "--out", str(out), "--workers", "1",
            "--shard-size", str(PER_SHARD), "--max-side", "300", "--resample", "lanczos"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "00000000_stats.json"
    deadline = time.monotonic() + 60
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("*_stats.json"))
    assert first.name in done and len(done) < SHARDS, f"the kill did not land mid-run: {done}"
    finished = {p: p.stat().st_mtime_ns for p in out.glob("0*") if f"{p.name[:8]}_stats.json" in done}
    assert len([p for p in finished if not p.name.endswith("_skipped.jsonl")]) == 3 * len(done)

    cfg = IngestConfig(kind="folder", shard_size=PER_SHARD, workers=1,
                       image=ImageConfig(max_side=300, resample="lanczos"))
    ingest(src, out, cfg)

    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished shards were not redone
    assert not list(out.glob(".*tmp*"))  # the killed run's partial files are gone
    pool = Pool(out)
    texts = list(pool.column("text"))
    expected = [f"picture number {i}" for i in range(n) if i % 7]
    assert texts == expected  # every sample exactly once, in source order
    assert len(set(pool.column("uid"))) == len(expected)
    summary = pool.summary()
    assert summary["shards"] == SHARDS and summary["shards_without_stats"] == []
    assert summary["input"] == n and summary["skipped"] == {"empty_caption": n - len(expected)}
    assert json.loads((out / "_ingest" / "job.json").read_text())["complete"] is True

    # and the resumed pool is byte for byte the pool an uninterrupted ingest writes
    ref = ingest(src, tmp_path / "ref", cfg)
    files = sorted(p.name for p in ref.iterdir() if p.is_file())
    assert files == sorted(p.name for p in out.iterdir() if p.is_file())
    assert all((ref / name).read_bytes() == (out / name).read_bytes() for name in files)
