"""DataComp's metrics on hand-made predictions, labels and metadata with answers worked out by hand (ties included),
and against scikit-learn where DataComp calls it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score

from datafilter.evaluate.kinds import classification_chance, winogavil_chance, winogavil_prompt
from datafilter.evaluate.metrics import (
    accuracy_metrics,
    group_metric,
    jaccard,
    macro_f1_recall,
    retrieval_metrics,
    topk,
    winogavil_choice,
    winogavil_metrics,
)
from datafilter.evaluate.scorers import SCORERS, MetadataError, get_scorer
from datafilter.evaluate.zeroshot import coverage, group_averages


def test_topk_breaks_ties_towards_the_lowest_index():
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    assert topk(scores, 3).tolist() == [[1, 2, 4], [0, 1, 2]]
    assert topk(scores, 1).tolist() == [[1], [0]]
    assert topk(scores, 10).shape == (2, 6)  # k above the candidates: all of them


def test_accuracy_metrics_by_hand():
    # 6 classes; top-5 rows; labels 0, 1, 2, 2, 5
    top = np.array([[0, 1, 2, 3, 4], [2, 1, 0, 3, 4], [2, 0, 1, 3, 4], [0, 1, 3, 4, 5], [0, 1, 2, 3, 4]])
    labels = np.array([0, 1, 2, 2, 5])
    m = accuracy_metrics(top, labels, num_classes=6)
    assert m["acc1"] == pytest.approx(2 / 5)  # samples 0 and 2
    assert m["acc5"] == pytest.approx(3 / 5)  # sample 1's label is second; sample 3's and 4's are not in the top 5
    # per class: class 0 1/1, class 1 0/1, class 2 1/2, class 5 0/1 -> mean over the 4 classes present
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, top[:, 0]))
    # fewer than 5 classes: DataComp reports no acc5
    assert accuracy_metrics(np.array([[1, 0], [0, 1]]), np.array([1, 1]), num_classes=2)["acc5"] is None


def test_mean_per_class_recall_matches_sklearn_on_random_predictions():
    rng = np.random.default_rng(0)
    labels, pred = rng.integers(0, 7, 200), rng.integers(0, 9, 200)  # predictions of classes never in the labels
    top = np.stack([pred] + [rng.integers(0, 9, 200) for _ in range(4)], 1)
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        expected = balanced_accuracy_score(labels, pred)
    assert accuracy_metrics(top, labels, 9)["mean_per_class_recall"] == pytest.approx(expected)


def test_macro_f1_over_the_classes_present_by_hand():
    # labels 0 1 1 2, predictions 0 0 1 3 (class 3 never occurs: it is not one of the averaged classes)
    labels, pred = np.array([0, 1, 1, 2]), np.array([0, 0, 1, 3])
    m = macro_f1_recall(pred, labels)
    # class 0: P 1/2 R 1 -> 2/3; class 1: P 1 R 1/2 -> 2/3; class 2: never predicted -> 0
    assert m["F1-macro_all"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert m["recall-macro_all"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["F1-macro_all"] == pytest.approx(f1_score(labels, pred, average="macro", labels=[0, 1, 2]))


def test_group_metric_skips_empty_groups_in_the_worst_and_names_groups_as_wilds():
    correct = np.array([1, 1, 0, 1, 0, 0, 0, 1])
    groups = np.array([0, 0, 1, 1, 3, 3, 3, 3])  # group 2 has no samples
    m = group_metric(correct, groups, "acc", "region")
    assert m["acc_region:0"] == 1.0 and m["acc_region:1"] == 0.5 and m["acc_region:3"] == 0.25
    assert m["acc_region:2"] == 0.0 and m["count_region:2"] == 0.0
    assert m["worst"] == 0.25
    with pytest.raises(ValueError, match="negative"):
        group_metric(correct, groups - 1, "acc", "region")


def _top(first):
    """Top-5 rows whose best class is ``first`` and whose other four are classes no sample has."""
    return np.concatenate([np.array(first)[:, None], np.full((len(first), 4), 99)], 1)


def _meta(*cols):
    return np.array(cols, dtype=float).T


def test_fmow_worst_region_and_worst_year():
    top = _top([0, 1, 0, 2, 0, 0, 0, 0, 3])
    labels = np.array([0, 1, 2, 2, 1, 2, 3, 0, 3])
    region = [0, 0, 1, 1, 2, 2, 2, 2, 4]
    year = [0, 0, 0, 1, 1, 1, 1, 1, 1]
    m = get_scorer("fmow")(top, labels, _meta(region, year, labels), num_classes=62)
    assert m["acc_worst_region"] == pytest.approx(0.25)  # region 2: 1 of 4; region 3 has no samples
    assert m["acc_worst_year"] == pytest.approx(0.5)  # year 0: 2/3, year 1: 3/6
    assert m["acc_avg"] == pytest.approx(5 / 9) == m["acc1"]
    assert "acc_wg" not in m  # renamed to acc_worst_year, as DataComp's evaluator does


def test_dollar_street_uses_top5_per_income_group():
    top = np.array([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [2, 0, 1, 3, 4], [0, 1, 2, 3, 4]])
    labels = np.array([0, 4, 2, 5])
    m = get_scorer("dollar_street")(top, labels, _meta([0, 0, 1, 1], [10, 11, 30, 31], [1, 2, 1, 0]), 58)
    assert m["acc_top5_income_ds:0"] == 1.0 and m["acc_top5_income_ds:1"] == 0.5
    assert m["acc_top5_wg"] == 0.5 and m["acc_top5_avg"] == 0.75
    assert m["acc1"] == 0.5


def test_geode_and_camelyon17_worst_group():
    top = _top([0, 1, 0, 0, 2])
    labels = np.array([0, 1, 1, 2, 2])
    g = get_scorer("geode")(top, labels, _meta([0, 0, 1, 1, 1], [7, 7, 3, 3, 4]), 3)
    assert g["acc_wg"] == pytest.approx(1 / 3) and g["acc_region:0"] == 1.0
    c = get_scorer("camelyon17")(top, labels, _meta([0] * 5, [5, 5, 2, 2, 2], labels), 3)
    assert c["acc_wg"] == pytest.approx(1 / 3) and c["acc_slide:5"] == 1.0 and c["count_slide:0"] == 0


def test_iwildcam_adds_macro_f1_without_metadata():
    top = _top([0, 0, 1, 2])
    m = get_scorer("iwildcam")(top, np.array([0, 1, 1, 2]), None, 182)
    assert m["F1-macro_all"] == pytest.approx(7 / 9)
    assert not SCORERS["iwildcam"].needs_metadata


def test_metadata_without_the_group_column_is_a_clear_error():
    top, labels = _top([0, 1]), np.array([0, 1])
    with pytest.raises(MetadataError, match=r"acc_worst_year needs metadata column 'year' \(column 1 of region, "
                                            r"year, y\), but the samples' .npy metadata has 1 column"):
        get_scorer("fmow")(top, labels, np.zeros((2, 1)), 62)
    with pytest.raises(MetadataError, match="column 'income_ds'"):
        get_scorer("dollar_street")(top, labels, None, 58)
    with pytest.raises(KeyError, match="did you mean 'fmow'"):
        get_scorer("fmov")


def test_retrieval_recall_at_k_with_ties_and_several_captions():
    img = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])  # images 0 and 3 are identical
    txt = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 1.0], [1.0, 0, 0],
                        [1.0, 0, 0]])
    text_image = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    m = retrieval_metrics(img, txt, text_image, ks=(1, 5, 10))
    # captions of image 3 retrieve image 0 first (tie, lowest index): 6 of 8 captions right at 1, all at 5
    assert m["image_retrieval_recall@1"] == pytest.approx(6 / 8) and m["image_retrieval_recall@5"] == 1.0
    # image 3 retrieves image 0's captions first: 3 of 4 images right at 1; at 5 its own captions are in
    assert m["text_retrieval_recall@1"] == pytest.approx(3 / 4) and m["text_retrieval_recall@5"] == 1.0
    assert m["mean_recall@1"] == pytest.approx(0.75)
    # computing the scores a chunk of queries at a time changes nothing
    assert retrieval_metrics(img, txt, text_image, chunk=3) == m


def test_an_image_without_captions_counts_as_a_miss():
    m = retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]), ks=(1,))
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["image_retrieval_recall@1"] == 1.0


def test_winogavil_prefers_the_later_candidate_among_ties_as_datacomp():
    scores = np.array([0.0, 0.7, 0.1, 0.2, 0.7, 0.3, 0.0, 0.7, 0.2, 0.1])
    truth = np.zeros(10, bool)
    truth[[1, 4]] = True
    chosen = winogavil_choice(scores, truth)
    assert np.flatnonzero(chosen).tolist() == [4, 7]  # np.argsort(scores)[-2:] with numpy's stable small sort
    assert jaccard(truth, chosen) == pytest.approx(1 / 3)


def test_winogavil_metrics_by_number_of_candidates():
    def inst(n, hits):
        t = np.zeros(n, bool)
        t[:2] = True
        s = np.zeros(n)
        s[hits] = 1.0
        return s, t

    m = winogavil_metrics([inst(5, [0, 1]), inst(6, [0, 2]), inst(10, [2, 3]), inst(12, [0, 1])])
    assert m["jaccard_score_5"] == 1.0 and m["jaccard_score_6"] == pytest.approx(1 / 3)
    assert m["jaccard_score_10"] == 0.0 and m["jaccard_score_12"] == 1.0
    assert m["jaccard_score_5-6"] == pytest.approx(2 / 3) and m["jaccard_score_10-12"] == pytest.approx(0.5)
    assert m["avg_jaccard_score"] == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)
    assert winogavil_metrics([inst(5, [0, 1])])["jaccard_score_10-12"] is None


def test_winogavil_prompt_and_chance():
    assert winogavil_prompt("Orange") == "An orange" and winogavil_prompt("dog") == "A dog"
    # 1 of 2 candidates right, choose 1: J is 1 with probability 1/2, else 0
    assert winogavil_chance([(np.zeros(2), np.array([True, False]))], "avg_jaccard_score") == pytest.approx(0.5)
    # 2 of 4: k=2 (1/6) J=1, k=1 (4/6) J=1/3, k=0 (1/6) J=0
    assert winogavil_chance([(np.zeros(4), np.array([1, 1, 0, 0], bool))], "avg_jaccard_score") == pytest.approx(
        1 / 6 + 4 / 6 / 3)


def test_chance_of_top5_metrics():
    assert classification_chance("acc_top5_wg", 58) == pytest.approx(5 / 58)
    assert classification_chance("acc1", 4) == 0.25 and classification_chance("acc5", 3) == 1.0


def test_group_averages_are_over_tasks_and_coverage_says_what_is_missing():
    from datafilter.evaluate.suite import Task

    tasks = {
        "imagenet": {"group": "imagenet", "main": 0.10, "chance": 0.001, "num_samples": 50},
        "shift_a": {"group": "imagenet_shift", "main": 0.20, "chance": 0.01, "num_samples": 10},
        "shift_b": {"group": "imagenet_shift", "main": 0.40, "chance": 0.03, "num_samples": 20},
        "other": {"group": None, "main": 0.80, "chance": 0.5, "num_samples": 5},
    }
    g = group_averages(tasks)
    assert g["ImageNet dist. shift"] == pytest.approx(0.30) and g["VTAB"] is None
    assert g["Average"] == pytest.approx(np.mean([0.1, 0.2, 0.4, 0.8]))  # over tasks, not over groups
    chosen = [Task(n, "classification", "acc1", None, r["group"]) for n, r in tasks.items()]
    chosen.append(Task("vtab_missing", "classification", "acc1", None, "vtab"))
    c = coverage(chosen, tasks, expected=38)
    assert not c["complete"] and c["note"] == "Average over the 4 of 38 tasks present"
    shift = c["columns"]["ImageNet dist. shift"]
    assert shift == {"scored": 2, "expected": 2, "chance": pytest.approx(0.02), "num_samples": 30, "not_scored": []}
    assert c["columns"]["VTAB"]["not_scored"] == ["vtab_missing"]
    assert coverage(chosen[:4], tasks)["complete"]


def test_tasks_with_the_same_prompts_share_one_zero_shot_classifier(tmp_path):
    """An ImageNet and its distribution shifts have the same class names and templates: one suite evaluation
    encodes those prompts once."""
    import torch

    from datafilter.evaluate.kinds import Classification, Encoder
    from datafilter.evaluate.suite import Task

    class Counting:
        device = "cpu"
        calls = 0

        def encode_texts(self, texts):
            Counting.calls += len(texts)
            return torch.stack([torch.tensor([float(len(t)), 1.0, float(t.count("a"))]) for t in texts])

    enc = Encoder(Counting())
    kind = Classification()
    a, b = (Task(n, "classification", "acc1", tmp_path) for n in ("imagenet", "imagenet_sketch"))
    first = kind.classifier(a, enc, ["cat", "dog"], ["a {c}.", "{c}"])
    assert Counting.calls == 4
    assert torch.equal(kind.classifier(b, enc, ["cat", "dog"], ["a {c}.", "{c}"]), first) and Counting.calls == 4
    kind.classifier(b, enc, ["cat", "bird"], ["a {c}.", "{c}"])  # other class names: encoded
    assert Counting.calls == 8
