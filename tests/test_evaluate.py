"""Zero-shot evaluation: metrics against brute force, suite reading, group averages, resumable runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import COLOURS, SHAPES, shape_image
from datacomp_fixture import write_tar
from datafilter.evaluate import (
    SuiteError,
    class_embeddings,
    classification_metrics,
    evaluate_suite,
    group_averages,
    load_suite,
    retrieval_metrics,
)

torch.set_num_threads(1)


# --- a tiny suite in CLIP_benchmark's layout -------------------------------------------------------------------------
def write_classification_task(path: Path, classnames: list[str], templates: list[str],
                              samples: list[tuple[bytes, int]], shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (path / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    per = -(-len(samples) // shards)
    for s in range(shards):
        chunk = samples[s * per : (s + 1) * per]
        write_tar(path / "test" / f"{s}.tar", [{"png": img, "cls": str(label).encode()} for img, label in chunk])
    (path / "test" / "nshards.txt").write_text(f"{shards}\n")
    return path


def write_retrieval_task(path: Path, samples: list[tuple[bytes, list[str]]]) -> Path:
    write_tar(path / "test" / "0.tar", [{"png": img, "txt": "\n".join(caps).encode()} for img, caps in samples])
    (path / "test" / "nshards.txt").write_text("1\n")
    return path


def write_toy_suite(path: Path, per_combo: int = 2, seed: int = 1000) -> Path:
    """Three tasks on coloured shapes (images unseen by the toy pool: other noise seeds): colour+shape
    classification, colour classification (prompt ensemble over shapes), and caption retrieval."""
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    names = [f"{c} {s}" for c, s in combos]
    samples = [(shape_image(c, s, seed=seed + k * 100 + i), i) for k in range(per_combo)
               for i, (c, s) in enumerate(combos)]
    write_classification_task(path / "things", names, ["a {c}", "{c}"], samples, shards=2)
    colours = list(COLOURS)
    write_classification_task(path / "colours", colours, [f"a {{c}} {s}" for s in SHAPES],
                              [(img, colours.index(names[i].split()[0])) for img, i in samples])
    write_retrieval_task(path / "captions", [(shape_image(c, s, seed=seed + 7_000 + i), [f"a {c} {s}", f"{c} {s}"])
                                             for i, (c, s) in enumerate(combos)])
    suite = {"name": "toy", "version": "1", "tasks": [
        {"name": "things", "type": "classification", "group": "imagenet", "metric": "acc1", "path": "things"},
        {"name": "colours", "type": "classification", "group": "vtab", "metric": "mean_per_class_recall",
         "path": "colours"},
        {"name": "captions", "type": "retrieval", "group": "retrieval", "metric": "mean_recall@1",
         "path": "captions"},
    ]}
    (path / "suite.json").write_text(json.dumps(suite))
    return path


# --- metrics against brute force -------------------------------------------------------------------------------------
def _brute_classification(img: np.ndarray, labels: np.ndarray, cls: np.ndarray) -> tuple[float, float]:
    correct = []
    for x, y in zip(img, labels):
        scores = [float(np.dot(x, c)) for c in cls]
        best = max(scores)
        pred = scores.index(best)  # first maximal index
        correct.append(pred == y)
    correct = np.array(correct)
    recalls = [correct[labels == c].mean() for c in sorted(set(labels.tolist()))]
    return float(correct.mean()), float(np.mean(recalls))


def test_class_embeddings_are_normalised_mean_of_normalised_templates():
    t = torch.tensor([[[3.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [2.0, 2.0]]])
    got = class_embeddings(t)
    expected0 = np.array([1.0, 1.0]) / np.sqrt(2)  # mean of (1,0) and (0,1), normalised: not weighted by length
    np.testing.assert_allclose(got[0].numpy(), expected0, atol=1e-6)
    np.testing.assert_allclose(got[1].numpy(), expected0, atol=1e-6)


def test_classification_metrics_match_brute_force_with_ties_and_imbalance():
    rng = np.random.default_rng(0)
    # Low-resolution embeddings make exact ties common.
    img = rng.integers(-2, 3, (60, 4)).astype(np.float32)
    img[np.all(img == 0, axis=1)] = 1
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cls = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1]], np.float32)  # classes 0 and 2 tie
    cls /= np.linalg.norm(cls, axis=1, keepdims=True)
    labels = np.array([0] * 30 + [1] * 20 + [2] * 5 + [3] * 5)
    got = classification_metrics(torch.from_numpy(img), torch.from_numpy(labels), torch.from_numpy(cls))
    acc, mpcr = _brute_classification(img, labels, cls)
    assert got["acc1"] == pytest.approx(acc)
    assert got["mean_per_class_recall"] == pytest.approx(mpcr)
    # A tie between classes 0 and 2 always goes to 0: class 2 is never predicted.
    assert acc != mpcr


def test_mean_per_class_recall_weights_classes_equally():
    cls = torch.eye(3)
    img = torch.tensor([[1.0, 0, 0]] * 8 + [[0, 1.0, 0], [1.0, 0, 0]])  # class 0: 8/8 right, class 1: 1/2 right
    labels = torch.tensor([0] * 8 + [1, 1])
    m = classification_metrics(img, labels, cls)
    assert m["acc1"] == pytest.approx(0.9)
    assert m["mean_per_class_recall"] == pytest.approx((1.0 + 0.5) / 2)  # class 2 has no samples: not counted


def test_retrieval_metrics_match_brute_force_with_several_captions_per_image():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(7, 5)).astype(np.float32)
    text_image = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 6])
    txt = img[text_image] + rng.normal(scale=1.0, size=(len(text_image), 5)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    txt[3] = txt[1]  # an exact tie between captions of images 0 and 2
    got = retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(text_image))
    sims = img @ txt.T
    t2i = np.mean([int(np.argmax(sims[:, j])) == text_image[j] for j in range(len(txt))])
    i2t = np.mean([text_image[int(np.argmax(sims[i]))] == i for i in range(len(img))])
    assert got["image_retrieval_recall@1"] == pytest.approx(t2i)
    assert got["text_retrieval_recall@1"] == pytest.approx(i2t)
    assert got["mean_recall@1"] == pytest.approx((t2i + i2t) / 2)


def test_retrieval_counts_any_own_caption_as_a_hit():
    img = torch.eye(2)
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # image 0 has captions 0 and 1; caption 1 matches it
    m = retrieval_metrics(img, txt, torch.tensor([0, 0, 1]))
    # image 0's best caption is caption 1 (its own); image 1's best is caption 0 (first of a tie, image 0's): 1/2.
    assert m["text_retrieval_recall@1"] == pytest.approx(0.5)
    # captions: 0 -> image 1 (wrong), 1 -> image 0 (right), 2 -> image 1 (right)
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 3)


def test_group_averages_follow_datacomp_columns():
    tasks = {
        "imagenet": {"group": "imagenet", "main": 0.10},
        "shift_a": {"group": "imagenet_shift", "main": 0.20},
        "shift_b": {"group": "imagenet_shift", "main": 0.40},
        "vtab_a": {"group": "vtab", "main": 0.50},
        "other": {"group": None, "main": 0.80},
    }
    g = group_averages(tasks)
    assert g["ImageNet"] == pytest.approx(0.10)
    assert g["ImageNet dist. shift"] == pytest.approx(0.30)
    assert g["VTAB"] == pytest.approx(0.50)
    assert g["Retrieval"] is None
    assert g["Average"] == pytest.approx(np.mean([0.1, 0.2, 0.4, 0.5, 0.8]))  # over tasks, not over groups


# --- suites ----------------------------------------------------------------------------------------------------------
def test_suite_errors_name_the_file_and_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="suite.json"):
        load_suite(tmp_path)
    (tmp_path / "suite.json").write_text(json.dumps({"name": "x", "tasks": [
        {"name": "a", "type": "classification", "metric": "mean_recall@1", "path": "a"}]}))
    with pytest.raises(SuiteError, match=r"suite.json: task 0 \(a\): metric for classification"):
        load_suite(tmp_path)
    (tmp_path / "suite.json").write_text(json.dumps({"name": "x", "tasks": [
        {"name": "a", "type": "classification", "group": "imgnet", "metric": "acc1", "path": "a"}]}))
    with pytest.raises(SuiteError, match="group must be one of"):
        load_suite(tmp_path)
    (tmp_path / "suite.json").write_text(json.dumps({"name": "x", "tasks": [
        {"name": "a", "type": "classification", "metric": "acc1", "path": "a"}]}))
    suite = load_suite(tmp_path)
    with pytest.raises(SuiteError, match="task folder .*a not found"):
        suite.tasks[0].check()
    (tmp_path / "a").mkdir()
    with pytest.raises(SuiteError, match="nshards.txt missing"):
        suite.tasks[0].check()


class ColourModel:
    """A stand-in for a loaded CLIP with known embeddings: images by mean colour, texts by the colour they name."""

    name = "colour-model"
    checkpoint_id = "fixed"
    embed_dim = 4

    def preprocess(self, img):
        return torch.from_numpy(np.asarray(img, np.float32)).permute(2, 0, 1)

    def encode_images(self, x):
        ref = torch.tensor([COLOURS[c] for c in COLOURS], dtype=torch.float32)
        idx = torch.cdist(self._object_colour(x), ref).argmin(1)
        return torch.nn.functional.one_hot(idx, 4).float()

    @staticmethod
    def _object_colour(x):
        # the shape's colour: the mean of the non-white pixels
        mask = (x.sum(dim=1, keepdim=True) < 600).float()
        return (x * mask).sum(dim=(2, 3)) / mask.sum(dim=(2, 3)).clamp(min=1)

    def encode_texts(self, texts):
        out = torch.zeros(len(texts), 4)
        for i, t in enumerate(texts):
            for k, c in enumerate(COLOURS):
                if c in t:
                    out[i, k] = 1
        return out


def test_evaluate_suite_with_a_known_model_and_resume(tmp_path):
    suite = load_suite(write_toy_suite(tmp_path / "suite"))
    model = ColourModel()
    out = tmp_path / "results.json"
    res = evaluate_suite(model, suite, out=out, batch_size=5)
    # colours are perfectly separated; the 12-way task only by colour: 3 shapes tie, the first wins -> 1/3.
    assert res["tasks"]["colours"]["main"] == pytest.approx(1.0)
    assert res["tasks"]["things"]["metrics"]["acc1"] == pytest.approx(1 / 3)
    assert res["tasks"]["things"]["chance"] == pytest.approx(1 / 12)
    assert res["tasks"]["things"]["num_samples"] == 24
    assert res["tasks"]["captions"]["num_captions"] == 24
    assert res["groups"]["VTAB"] == pytest.approx(1.0)
    assert res["suite"]["name"] == "toy" and res["suite"]["id"] == suite.suite_id
    assert res["model"] == "colour-model" and res["checkpoint_id"] == "fixed"
    assert json.loads(out.read_text())["groups"] == res["groups"]
    assert not Path(f"{out}.partial.json").exists()

    # A run killed after its first task resumes there: the finished task is not computed again.
    partial = Path(f"{tmp_path / 'again.json'}.partial.json")
    partial.write_text(json.dumps({"identity": {"model": "colour-model", "checkpoint_id": "fixed",
                                                "suite_id": suite.suite_id, "precision": "auto"},
                                   "tasks": {"things": {**res["tasks"]["things"], "main": 0.123}}}))
    again = evaluate_suite(ColourModel(), suite, out=tmp_path / "again.json")
    assert again["tasks"]["things"]["main"] == 0.123
    assert again["tasks"]["colours"]["main"] == pytest.approx(1.0)


def test_evaluate_command_creates_the_output_folder_and_keeps_tasks_decoded(tmp_path, capsys, monkeypatch):
    from datafilter.cli import main
    from datafilter.models import create_model, save_checkpoint

    monkeypatch.setenv("DATAFILTER_CACHE", str(tmp_path / "cache"))

    suite = write_toy_suite(tmp_path / "suite", per_combo=1)
    ckpt = save_checkpoint(create_model("datafilter-nano-vit")[0], "datafilter-nano-vit", tmp_path / "ckpt.pt")
    out = tmp_path / "new" / "deeper" / "eval.json"
    jsonl = tmp_path / "other" / "eval_results.jsonl"
    assert main(["evaluate", "--model", "datafilter-nano-vit", "--checkpoint", str(ckpt), "--suite", str(suite),
                 "--out", str(out), "--datacomp-jsonl", str(jsonl), "--workers", "0", "--tasks", "captions"]) == 0
    assert set(json.loads(out.read_text())["tasks"]) == {"captions"}
    line = json.loads(jsonl.read_text())
    assert line["key"] == "captions" and "main_metric" in line["metrics"]
    assert "Retrieval" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "eval").iterdir())) == 1
    assert main(["evaluate", "--model", "datafilter-nano-vit", "--checkpoint", str(ckpt), "--suite", str(suite),
                 "--out", str(tmp_path / "off.json"), "--workers", "0", "--tasks", "things",
                 "--decoded-cache-gb", "0"]) == 0
    assert len(list((tmp_path / "cache" / "eval").iterdir())) == 1  # off: nothing kept
