"""Zero-shot metrics, computed as DataComp's ``eval_utils`` compute them: pure functions of predictions, labels and
task metadata, so that each can be checked against a hand-computed answer.

Conventions (DataComp's, made explicit where its code leaves them to a sort algorithm):
  * scores are cosine similarities of L2-normalised embeddings;
  * a class's embedding is the normalised mean of its normalised template embeddings (prompt ensembling);
  * top-k takes the k highest scores and a tie goes to the lowest index (class, caption or image order), so a
    metric never depends on the sort algorithm (``torch.topk`` documents no order for ties);
  * ``acc1``/``acc5`` as CLIP_benchmark's ``accuracy`` (``acc5`` only with at least 5 classes, else ``None``, as
    DataComp's ``wds_eval`` reports it); ``mean_per_class_recall`` is scikit-learn's ``balanced_accuracy_score``:
    the mean recall of the classes that occur in the labels;
  * worst-group metrics group samples by one column of the task's metadata (WILDS' ``CombinatorialGrouper`` on a
    single field: the column's integer value is the group) and take the minimum over groups that have samples;
  * ``F1-macro_all`` and ``recall-macro_all`` are scikit-learn's macro averages over the classes present in the
    labels (WILDS' ``F1``/``Recall`` with ``labels=unique(y_true)``), a class never predicted scoring 0;
  * retrieval recall@k as CLIP_benchmark's ``zeroshot_retrieval``: a caption query is right when its image is among
    the k best images; an image query is right when any of its captions is among the k best captions, and an image
    without captions counts as a miss; ``mean_recall@1`` is the mean of the two recall@1 (DataComp's main metric);
  * WinoGAViL: per instance, the cue's ``n`` most similar candidates (``n`` = the number of true associations) are
    chosen and scored by the Jaccard index with the associations. Among equal scores the later candidate is chosen,
    as DataComp's ``np.argsort(scores)[-n:]`` does (numpy's sort is stable for arrays of this size).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
import torch


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def class_embeddings(template_embeddings: torch.Tensor) -> torch.Tensor:
    """``[classes, templates, dim]`` -> ``[classes, dim]``: the normalised mean of normalised template embeddings."""
    if template_embeddings.ndim != 3:
        raise ValueError(f"expected [classes, templates, dim], got {tuple(template_embeddings.shape)}")
    return _normalise(_normalise(template_embeddings).mean(dim=1))


def topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores along the last dimension, best first; ties go to the lowest index."""
    k = min(k, scores.shape[-1])
    if k == 1:
        return scores.argmax(dim=-1, keepdim=True)  # torch documents the first maximal index
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


# --- classification ---------------------------------------------------------------------------------------------------
def accuracy_metrics(top: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float | None]:
    """``acc1``, ``acc5`` and ``mean_per_class_recall`` from each sample's top-5 predictions ``top`` ``[n, >=1]``."""
    top, labels = np.asarray(top), np.asarray(labels)
    if len(labels) == 0:
        raise ValueError("no samples")
    pred = top[:, 0]
    acc5 = None
    if num_classes >= 5:
        if top.shape[1] < 5:
            raise ValueError(f"acc5 needs the top 5 predictions, got {top.shape[1]}")
        acc5 = float((top[:, :5] == labels[:, None]).any(axis=1).mean())
    return {"acc1": float((pred == labels).mean()), "acc5": acc5,
            "mean_per_class_recall": mean_per_class_recall(pred, labels)}


def mean_per_class_recall(pred: np.ndarray, labels: np.ndarray) -> float:
    """Balanced accuracy: the mean over the classes present in ``labels`` of the share of their samples predicted
    right (predictions of other classes are simply wrong)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    classes, inverse = np.unique(labels, return_inverse=True)
    right = np.bincount(inverse, weights=(pred == labels).astype(float), minlength=len(classes))
    return float((right / np.bincount(inverse, minlength=len(classes))).mean())


def macro_f1_recall(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """WILDS' ``F1-macro_all`` and ``recall-macro_all`` (scikit-learn, over the classes present in the labels)."""
    from sklearn.metrics import f1_score, recall_score

    present = np.unique(labels)
    with warnings.catch_warnings():  # a class never predicted has no precision: scored 0, as WILDS scores it
        warnings.simplefilter("ignore")
        f1 = f1_score(labels, pred, average="macro", labels=present, zero_division=0)
        recall = recall_score(labels, pred, average="macro", labels=present, zero_division=0)
    return {"F1-macro_all": float(f1), "recall-macro_all": float(recall)}


def group_metric(correct: np.ndarray, groups: np.ndarray, name: str, field: str) -> dict[str, float]:
    """Per-group means of ``correct`` (0/1 per sample) for groups ``0..max(groups)`` named as WILDS names them
    (``{name}_{field}:{g}`` and ``count_{field}:{g}``; an empty group scores 0), and ``worst``: the lowest mean over
    groups with samples."""
    correct, groups = np.asarray(correct, dtype=float), np.asarray(groups)
    if len(groups) == 0:
        raise ValueError("no samples")
    if groups.min() < 0:
        raise ValueError(f"metadata column {field!r} has negative values ({groups.min()}); groups are 0, 1, ...")
    n = int(groups.max()) + 1
    counts = np.bincount(groups, minlength=n)
    sums = np.bincount(groups, weights=correct, minlength=n)
    means = np.divide(sums, counts, out=np.zeros(n), where=counts > 0)
    out: dict[str, float] = {}
    for g in range(n):
        out[f"{name}_{field}:{g}"] = float(means[g])
        out[f"count_{field}:{g}"] = float(counts[g])
    out["worst"] = float(means[counts > 0].min())
    return out


# --- retrieval --------------------------------------------------------------------------------------------------------
def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Recall@k both ways when caption ``j`` describes image ``text_image[j]`` (several captions per image allowed).

    Scores are computed ``chunk`` queries at a time, so memory stays ``chunk x max(images, captions)`` however large
    the task. A k above the number of candidates is taken as all of them.
    """
    text_image = torch.as_tensor(text_image, dtype=torch.long)
    if len(text_image) != len(text_emb):
        raise ValueError(f"{len(text_emb)} captions but {len(text_image)} caption-to-image indices")
    if len(image_emb) == 0 or len(text_emb) == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if text_image.min() < 0 or text_image.max() >= len(image_emb):
        raise ValueError(f"caption-to-image indices must lie in 0..{len(image_emb) - 1}")
    img, txt = _normalise(image_emb), _normalise(text_emb)
    kmax = max(ks)
    # caption queries: is the caption's image among the k best images?
    t2i = torch.zeros(len(ks), len(txt))
    for s in range(0, len(txt), chunk):
        best = topk(txt[s : s + chunk] @ img.T, kmax)
        hit = best == text_image[s : s + chunk, None]
        for i, k in enumerate(ks):
            t2i[i, s : s + chunk] = hit[:, :k].any(dim=1).float()
    # image queries: is any of the image's captions among the k best captions?
    i2t = torch.zeros(len(ks), len(img))
    for s in range(0, len(img), chunk):
        best = topk(img[s : s + chunk] @ txt.T, kmax)
        hit = text_image[best] == torch.arange(s, s + len(best))[:, None]
        for i, k in enumerate(ks):
            i2t[i, s : s + chunk] = hit[:, :k].any(dim=1).float()
    out: dict[str, float] = {}
    for i, k in enumerate(ks):
        out[f"image_retrieval_recall@{k}"] = float(t2i[i].mean())
        out[f"text_retrieval_recall@{k}"] = float(i2t[i].mean())
    if 1 in ks:
        out["mean_recall@1"] = (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"]) / 2
    return out


def retrieval_chance(num_images: int, text_image: np.ndarray) -> float:
    """Expected ``mean_recall@1`` of random scores: 1/images for captions, own captions / all captions for images."""
    counts = np.bincount(np.asarray(text_image), minlength=num_images)
    return float((1 / num_images + (counts / len(text_image)).mean()) / 2)


# --- WinoGAViL --------------------------------------------------------------------------------------------------------
def winogavil_choice(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The candidates chosen for one instance: the ``truth.sum()`` best scores, later candidates first among ties."""
    scores, truth = np.asarray(scores), np.asarray(truth, bool)
    n = int(truth.sum())
    chosen = np.zeros(len(scores), bool)
    if n:
        chosen[np.argsort(scores, kind="stable")[-n:]] = True
    return chosen


def jaccard(truth: np.ndarray, chosen: np.ndarray) -> float:
    """Jaccard index of two boolean vectors (0 when both are empty, as scikit-learn's ``jaccard_score``)."""
    union = np.logical_or(truth, chosen).sum()
    return float(np.logical_and(truth, chosen).sum() / union) if union else 0.0


def winogavil_metrics(instances: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """DataComp's WinoGAViL metrics from ``(scores, truth)`` per instance: the mean Jaccard index overall, per number
    of candidates (5, 6, 10, 12) and for 5-6 and 10-12 candidates (``None`` where no instance has that many)."""
    if not instances:
        raise ValueError("no instances")
    scores = np.array([jaccard(np.asarray(t, bool), winogavil_choice(s, t)) for s, t in instances])
    sizes = np.array([len(s) for s, _ in instances])

    def mean(mask: np.ndarray) -> float | None:
        return float(scores[mask].mean()) if mask.any() else None

    return {"avg_jaccard_score": mean(np.ones(len(scores), bool)),
            "jaccard_score_5": mean(sizes == 5), "jaccard_score_6": mean(sizes == 6),
            "jaccard_score_10": mean(sizes == 10), "jaccard_score_12": mean(sizes == 12),
            "jaccard_score_5-6": mean(sizes <= 6), "jaccard_score_10-12": mean(sizes >= 10)}


# --- on embeddings (kept for callers that have all embeddings at hand) --------------------------------------------------
def classification_metrics(image_emb: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor) -> dict[str, Any]:
    """Zero-shot classification metrics of image embeddings against class embeddings."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) != len(image_emb):
        raise ValueError(f"{len(image_emb)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_emb)):
        raise ValueError(f"labels must lie in 0..{len(class_emb) - 1}")
    top = topk(_normalise(image_emb) @ _normalise(class_emb).T, 5)
    return accuracy_metrics(top.numpy(), labels.numpy(), len(class_emb))
