"""DataComp's 38-task suite: the task table against DataComp's definitions, a suite from a tiny copy of DataComp's
download (every task kind, webdataset folders and the Hugging Face cache) evaluated end to end with a model whose
answers are known, missing and broken tasks, results files and the commands."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datacomp_fixture import EXPECTED_MAIN, MSCOCO, PaletteModel, build_download, retrieval_features, write_hf_split
from datafilter.cli import main
from datafilter.evaluate import datacomp_jsonl, evaluate_suite, load_results, load_suite
from datafilter.evaluate.datacomp import build_datacomp_suite, datacomp_tasks, wds_folder


@pytest.fixture(scope="module")
def download(tmp_path_factory) -> Path:
    return build_download(tmp_path_factory.mktemp("datacomp") / "eval_data")


@pytest.fixture(scope="module")
def results(download, tmp_path_factory):
    build_datacomp_suite(download)
    out = tmp_path_factory.mktemp("results") / "eval.json"
    return evaluate_suite(PaletteModel(), load_suite(download), batch_size=4, workers=0, out=out), out


def test_the_table_is_datacomps_38_tasks_with_its_groups_and_main_metrics():
    tasks = datacomp_tasks()
    assert len(tasks) == 38 == len({t["key"] for t in tasks}) == len({t["name"] for t in tasks})
    groups = {g: sorted(t["name"] for t in tasks if t["group"] == g) for g in ("imagenet", "imagenet_shift", "vtab",
                                                                               "retrieval")}
    assert groups["imagenet"] == ["ImageNet 1k"]
    assert groups["imagenet_shift"] == sorted(["ImageNet Sketch", "ImageNet v2", "ImageNet-A", "ImageNet-O",
                                               "ImageNet-R", "ObjectNet"])
    assert groups["vtab"] == sorted(["Caltech-101", "CIFAR-100", "CLEVR Counts", "CLEVR Distance",
                                     "Describable Textures", "EuroSAT", "KITTI Vehicle Distance", "Oxford Flowers-102",
                                     "Oxford-IIIT Pet", "PatchCamelyon", "RESISC45", "SVHN", "SUN397"])
    assert groups["retrieval"] == ["Flickr", "MSCOCO", "WinoGAViL"]
    special = {t["name"]: t["metric"] for t in tasks if t["metric"] != "acc1"}
    assert special == {"Caltech-101": "mean_per_class_recall", "FGVC Aircraft": "mean_per_class_recall",
                       "Oxford Flowers-102": "mean_per_class_recall", "Oxford-IIIT Pet": "mean_per_class_recall",
                       "Flickr": "mean_recall@1", "MSCOCO": "mean_recall@1", "WinoGAViL": "jaccard_score_10-12",
                       "iWildCam": "F1-macro_all", "FMoW": "acc_worst_region", "Dollar Street": "acc_top5_wg",
                       "GeoDE": "acc_wg"}
    assert {t["key"] for t in tasks if t["format"] == "hf"} == {
        "retrieval/flickr_1k_test_image_text_retrieval", "retrieval/mscoco_2014_5k_test_image_text_retrieval",
        "misc/winogavil"}
    assert wds_folder("vtab/caltech101") == "wds_vtab-caltech101_test"
    assert wds_folder("fairness/dollar_street") == "wds_dollar_street_test"
    assert wds_folder("wilds/fmow") == "wds_wilds-fmow_test"


def test_suite_lists_all_tasks_and_says_which_are_missing(download):
    suite = build_datacomp_suite(download)
    assert len(suite["tasks"]) == 38 and suite["expected_tasks"] == 38
    status = suite["status"]
    assert sorted(n for n, s in status.items() if s["status"] == "ok") == sorted(EXPECTED_MAIN)
    assert status["cifar10"]["status"] == "missing" and "wds_cifar10_test not found" in status["cifar10"]["reason"]
    loaded = load_suite(download)
    assert loaded.expected_tasks == 38 and loaded.task("misc/winogavil").format == "hf"
    assert loaded.task("wilds/fmow").scorer == "fmow" and loaded.task("imagenet1k").chance == 0.001


def test_every_kind_and_format_evaluates_to_the_known_scores(results):
    res, out = results
    for name, expected in EXPECTED_MAIN.items():
        assert res["tasks"][name]["main"] == pytest.approx(expected), name
    inet = res["tasks"]["imagenet1k"]["metrics"]
    assert inet["acc5"] == pytest.approx(11 / 12) and inet["mean_per_class_recall"] == pytest.approx(5 / 6)
    assert res["tasks"]["vtab/dtd"]["metrics"]["acc5"] is None  # 3 classes
    flickr = res["tasks"]["retrieval/flickr_1k_test_image_text_retrieval"]
    assert flickr["metrics"]["image_retrieval_recall@5"] == 1.0 and flickr["num_captions"] == 8
    assert flickr["chance"] == pytest.approx(0.25)  # DataComp gives none: (1/4 + 2/8) / 2
    wino = res["tasks"]["misc/winogavil"]["metrics"]
    assert wino["jaccard_score_5-6"] == 1.0 and wino["jaccard_score_6"] is None
    fmow = res["tasks"]["wilds/fmow"]["metrics"]
    assert fmow["acc_worst_year"] == pytest.approx(0.5) and fmow["count_region:3"] == 0
    assert res["tasks"]["fairness/dollar_street"]["classes_without_samples"] == 2
    assert res["tasks"]["imagenet1k"]["precision"] == {"text": "fp32", "image": "fp32"}  # CPU
    # DataComp's aggregation, over the tasks present, saying so
    assert res["groups"]["ImageNet"] == pytest.approx(10 / 12)
    assert res["groups"]["Retrieval"] == pytest.approx((0.75 + 1 + 2 / 3) / 3)
    assert res["groups"]["ImageNet dist. shift"] is None
    assert res["groups"]["Average"] == pytest.approx(np.mean(list(EXPECTED_MAIN.values())))
    assert res["coverage"]["note"] == "Average over the 9 of 38 tasks present"
    assert res["coverage"]["columns"]["VTAB"]["scored"] == 1 and res["coverage"]["columns"]["VTAB"]["expected"] == 13
    assert len(res["failed"]) == 29 and "wds_cifar10_test not found" in res["failed"]["cifar10"]
    assert json.loads(out.read_text())["groups"] == res["groups"]


def test_workers_split_a_task_and_give_the_same_scores(download, results):
    suite = load_suite(download)
    names = ["imagenet1k", "retrieval/flickr_1k_test_image_text_retrieval"]
    again = evaluate_suite(PaletteModel(), suite, batch_size=2, workers=2, tasks=names)
    for n in names:
        assert again["tasks"][n]["metrics"] == results[0]["tasks"][n]["metrics"]
    assert again["coverage"]["complete"]  # the tasks asked for are all there


def test_broken_tasks_are_named_and_the_others_still_evaluate(download, tmp_path, caplog):
    data = tmp_path / "broken"
    shutil.copytree(download, data)
    tar = data / "wds_imagenet1k_test" / "test" / "1.tar"
    with open(tar, "r+b") as f:
        f.truncate(512 * 3)  # inside a member, on a block boundary: found while reading
    (data / "wds_vtab-dtd_test" / "test" / "0.tar").write_bytes(b"x" * 1000)  # found before any work
    for t in (data / "wds_geode_test" / "test").glob("*.tar"):  # metadata rows without the region column
        rewrite_metadata(t, [])
    shutil.rmtree(data / "hf_cache" / "nlphuji___mscoco_2014_5k_test_image_text_retrieval")
    write_hf_split(data / "hf_cache", "nlphuji/mscoco_2014_5k_test_image_text_retrieval", retrieval_features(),
                   [{"image": {"bytes": b"", "path": None}, "caption": ["x"], "filename": "0.jpg"}], split="train")
    suite = build_datacomp_suite(data)
    assert suite["status"]["vtab/dtd"]["status"] == "incomplete"
    assert "truncated tar" in suite["status"]["vtab/dtd"]["reason"]
    assert suite["status"]["retrieval/mscoco_2014_5k_test_image_text_retrieval"]["status"] == "incomplete"
    with caplog.at_level(logging.WARNING):
        res = evaluate_suite(PaletteModel(), load_suite(data), batch_size=4, workers=0)
    failed = res["failed"]
    assert "task imagenet1k:" in failed["imagenet1k"] and "truncated tar" in failed["imagenet1k"]
    assert "task vtab/dtd:" in failed["vtab/dtd"]
    assert "needs metadata column 'region'" in failed["fairness/geode"]
    assert "no complete 'test' split; it has train" in failed["retrieval/mscoco_2014_5k_test_image_text_retrieval"]
    assert "task fairness/dollar_street: 2 of 6 classes have no test samples" in caplog.text
    for name in ("wilds/fmow", "fairness/dollar_street", "misc/winogavil", "wilds/iwildcam"):
        assert res["tasks"][name]["main"] == pytest.approx(EXPECTED_MAIN[name])
    assert res["coverage"]["note"] == "Average over the 5 of 38 tasks present"


def rewrite_metadata(tar: Path, row: list[int]) -> None:
    import io
    import tarfile

    with tarfile.open(tar) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    buf = io.BytesIO()
    np.save(buf, np.asarray(row, np.int64))
    with tarfile.open(tar, "w") as tf:
        for m, data in members:
            if m.name.endswith(".npy"):
                data = buf.getvalue()
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


def test_the_hf_fixture_is_what_datasets_itself_reads_offline(download):
    """The fixture is in the real format: ``datasets.load_dataset`` reads it from the cache with no network."""
    code = ("import datasets, json, sys; ds = datasets.load_dataset('nlphuji/mscoco_2014_5k_test_image_text_retrieval',"
            " split='test', cache_dir=sys.argv[1]); print(json.dumps([ds.num_rows, [r['caption'] for r in ds]]))")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(download / "hf_cache")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows, captions = json.loads(out.stdout.strip().splitlines()[-1])
    assert rows == len(MSCOCO) and captions == [c for _, c in MSCOCO]


def test_datacomp_jsonl_aggregates_as_datacomp(results, tmp_path):
    res, _ = results
    path = tmp_path / "eval_results.jsonl"
    path.write_text(datacomp_jsonl(res))
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert {x["key"] for x in lines} == set(EXPECTED_MAIN)
    fmow = next(x for x in lines if x["key"] == "wilds/fmow")
    assert fmow["dataset"] == "FMoW" and fmow["metrics"]["main_metric"] == pytest.approx(0.25)
    (run,) = load_results(path)  # read back as DataComp's file: groups from DataComp's table
    assert run.groups == pytest.approx(res["groups"])
    assert run.tasks["wilds/fmow"]["chance"] == pytest.approx(0.027193)


def test_commands_suite_results_show_and_compare(download, results, tmp_path, capsys):
    assert main(["suite", "datacomp", str(download), "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "9 of 38 DataComp tasks present" in out and "missing (29)" in out
    assert (tmp_path / "s" / "suite.json").is_file()

    res, path = results
    assert main(["results", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "FMoW" in out and "acc_worst_region" in out and "25.00%" in out and "2.72%" in out  # chance of FMoW
    assert "Average over the 9 of 38 tasks present" in out
    other = dict(res, tasks={**res["tasks"], "wilds/fmow": {**res["tasks"]["wilds/fmow"], "main": 0.5}})
    (tmp_path / "b.json").write_text(json.dumps(other))
    assert main(["results", "compare", str(path), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("FMoW"))
    assert line.split()[-4:] == ["25.00%", "50.00%", "+25.00", "2.72%"]
    assert main(["results", "compare", str(path)]) == 2  # one run: nothing to compare, a clear error


def test_results_of_a_benchmark_csv_read_one_run_per_row(tmp_path, capsys):
    head = ["filter", "seed", "dataset size", "ImageNet", "ImageNet dist. shift", "VTAB", "Retrieval", "Average",
            "imagenet1k", "wilds/fmow", "emoji_retrieval"]
    rows = [["none", "0", "100", "2.500", "nan", "10.000", "nan", "8.000", "2.500", "12.000", "nan"],
            ["clip_score", "0", "30", "4.000", "nan", "12.000", "nan", "9.000", "4.000", "11.000", "3.000"]]
    (tmp_path / "results.csv").write_text("\n".join(",".join(r) for r in [head] + rows) + "\n")
    runs = load_results(tmp_path / "results.csv")
    assert [r.name.split(": ")[-1] for r in runs] == ["none seed 0", "clip_score seed 0"]
    assert runs[1].tasks["imagenet1k"]["main"] == pytest.approx(0.04) and runs[0].groups["Retrieval"] is None
    assert runs[0].tasks["wilds/fmow"]["metric"] == "acc_worst_region"  # DataComp's tasks are known by key
    assert main(["results", "compare", str(tmp_path / "results.csv")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("ImageNet 1k"))
    assert line.split()[-4:] == ["2.50%", "4.00%", "+1.50", "0.10%"]
