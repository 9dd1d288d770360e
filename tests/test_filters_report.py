"""The filter report: counts, Jaccard overlap, and precision/recall of removed noise against ground truth."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import write_toy_pool
from datafilter.cli import main
from datafilter.filters import save_subset
from datafilter.filters.report import subset_report
from datafilter.pool import Pool, uids_to_hex
from datafilter.pool.uid import sort_uids


def test_report_precision_recall_and_overlap(tmp_path):
    pool_dir = write_toy_pool(tmp_path / "pool", n=20, shard_size=10)
    uids = Pool(pool_dir).uids
    noise = ["clean"] * 10 + ["mismatched_caption"] * 6 + ["boilerplate_caption"] * 4
    pq.write_table(pa.table({"uid": uids_to_hex(uids), "noise": noise}), pool_dir / "ground_truth.parquet")
    # keep 8 clean, 2 mismatched, 0 boilerplate (rows 0-7, 10-11); one kept uid repeated
    kept_rows = list(range(8)) + [10, 11, 11]
    save_subset(tmp_path / "a.npy", sort_uids(uids[kept_rows]),
                {"filter": "hand", "pool": str(pool_dir), "counts": {"by_hand": 10}})
    save_subset(tmp_path / "b.npy", sort_uids(uids[:10]), {"filter": "clean_only", "pool": str(pool_dir)})
    report, out = subset_report(tmp_path / "a.npy", compare=[tmp_path / "b.npy"])
    assert report["unique_kept"] == 10 and report["kept"] == 11
    # removed: 2 clean, 4 mismatched, 4 boilerplate = 10
    types = report["noise"]["types"]
    assert types["mismatched_caption"] == {"count": 6, "removed": 4, "recall": 4 / 6, "precision": 0.4}
    assert types["boilerplate_caption"]["recall"] == 1.0 and types["clean"]["recall"] == 0.2
    assert report["noise"]["any_noise"] == {"count": 10, "removed": 8, "recall": 0.8, "precision": 0.8}
    assert report["noise"]["kept_clean_fraction"] == 0.8
    assert report["overlap"][str(tmp_path / "b.npy")]["jaccard"] == 8 / 12
    assert json.loads(out.read_text())["noise"]["any_noise"]["recall"] == 0.8
    assert out.with_suffix(".png").stat().st_size > 1000


def test_report_cli_without_ground_truth(tmp_path, capsys):
    pool_dir = write_toy_pool(tmp_path / "pool", n=12, shard_size=12)
    save_subset(tmp_path / "s.npy", sort_uids(Pool(pool_dir).uids[:3]), {"filter": "x", "pool": str(pool_dir)})
    assert main(["filters", "report", str(tmp_path / "s.npy"), "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["unique_kept"] == 3 and "noise" not in report
