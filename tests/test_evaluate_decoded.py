"""Decoded tasks kept between evaluations: a cached evaluation decodes nothing and scores exactly as a decoding one,
a changed file or input size is a new entry, and a failed, stopped or too large pass leaves no entry."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conftest import shape_image
from datafilter.embed.decode import ImageDecoder
from datafilter.evaluate import evaluate_suite, load_suite
from datafilter.evaluate.decoded import DecodedCache
from datafilter.evaluate.kinds import Encoder, get_kind
from datafilter.evaluate.stream import task_batches
from datafilter.models import ModelSpec, load_model
from test_evaluate import write_classification_task, write_toy_suite

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return load_model(ModelSpec("datafilter-micro-vit"), seed=0)


def _metrics(res):
    return {name: r["metrics"] for name, r in res["tasks"].items()}


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir()) if root.exists() else []


def test_a_cached_evaluation_decodes_nothing_and_scores_the_same(tmp_path, model, monkeypatch):
    suite = load_suite(write_toy_suite(tmp_path / "suite"))
    cache = DecodedCache(tmp_path / "cache")
    plain = evaluate_suite(model, suite, batch_size=5, workers=0)
    first = evaluate_suite(model, suite, batch_size=5, workers=1, cache=cache)
    assert len(_entries(cache.root)) == 3  # one per task, nothing left half written
    assert not [p for p in cache.root.iterdir() if p.name.startswith(".")]

    def no_decoding(self, data):
        raise AssertionError("a cached task was decoded")

    monkeypatch.setattr(ImageDecoder, "__call__", no_decoding)
    again = evaluate_suite(model, suite, batch_size=5, workers=1, cache=cache)
    assert _metrics(plain) == _metrics(first) == _metrics(again)
    # another batch size regroups the stored records in task order: the same samples and scores
    regrouped = evaluate_suite(model, suite, batch_size=7, workers=0, cache=cache)
    assert {n: r["num_samples"] for n, r in regrouped["tasks"].items()} == {
        n: r["num_samples"] for n, r in plain["tasks"].items()}
    for name, metrics in _metrics(regrouped).items():
        assert metrics == pytest.approx(_metrics(plain)[name], abs=1e-6)


def test_cached_batches_equal_the_decoded_ones(tmp_path, model):
    suite = load_suite(write_toy_suite(tmp_path / "suite"))
    task, kind = suite.task("things"), get_kind("classification")
    decoder = Encoder(model, 4).decoder(task)
    cache = DecodedCache(tmp_path / "cache")
    decoded = list(task_batches(task, kind, decoder, 4, workers=2, cache=cache))
    cached = list(task_batches(task, kind, decoder, 4, workers=2, cache=cache))
    key = lambda b: b["order"]  # noqa: E731 - workers may hand batches over in another order
    for a, b in zip(sorted(decoded, key=key), sorted(cached, key=key), strict=True):
        assert torch.equal(a["images"], b["images"]) and a["images"].dtype == torch.uint8
        assert (a["keys"], a["counts"]) == (b["keys"], b["counts"])
        assert [e[0] for e in a["extras"]] == [e[0] for e in b["extras"]]


def test_a_changed_file_or_input_size_is_another_entry(tmp_path, model):
    folder = write_classification_task(tmp_path / "suite" / "t", ["red square", "blue circle"], ["{c}"],
                                       [(shape_image("red", "square", seed=i), 0) for i in range(6)])
    (tmp_path / "suite" / "suite.json").write_text(
        '{"name": "s", "tasks": [{"name": "t", "type": "classification", "metric": "acc1", "path": "t"}]}')
    task = load_suite(tmp_path / "suite").tasks[0]
    cache = DecodedCache(tmp_path / "cache")
    decoder = Encoder(model, 4).decoder(task)
    first = cache.key(task, decoder)
    bigger = load_model(ModelSpec("datafilter-micro-vit"), seed=0)
    bigger.preprocess.transforms[0].size = 24  # another input size: other pixels
    assert cache.key(task, ImageDecoder(bigger.preprocess, 24)) != first
    evaluate_suite(model, load_suite(tmp_path / "suite"), batch_size=4, workers=0, cache=cache)
    write_classification_task(folder, ["red square", "blue circle"], ["{c}"],
                              [(shape_image("blue", "circle", seed=i), 1) for i in range(7)])
    assert cache.key(task, decoder) != first
    res = evaluate_suite(model, load_suite(tmp_path / "suite"), batch_size=4, workers=0, cache=cache)
    assert res["tasks"]["t"]["num_samples"] == 7  # the new file, not the stored copy of the old one
    assert len(_entries(cache.root)) == 2


def test_failed_stopped_and_too_large_passes_leave_no_entry(tmp_path, model, caplog):
    suite_dir = write_toy_suite(tmp_path / "suite")
    suite = load_suite(suite_dir)
    task, kind = suite.task("things"), get_kind("classification")
    decoder = Encoder(model, 4).decoder(task)

    stopped = DecodedCache(tmp_path / "stopped")
    batches = task_batches(task, kind, decoder, 4, workers=0, cache=stopped)
    next(batches)
    batches.close()  # an evaluation that stops (killed, or an error in the kind) before the task's end
    assert _entries(stopped.root) == []

    small = DecodedCache(tmp_path / "small", max_bytes=32 * 32 * 3 * 10)
    with caplog.at_level(logging.INFO):
        assert sum(len(b["counts"]) for b in task_batches(task, kind, decoder, 4, workers=0, cache=small)) == 24
    assert _entries(small.root) == [] and "not cached" in caplog.text

    with open(suite_dir / "things" / "test" / "1.tar", "r+b") as f:
        f.truncate(512 * 3)  # the second tar breaks off inside a member
    broken = DecodedCache(tmp_path / "broken")
    res = evaluate_suite(model, load_suite(suite_dir), batch_size=4, workers=0, tasks=["things"], cache=broken)
    assert "things" in res["failed"] and _entries(broken.root) == []


def test_an_unreadable_entry_is_decoded_again(tmp_path, model, caplog):
    suite = load_suite(write_toy_suite(tmp_path / "suite"))
    cache = DecodedCache(tmp_path / "cache")
    first = evaluate_suite(model, suite, batch_size=5, workers=0, tasks=["colours"], cache=cache)
    (entry,) = _entries(cache.root)
    with open(entry / "images.u8", "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING):
        again = evaluate_suite(model, suite, batch_size=5, workers=0, tasks=["colours"], cache=cache)
    assert "unreadable" in caplog.text and "decoding again" in caplog.text
    assert _metrics(again) == _metrics(first)
    assert (entry / "images.u8").stat().st_size == 24 * 32 * 32 * 3  # written again, whole
