"""The example plugin package: installed (into a temporary folder, offline), discovered through its entry point,
listed by the command line and run through the harness, without any change to the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_toy_pool
from datafilter.filters import load_subset
from datafilter.filters.harness import filter_pool
from datafilter.pool import Pool
from datafilter.pool.uid import sort_uids

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "datafilter-example-filter"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / EXAMPLE.name
    shutil.copytree(EXAMPLE, src)  # build in a copy: the repository stays clean
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), str(src)], check=True)
    return target


def test_plugin_is_listed_and_runs_from_the_command_line(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    cli = [sys.executable, "-m", "datafilter"]
    listed = subprocess.run(cli + ["filters", "list"], env=env, capture_output=True, text=True, check=True).stdout
    assert "caption_words" in listed and "example plugin" in listed
    pool = write_toy_pool(tmp_path / "pool", n=24, shard_size=12)  # captions: "a red circle" (3 words)
    out = tmp_path / "cw.npy"
    run = subprocess.run(cli + ["filter", "caption_words", str(pool), "--out", str(out), "-p", "min_words=4"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    uids, meta = load_subset(out)
    assert len(uids) == 0 and meta["counts"] == {"too_few_words": 24, "too_many_words": 0}
    assert meta["plugin"] == "datafilter_example_filter:CaptionWordsFilter"


def test_plugin_runs_in_process_through_the_harness(installed, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(installed))
    pool = write_toy_pool(tmp_path / "pool", n=24, shard_size=12)
    res, out = filter_pool("caption_words", pool, tmp_path / "cw.npy", params={"min_words": "3", "max_words": "3"})
    assert np.array_equal(res.uids, sort_uids(Pool(pool).uids)) and res.counts == {"too_few_words": 0,
                                                                                     "too_many_words": 0}
