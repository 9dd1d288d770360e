"""Zero-shot metrics on fixed embeddings: pure functions, so they can be checked against brute force.

Conventions (the same as CLIP_benchmark's, made explicit):
  * scores are cosine similarities of L2-normalised embeddings;
  * top-1 is the arg-max, and a tie goes to the lowest index (class order, caption order, image order), so a
    metric never depends on the sort algorithm;
  * a class's embedding is the normalised mean of its normalised template embeddings (prompt ensembling);
  * mean per-class recall averages the recall of the classes that occur in the test set;
  * retrieval with several captions per image: an image query is right when its top caption is any of its own
    captions; a caption query is right when its top image is its image. ``mean_recall@1`` is the mean of the two.
"""

from __future__ import annotations

import numpy as np
import torch


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def class_embeddings(template_embeddings: torch.Tensor) -> torch.Tensor:
    """``[classes, templates, dim]`` -> ``[classes, dim]``: the normalised mean of normalised template embeddings."""
    if template_embeddings.ndim != 3:
        raise ValueError(f"expected [classes, templates, dim], got {tuple(template_embeddings.shape)}")
    return _normalise(_normalise(template_embeddings).mean(dim=1))


def top1(scores: torch.Tensor) -> torch.Tensor:
    """Arg-max over the last dimension; torch documents that ties go to the first maximal index."""
    return scores.argmax(dim=-1)


def classification_metrics(image_emb: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy and mean per-class recall of zero-shot classification."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) != len(image_emb):
        raise ValueError(f"{len(image_emb)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_emb)):
        raise ValueError(f"labels must lie in 0..{len(class_emb) - 1}")
    pred = top1(_normalise(image_emb) @ _normalise(class_emb).T)
    correct = (pred == labels).float()
    present = torch.unique(labels)
    recalls = torch.stack([correct[labels == c].mean() for c in present]) if len(present) else torch.zeros(0)
    return {
        "acc1": float(correct.mean()) if len(labels) else float("nan"),
        "mean_per_class_recall": float(recalls.mean()) if len(recalls) else float("nan"),
    }


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor) -> dict[str, float]:
    """Recall@1 both ways when caption ``j`` describes image ``text_image[j]`` (several captions per image allowed)."""
    text_image = torch.as_tensor(text_image, dtype=torch.long)
    if len(text_image) != len(text_emb):
        raise ValueError(f"{len(text_emb)} captions but {len(text_image)} caption-to-image indices")
    if len(text_image) and (text_image.min() < 0 or text_image.max() >= len(image_emb)):
        raise ValueError(f"caption-to-image indices must lie in 0..{len(image_emb) - 1}")
    scores = _normalise(image_emb) @ _normalise(text_emb).T  # [images, captions]
    text_to_image = (top1(scores.T) == text_image).float()  # caption queries retrieve images
    image_to_text = (text_image[top1(scores)] == torch.arange(len(image_emb))).float()  # image queries
    has_caption = torch.bincount(text_image, minlength=len(image_emb)) > 0
    i2t = float(image_to_text[has_caption].mean()) if has_caption.any() else float("nan")
    t2i = float(text_to_image.mean()) if len(text_to_image) else float("nan")
    return {"image_retrieval_recall@1": t2i, "text_retrieval_recall@1": i2t, "mean_recall@1": (t2i + i2t) / 2}


def retrieval_chance(num_images: int, text_image: np.ndarray) -> float:
    """Expected ``mean_recall@1`` of random scores: 1/images for captions, own captions / all captions for images."""
    counts = np.bincount(np.asarray(text_image), minlength=num_images)
    counts = counts[counts > 0]
    return float((1 / num_images + (counts / len(text_image)).mean()) / 2)
