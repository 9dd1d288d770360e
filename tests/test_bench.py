"""The whole benchmark on the nano pool: every stage runs, the table has DataComp's columns, and a rerun reuses work."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from datafilter.bench.config import BenchConfigError, load_bench_config
from datafilter.bench.run import run_bench
from datafilter.bench.table import COLUMNS, aggregate, markdown
from datafilter.filters.subset import load_subset

from conftest import NANO



def _config(tmp_path: Path, **extra) -> Path:
    cfg = {"name": "smoke", "recipe": str(NANO), "embed_model": "datafilter-nano-vit",
           "scale": "nano", "samples_seen": 256, "seeds": [0],
           "filters": [{"label": "No filtering", "name": "none"},
                       {"label": "CLIP score (30%)", "name": "clip_score", "params": {"fraction": 0.3}}]}
    cfg.update(extra)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


@pytest.mark.slow
def test_bench_runs_every_stage_and_resumes(tmp_path, nano_builds):
    import torch

    torch.set_num_threads(1)
    work = tmp_path / "work"
    pool = shutil.copytree(nano_builds["pool"], tmp_path / "pool")  # the bench adds embeddings to its pool
    dirs = {"pool": str(pool), "suite": str(nano_builds["suite"])}
    summary = run_bench(load_bench_config(_config(tmp_path, **dirs)), work, workers=1)
    bench = Path(summary["bench_dir"])

    with open(bench / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["filter"] for r in rows] == ["No filtering", "CLIP score (30%)"]
    for r in rows:
        assert set(COLUMNS) <= set(r)
        assert all(0.0 <= float(r[c]) <= 100.0 for c in COLUMNS)
    sizes = {label: len(load_subset(s["path"])[0]) for label, s in summary["subsets"].items()}
    assert [int(r["dataset size"]) for r in rows] == [sizes["No filtering"], sizes["CLIP score (30%)"]]
    pool_rows = summary["subsets"]["No filtering"]["noise"]["any_noise"]["count"]
    assert sizes["CLIP score (30%)"] == pytest.approx(0.3 * sizes["No filtering"], abs=2)
    assert pool_rows > 0  # the nano pool carries ground truth, so the report measured the noise removed
    md = (bench / "results.md").read_text()
    assert "| Filtering strategy | Dataset size | ImageNet | ImageNet dist. shift | VTAB | Retrieval | Average |" in md

    # A rerun trains nothing and evaluates nothing again: the checkpoints and results stay as they were.
    ckpts = sorted((bench / "runs").glob("*/eval.json"))
    assert len(ckpts) == 2
    before = {p: p.stat().st_mtime_ns for p in ckpts}
    subset = Path(summary["subsets"]["CLIP score (30%)"]["path"])
    subset_mtime = subset.stat().st_mtime_ns
    run_bench(load_bench_config(_config(tmp_path, **dirs)), work, workers=1)
    assert {p: p.stat().st_mtime_ns for p in ckpts} == before
    assert subset.stat().st_mtime_ns == subset_mtime

    # --redo filter reruns the filters (same bytes, so the runs are reused); --redo evaluate only evaluates again.
    run_bench(load_bench_config(_config(tmp_path, **dirs)), work, workers=1, redo=("filter", "evaluate"))
    assert subset.stat().st_mtime_ns != subset_mtime
    assert all(p.stat().st_mtime_ns != before[p] for p in ckpts)
    assert all((p.parent / "train.json").exists() for p in ckpts)
    with pytest.raises(ValueError, match="gives its pool"):
        run_bench(load_bench_config(_config(tmp_path, **dirs)), work, workers=1, redo=("pool",))

    # Changing a filter's parameters redoes that subset (and only that one).
    cfg = _config(tmp_path, **dirs, filters=[{"label": "CLIP score (30%)", "name": "clip_score", "params": {"fraction": 0.5}}])
    run_bench(load_bench_config(cfg), work, workers=1, stop_after="filter")
    assert len(load_subset(subset)[0]) == pytest.approx(0.5 * sizes["No filtering"], abs=2)


def test_table_mean_and_std_over_seeds():
    rows = [{"filter": "A", "seed": s, "size": 10, "groups": {c: v for c in COLUMNS}, "tasks": {}}
            for s, v in ((0, 0.10), (1, 0.20))]
    (entry,) = aggregate(rows)
    assert entry["ImageNet"] == pytest.approx(15.0)
    assert entry["ImageNet std"] == pytest.approx(np.std([10.0, 20.0], ddof=1))
    assert "15.0 ± 7.1" in markdown([entry])


def test_rank_agreement_with_published_numbers():
    from datafilter.bench.published import agreement, describe_agreement

    # Same order: both coefficients are 1. Reversed: -1.
    a = agreement([1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0])
    assert a["spearman"] == pytest.approx(1.0) and a["kendall"] == pytest.approx(1.0) and a["rows"] == 4
    assert agreement([4.0, 3.0, 2.0, 1.0], [10.0, 20.0, 30.0, 40.0])["kendall"] == pytest.approx(-1.0)
    # One swapped pair of five: Kendall (C - D) / 10 = (9 - 1) / 10; Spearman 1 - 6 * 2 / (5 * 24).
    a = agreement([1.0, 2.0, 4.0, 3.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert a["kendall"] == pytest.approx(0.8) and a["spearman"] == pytest.approx(0.9)
    # Ties in the published column (two rows at 16.1) are shared ranks: tau-b, not tau-a.
    a = agreement([12.0, 14.0, 15.0, 16.0], [13.2, 15.8, 16.1, 16.1])
    assert a["kendall"] == pytest.approx(5 / np.sqrt(6 * 5))
    assert "4 rows are few" in describe_agreement(a, "X")
    few = agreement([1.0, 2.0], [1.0, 2.0])
    assert few["spearman"] is None and "at least three rows" in describe_agreement(few, "X")


def test_table_shows_published_rows_chance_and_one_seed_honestly(tmp_path):
    from dataclasses import asdict

    from datafilter.bench.published import published_table
    from datafilter.bench.table import write_tables

    table = published_table("datacomp_small")
    from datafilter.evaluate.suite import Task
    from datafilter.evaluate.zeroshot import coverage

    tasks = {"imagenet": {"group": "imagenet", "chance": 0.001, "num_samples": 1000, "main": 0.1},
             "mnist": {"group": "vtab", "chance": 0.1, "num_samples": 500, "main": 0.1},
             "flags": {"group": "vtab", "chance": 0.02, "num_samples": 100, "main": 0.1}}
    suite_tasks = [Task(n, "classification", "acc1", tmp_path, t["group"]) for n, t in tasks.items()]
    suite_tasks.append(Task("lost", "classification", "acc1", tmp_path, "vtab"))
    rows = [{"filter": label, "seed": 0, "size": size, "groups": {c: v for c in COLUMNS}, "tasks": {},
             "published": asdict(table.row(key)) if key else None}
            for label, size, v, key in (("None", 100, 0.10, "no_filtering"), ("Random", 30, 0.11, None),
                                        ("CLIP", 30, 0.15, "clip_score_30"), ("D2", 30, 0.16, "d2_pruning"))]
    paths = write_tables(rows, tmp_path, title="t", coverage=coverage(suite_tasks, tasks), published=table)
    md = (tmp_path / "results.md").read_text()
    assert "one training seed per row, so no standard deviation is shown" in md and "±" not in md
    assert "| None | 100 | 10.0 | 10.0 | 10.0 | 10.0 | 10.0 | 13.2 |" in md  # the published Average beside ours
    assert "| Random | 30 | 11.0 | 11.0 | 11.0 | 11.0 | 11.0 | - |" in md
    assert "| *chance* | | 0.1 | - | 6.0 | - | 4.0 |" in md  # a column's chance is the mean of its tasks'
    assert "1,000 (1)" in md and "600 (2)" in md and "1,600 (3)" in md
    assert "Not every task was scored: VTAB over 2 of 3 tasks; Average over 3 of 4 tasks." in md
    agree = json.loads((tmp_path / "agreement.json").read_text())
    assert agree["rows"] == 3 and agree["labels"] == ["None", "CLIP", "D2"] and agree["spearman"] == pytest.approx(1)
    assert "Spearman 1.00" in md and Path(paths["plot"]).stat().st_size > 0


def test_runs_side_by_side_plan(monkeypatch):
    from datafilter.bench import runs

    monkeypatch.setattr(runs, "free_cores", lambda: 2)
    assert runs.plan_parallel(0, None, 9) == (2, 1)  # default: one one-thread run per free core
    assert runs.plan_parallel(0, 2, 9) == (1, 2)  # --threads alone: one run at a time with that many threads
    assert runs.plan_parallel(0, 1, 9) == (2, 1)  # --threads 1 (a busy machine): still side by side
    assert runs.plan_parallel(3, None, 2) == (2, None)  # never more workers than runs
    assert runs.plan_parallel(1, None, 9) == (1, None)


def test_progress_line_counts_runs_and_estimates_the_rest(caplog):
    from datafilter.bench.progress import BenchProgress

    p = BenchProgress("x", ["pool", "train + evaluate"])
    with caplog.at_level("INFO", logger="datafilter.bench"):
        p.stage("train + evaluate")
        p.start_runs(5, parallel=2)
        p.run_finished("A", 0, None)  # from the cache: no estimate yet
        p.run_finished("B", 0, 60.0)
        p.run_finished("C", 0, 120.0)
    lines = [r.getMessage() for r in caplog.records]
    assert "bench x · stage 2/2: train + evaluate" in lines[0]
    assert "run 1 of 5 done: A, seed 0 (cached) · ETA after the first run" in lines[1]
    # two left, two side by side, 90 s per run on average: one more round of 1:30
    assert "run 3 of 5 done: C, seed 0 (2:00) · ETA 1:30" in lines[3]


def test_config_errors_are_named(tmp_path):
    with pytest.raises(BenchConfigError, match="labels must differ"):
        load_bench_config(_config(tmp_path, filters=[{"label": "A", "name": "none"}, {"label": "a", "name": "none"}]))
    with pytest.raises(BenchConfigError, match="unknown keys"):
        load_bench_config(_config(tmp_path, sedes=[1]))
    with pytest.raises(BenchConfigError, match="recipe, or both pool and suite"):
        load_bench_config(_config(tmp_path, recipe=None))
