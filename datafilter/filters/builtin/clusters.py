"""Cluster-based filters: DataComp's image-based filter (alone and intersected with the CLIP score) and SemDeDup
(Abbas et al., "SemDeDup: Data-efficient learning at web-scale through semantic deduplication")."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from datafilter.filters.base import Filter
from datafilter.filters.language import FASTTEXT, fasttext_tokens, language_mask
from datafilter.filters.builtin.scores import check_fraction_or_threshold, clip_score_mask
from datafilter.filters.ops import (gather_float32, kmeans, nearest_centroid, nearest_centroid_pca, pca_kmeans,
                                    sample_rows)
from datafilter.filters.view import FilterView

log = logging.getLogger(__name__)

# DataComp clusters its 12.8M-sample small pool into 100k clusters: one cluster per 128 samples.
SAMPLES_PER_CLUSTER = 128


@dataclass(frozen=True)
class ImageBasedConfig:
    """``clusters``: k-means clusters (0: one per 128 pool samples, DataComp's 100k for 12.8M). ``kmeans_sample``:
    train k-means on this many random valid samples (0: all of them, DataComp's setting); ``niter``: k-means
    iterations (DataComp: 20). Every sample is then assigned to its nearest centroid whatever the sample.
    ``pca_dim`` > 0: train k-means in a PCA projection of that many dimensions (full-dimensional centroids are the
    cluster means) and find each sample's nearest centroid among the ``candidates`` best in the projection, by the
    exact full-dimensional inner product; 0 is DataComp's exhaustive setting.
    ``caption_filter``: DataComp's image-based baseline first drops captions that are not English (fastText,
    ``language_model``) or have fewer than two words (fastText's tokens) or six characters."""

    reference: str = "imagenet_train"
    clusters: int = 0
    kmeans_sample: int = 0
    niter: int = 20
    pca_dim: int = 0
    candidates: int = 16
    seed: int = 0
    caption_filter: bool = True
    language: str = "en"
    language_model: str = FASTTEXT


def caption_filter_mask(view: FilterView, language: str, language_model: str = FASTTEXT) -> np.ndarray:
    """DataComp's ``caption_filter``: more than one fastText token, more than five characters, and (unless
    ``language`` is '') the predicted language."""
    texts = view.text()
    ok = np.fromiter(((len(fasttext_tokens(t)) > 1) and (len(t) > 5) for t in texts), bool, len(texts))
    if language:
        idx = np.flatnonzero(ok)
        ok[idx] = language_mask([texts[i] for i in idx], language, language_model)
    return ok


def target_cluster_mask(flt: Filter, view: FilterView, cfg: ImageBasedConfig) -> np.ndarray:
    """Rows whose nearest centroid is the nearest centroid of some reference embedding."""
    valid = flt.drop_invalid(view)
    rows = np.flatnonzero(valid)
    keep = valid.copy()
    if cfg.caption_filter:
        with flt.phase("caption_filter"):
            ok = caption_filter_mask(view, cfg.language, cfg.language_model)
            flt.drop("caption_filter", int((keep & ~ok).sum()))
            keep &= ok
    if not keep.any():
        return keep
    img = view.image_embeddings()
    k = cfg.clusters or max(1, view.n // SAMPLES_PER_CLUSTER)
    pca = None
    with flt.phase("kmeans"):
        # DataComp clusters the samples that passed the caption filter, not the whole pool.
        train_rows = sample_rows(np.flatnonzero(keep), cfg.kmeans_sample, cfg.seed)
        if 0 < cfg.pca_dim < img.shape[1]:
            centroids, pca = pca_kmeans(img, train_rows, k, dim=cfg.pca_dim, niter=cfg.niter, seed=cfg.seed)
        else:
            centroids = kmeans(gather_float32(img, train_rows), k, niter=cfg.niter, seed=cfg.seed)

    def assign(arr: np.ndarray, which: np.ndarray, desc: str | None = None) -> np.ndarray:
        if pca is None:
            return nearest_centroid(arr, which, centroids, desc=desc)
        return nearest_centroid_pca(arr, which, centroids, pca, cfg.candidates, desc=desc)

    with flt.phase("assign"):
        labels = np.full(view.n, -1, np.int64)
        labels[rows] = assign(img, rows, "assign")
        ref = view.reference(cfg.reference)
        targets = np.unique(assign(ref, np.arange(len(ref))))
    in_target = np.isin(labels, targets) & valid
    flt.drop("off_target_cluster", int((keep & ~in_target).sum()))
    flt.details.update(clusters=len(centroids), target_clusters=len(targets), kmeans_points=len(train_rows))
    log.info("%s: %d clusters, %d of them nearest to a reference sample", flt.name, len(centroids), len(targets))
    return keep & in_target


class ImageBasedFilter(Filter):
    name = "image_based"
    version = "1"
    description = "keep k-means clusters of image embeddings that hold a reference set's nearest centroids (DataComp)"
    Config = ImageBasedConfig
    needs = ("image_embeddings", "reference:{reference}", "metadata:text")

    def required(self) -> tuple[str, ...]:
        needs = super().required()
        return needs if self.config.caption_filter else tuple(n for n in needs if n != "metadata:text")

    def select(self, view: FilterView) -> np.ndarray:
        return view.uids_of(target_cluster_mask(self, view, self.config))


@dataclass(frozen=True)
class ImageBasedClipConfig(ImageBasedConfig):
    """The image-based filter intersected with the CLIP-score top ``fraction`` of the whole pool (DataComp's
    DataComp-1B recipe: L/14 CLIP score top 30%)."""

    fraction: Optional[float] = 0.3
    threshold: Optional[float] = None
    column: str = ""

    def __post_init__(self):
        check_fraction_or_threshold(self.fraction, self.threshold)


class ImageBasedClipFilter(ImageBasedFilter):
    name = "image_based_clip_score"
    version = "1"
    description = "image-based clusters ∩ CLIP-score top fraction (DataComp-1B's recipe)"
    Config = ImageBasedClipConfig
    needs = ("image_embeddings", "scores", "reference:{reference}", "metadata:text")

    def select(self, view: FilterView) -> np.ndarray:
        c = self.config
        clip = clip_score_mask(None, view, c.fraction, c.threshold, c.column)
        image = target_cluster_mask(self, view, c)
        self.drop("low_clip_score", int((image & ~clip).sum()))
        return view.uids_of(image & clip)


@dataclass(frozen=True)
class SemDeDupConfig:
    """Cluster image embeddings with k-means (``clusters``; 0: one per 8,800 samples, the paper's 50k clusters for
    LAION-440M), order each cluster's members by decreasing distance to their centroid, and walk that order:
    a member is dropped when its cosine similarity to an already kept member exceeds ``1 - eps``."""

    eps: float = 0.05
    clusters: int = 0
    kmeans_sample: int = 0
    niter: int = 20
    seed: int = 0


def dedup_cluster(x: np.ndarray, threshold: float, block: int = 1024) -> np.ndarray:
    """Keep mask for members ``x`` (float32, already in walk order): greedy against kept members only.

    Similarities are computed a block of rows at a time against the rows before them (memory: ``block`` x n, not
    n x n). Members with no earlier member above the threshold are kept without the loop; the loop only resolves
    members that have such a neighbour, which are few.
    """
    n = len(x)
    keep = np.ones(n, bool)
    for s in range(0, n, block):
        e = min(n, s + block)
        sim = x[s:e] @ x[:e].T  # rows s..e-1 against rows 0..e-1
        close = sim > threshold
        close &= np.arange(e)[None, :] < np.arange(s, e)[:, None]  # earlier members only
        for r in np.flatnonzero(close.any(1)):
            if (close[r] & keep[:e]).any():  # keep[:i] is final when member i is decided
                keep[s + r] = False
    return keep


class SemDeDupFilter(Filter):
    name = "semdedup"
    version = "1"
    description = "SemDeDup: k-means, then drop semantic near-duplicates within each cluster (cosine > 1 - eps)"
    Config = SemDeDupConfig
    needs = ("image_embeddings",)

    def select(self, view: FilterView) -> np.ndarray:
        c = self.config
        valid = self.drop_invalid(view)
        rows = np.flatnonzero(valid)
        if len(rows) == 0:  # nothing to cluster
            return view.uids_of(valid)
        img = view.image_embeddings()
        k = c.clusters or max(1, len(rows) // 8800)
        with self.phase("kmeans"):
            # Spherical k-means, as SemDeDup's code clusters by cosine distance.
            centroids = kmeans(gather_float32(img, sample_rows(rows, c.kmeans_sample, c.seed)), k, niter=c.niter,
                               seed=c.seed, spherical=True)
        with self.phase("assign"):
            labels = nearest_centroid(img, rows, centroids, desc="assign")
        keep = np.zeros(view.n, bool)
        with self.phase("dedup"):
            order = np.argsort(labels, kind="stable")
            bounds = np.searchsorted(labels[order], np.arange(len(centroids) + 1))
            for ci in tqdm(range(len(centroids)), desc="dedup", unit="cluster", disable=len(centroids) < 64):
                members = rows[order[bounds[ci]:bounds[ci + 1]]]
                if len(members) == 0:
                    continue
                x = np.asarray(img[members], np.float32)
                cos = x @ centroids[ci] / max(float(np.linalg.norm(centroids[ci])), 1e-12)
                walk = np.lexsort((members, cos))  # farthest from the centroid first, ties by row
                kept = dedup_cluster(x[walk], 1.0 - c.eps)
                keep[members[walk[kept]]] = True
        self.drop("near_duplicate", int(len(rows) - keep.sum()))
        return view.uids_of(keep)
