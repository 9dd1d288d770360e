"""Streaming evaluation (a task is read a batch at a time, never whole) and decoding as DataComp's tasks decode:
RGB conversion as webdataset does it, class names and templates as CLIP_benchmark reads them, Hugging Face images
stored as files."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from datacomp_fixture import PaletteModel, retrieval_features, write_hf_split, write_wds_task
from datafilter.evaluate import SuiteError, load_suite
from datafilter.evaluate.kinds import Encoder, get_kind
from datafilter.evaluate.sources import WdsSource
from datafilter.evaluate.stream import task_batches
from datafilter.evaluate.zeroshot import evaluate_task


def _suite(tmp_path, tasks) -> object:
    (tmp_path / "suite.json").write_text(json.dumps({"name": "t", "tasks": tasks}))
    return load_suite(tmp_path)


def test_a_task_streams_a_batch_at_a_time(tmp_path, monkeypatch):
    n, block = 300, 16
    write_wds_task(tmp_path / "big", ["red", "green"], ["{c}"], [("red", 0, None)] * n, shards=2)
    task = _suite(tmp_path, [{"name": "big", "type": "classification", "metric": "acc1", "path": "big"}]).tasks[0]
    reads = {"n": 0}
    original = WdsSource.read

    def counting(self, part, blk):
        for item in original(self, part, blk):
            reads["n"] += 1
            yield item

    monkeypatch.setattr(WdsSource, "read", counting)
    encoder = Encoder(PaletteModel(), batch_size=block)
    seen = 0
    for i, batch in enumerate(task_batches(task, get_kind("classification"), encoder.decoder(task), block, workers=0)):
        seen += len(batch["counts"])
        # samples read so far: the batches handed out plus the one sample that closed this batch
        assert reads["n"] <= seen + 1, (i, reads["n"], seen)
        assert len(batch["counts"]) <= block
    assert seen == n == reads["n"]


def _rgba_png(rgba) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), rgba).save(buf, "PNG")
    return buf.getvalue()


def test_datacomp_tasks_decode_to_rgb_as_webdataset_does(tmp_path):
    import webdataset as wds

    data = _rgba_png((10, 200, 30, 0))  # fully transparent pixels that still carry a colour
    expected = np.asarray(wds.autodecode.ImageHandler("pil", extensions=["png"])("x.png", data))
    tasks = [{"name": f"t_{m}", "type": "classification", "metric": "acc1", "path": "t", "decode": m}
             for m in ("rgb", "white")] + [{"name": "t", "type": "classification", "metric": "acc1", "path": "t"}]
    suite = _suite(tmp_path, tasks)
    encoder = Encoder(PaletteModel())
    got = {t.name: encoder.decoder(t)(data) for t in suite.tasks}
    assert np.array_equal(got["t"].permute(1, 2, 0).numpy(), expected)  # the default for webdataset folders
    assert np.array_equal(got["t_rgb"].permute(1, 2, 0).numpy(), expected)
    assert (got["t_white"] == 255).all()  # the option that flattens transparency onto white


def test_class_names_and_templates_as_clip_benchmark_reads_them(tmp_path):
    write_wds_task(tmp_path / "t", ["red", "green"], ["x"], [("red", 0, None), ("green", 1, None)])
    (tmp_path / "t" / "classnames.txt").write_text("  red \n\n green\n\n")
    (tmp_path / "t" / "zeroshot_classification_templates.txt").write_text("a {c} {{thing}}\n\n{c}\n")
    task = _suite(tmp_path, [{"name": "t", "type": "classification", "metric": "acc1", "path": "t"}]).tasks[0]
    assert task.classnames() == ["red", "green"]  # blank lines dropped, as CLIP_benchmark 1.4 (DataComp's) does
    assert task.prompts("red", task.templates()) == ["a red {thing}", "red"]  # str.format(c=...)
    assert evaluate_task(PaletteModel(), task)["main"] == 1.0
    for bad, message in (("a {x}", r"has \{x\}; only \{c\}"), ("a {c", "cannot be filled")):
        (tmp_path / "t" / "zeroshot_classification_templates.txt").write_text(bad + "\n")
        with pytest.raises(SuiteError, match=message):
            task.templates()


def test_hf_images_stored_as_extracted_files_are_found_in_a_moved_cache(tmp_path):
    cache = tmp_path / "hf_cache"
    img = cache / "downloads" / "extracted" / "f00d" / "images" / "0.png"
    img.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), (30, 60, 220)).save(img)
    moved = "/elsewhere/hf_cache/downloads/extracted/f00d/images/0.png"  # where the preparing machine had it
    write_hf_split(cache, "nlphuji/flickr_1k_test_image_text_retrieval", retrieval_features(),
                   [{"image": {"bytes": None, "path": moved}, "caption": ["a blue sky"], "filename": "0.png"},
                    {"image": {"bytes": None, "path": str(img)}, "caption": ["blue again"], "filename": "1.png"}])
    task = _suite(tmp_path, [{"name": "flickr", "type": "retrieval", "metric": "mean_recall@1", "path": "hf_cache",
                              "format": "hf", "dataset": "nlphuji/flickr_1k_test_image_text_retrieval"}]).tasks[0]
    res = evaluate_task(PaletteModel(), task)
    assert res["num_samples"] == 2 and res["num_captions"] == 2
    assert res["metrics"]["image_retrieval_recall@1"] == 0.5  # both images are blue: the tie goes to image 0


def test_suite_rejects_what_a_format_cannot_hold(tmp_path):
    with pytest.raises(SuiteError, match="format hf holds retrieval and winogavil tasks, not classification"):
        _suite(tmp_path, [{"name": "x", "type": "classification", "metric": "acc1", "path": ".", "format": "hf",
                           "dataset": "a/b"}])
    with pytest.raises(SuiteError, match="format hf needs 'dataset'"):
        _suite(tmp_path, [{"name": "x", "type": "retrieval", "metric": "mean_recall@1", "path": ".", "format": "hf"}])
    with pytest.raises(SuiteError, match="metric for winogavil must be one of jaccard_score_10-12"):
        _suite(tmp_path, [{"name": "x", "type": "winogavil", "metric": "acc1", "path": ".", "format": "hf",
                           "dataset": "a/b"}])
