"""Agreement with CLIP_benchmark, the code DataComp evaluates with: our fp32 scores equal its scores on tasks both
read, and every micro task reads with its dataset builder (or, where it is not installed, with a reader of the same
layout rules: ``nshards.txt``, ``dataset_type.txt``, class names and templates)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import need_sources
from test_evaluate import write_toy_suite
from datafilter.evaluate import load_suite
from datafilter.evaluate.kinds import get_kind
from datafilter.evaluate.zeroshot import evaluate_task

torch.set_num_threads(1)


def _clip_benchmark():
    try:
        from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
        from clip_benchmark.metrics import zeroshot_classification as zsc, zeroshot_retrieval as zsr
    except ImportError:
        return None
    return build_dataset, image_captions_collate_fn, zsc, zsr


def test_fp32_scores_equal_clip_benchmarks(tmp_path):
    cb = _clip_benchmark()
    if cb is None:
        pytest.skip("clip_benchmark is not installed")
    build_dataset, collate, zsc, zsr = cb
    from sklearn.metrics import balanced_accuracy_score

    from datafilter.models import ModelSpec, load_model

    suite = load_suite(write_toy_suite(tmp_path / "suite"))
    (tmp_path / "suite" / "captions" / "dataset_type.txt").write_text("retrieval\n")
    model = load_model(ModelSpec("datafilter-micro-vit"), seed=3)  # random weights: scores are what they are
    m, tok = model.model, model.tokenizer
    for task in suite.tasks:
        ours = evaluate_task(model, task, batch_size=7)["metrics"]
        ds = build_dataset(f"wds/{task.name}", root=str(task.path), transform=model.preprocess, split="test",
                           download=False, task=f"zeroshot_{task.type}")
        if task.type == "classification":
            loader = torch.utils.data.DataLoader(ds.batched(7), batch_size=None)
            clf = zsc.zero_shot_classifier(m, tok, ds.classes, ds.templates, "cpu", amp=False)
            logits, target = zsc.run_classification(m, clf, loader, "cpu", amp=False)
            # zsc.accuracy's own formula (its float() of a 1-element array fails under numpy 2.4)
            ks = (1, 5) if len(ds.classes) >= 5 else (1,)  # DataComp's wds_eval: acc5 only with 5 classes or more
            correct = logits.topk(max(ks), 1, True, True)[1].t().eq(target.view(1, -1))
            accs = [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in ks]
            theirs = {"acc1": accs[0], "mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(1))}
            if len(ks) == 2:
                theirs["acc5"] = accs[1]
            else:
                assert ours["acc5"] is None
        else:
            loader = torch.utils.data.DataLoader(ds, batch_size=7, collate_fn=collate)
            theirs = zsr.evaluate(m, loader, tok, "cpu", amp=False, recall_k_list=[1, 5, 10])
        for k, v in theirs.items():
            assert ours[k] == pytest.approx(v, abs=5e-5), (task.name, k)  # 0.00 points


def _same_layout_reader(folder: Path, split: str = "test"):
    """What CLIP_benchmark's ``build_wds_dataset`` yields, by its rules: retrieval when ``dataset_type.txt`` says so
    (caption lines), else classification (``.cls``) with ``classes`` and ``templates`` from the text files."""
    import webdataset as wds

    n = int((folder / split / "nshards.txt").read_text())
    kind_file = folder / "dataset_type.txt"
    kind = kind_file.read_text().strip().lower() if kind_file.exists() else "classification"
    ds = wds.WebDataset([str(folder / split / f"{i}.tar") for i in range(n)], shardshuffle=False,
                        empty_check=False).decode("pil")
    if kind == "retrieval":
        ds = ds.to_tuple("png", "txt").map_tuple(None, str.splitlines)
        ds.classes = ds.templates = None
    else:
        ds = ds.to_tuple("png", "cls")
        ds.classes = [x.strip() for x in (folder / "classnames.txt").read_text().splitlines() if x.strip()]
        ds.templates = [x.strip() for x in (folder / "zeroshot_classification_templates.txt").read_text().splitlines()
                        if x.strip()]
    return ds


@pytest.mark.parametrize("reader", ["clip_benchmark", "same_layout"])
def test_every_micro_task_reads_with_clip_benchmarks_builder(nano_builds, reader):
    need_sources()
    cb = _clip_benchmark() if reader == "clip_benchmark" else None
    if reader == "clip_benchmark" and cb is None:
        pytest.skip("clip_benchmark is not installed: the same-layout reader stands in")
    suite_dir = nano_builds["suite"]
    meta = json.loads((suite_dir / "suite.json").read_text())
    suite = load_suite(suite_dir)
    assert {t.type for t in suite.tasks} == {"classification", "retrieval"}
    for entry, task in zip(meta["tasks"], suite.tasks):
        if cb is not None:
            ds = cb[0](f"wds/{task.name}", root=str(task.path), transform=None, split="test", download=False,
                       task=f"zeroshot_{task.type}")
        else:
            ds = _same_layout_reader(task.path)
        theirs = [y for _, y in ds]
        kind = get_kind(task.type)
        ours = [kind.parse(r, task) for part in task.source().parts(1) for _, r in task.source().read(part, 64)]
        assert len(theirs) == len(ours) == entry["num_samples"], task.name
        if task.type == "retrieval":
            assert (task.path / "dataset_type.txt").read_text().strip() == "retrieval"
            assert theirs == ours  # caption lists, read as retrieval
        else:
            assert ds.classes == task.classnames() and ds.templates == task.templates(), task.name
            assert [int(y) for y in theirs] == [label for label, _ in ours]
            assert np.array_equal(ds.classes, task.classnames())
