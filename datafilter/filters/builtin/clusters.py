"""Cluster-based filters: DataComp's image-based filter (alone and intersected with the CLIP score) and SemDeDup
(Abbas et al., "SemDeDup: Data-efficient learning at web-scale through semantic deduplication")."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
from tqdm.auto import tqdm

from datafilter.filters.base import Filter
from datafilter.filters.language import FASTTEXT, fasttext_tokens, language_mask
from datafilter.filters.builtin.scores import check_fraction_or_threshold, clip_score_mask
from datafilter.common.files import atomic_path, stable_hash
from datafilter.embed.datacomp import expand_paths, is_saved_file, load_centroids
from datafilter.filters.ops import (InnerProductIndex, check_memory, gather_float32, gpu_count, kmeans,
                                    nearest_centroid_pca, pca_kmeans, sample_rows)
from datafilter.filters.view import FilterView

log = logging.getLogger(__name__)

# DataComp clusters every pool into 100k clusters and trains k-means on a share of the caption-filtered samples that
# falls with the pool's size (baselines/image_based_clustering.md: all of them at small and medium, 0.3 at large,
# 0.03 at xlarge); it releases the resulting centroids for each scale.
DATACOMP_CLUSTERS = 100_000
DATACOMP_SAMPLE_RATIO = {"small": 1.0, "medium": 1.0, "large": 0.3, "xlarge": 0.03}
DATACOMP_CENTROIDS = {s: f"{s}_centroids_l14.pt" for s in DATACOMP_SAMPLE_RATIO}
# k-means beyond this many multiply-adds is hours on a CPU: say so before starting.
CPU_KMEANS_WARN_FLOP = 2e14


@dataclass(frozen=True)
class ImageBasedConfig:
    """Defaults are DataComp's image-based baseline: 100k k-means clusters of the L/14 image embeddings of the
    samples that pass the caption filter, 20 iterations, trained on all of them (``kmeans_sample_ratio``; DataComp
    uses 0.3 at large and 0.03 at xlarge), each sample and reference embedding assigned the centroid with the largest
    inner product, samples kept whose centroid is some reference embedding's.

    ``centroids``: a centroid file (DataComp's released ``small_centroids_l14.pt`` ..., or ``.npy``) used instead
    of k-means, so a CPU machine only assigns. ``reference``: a reference set by name, or files such as DataComp's
    ``in1k_clip_vit_l14_*.pt`` (their ``image_features``).
    ``clusters``: k-means clusters; ``samples_per_cluster`` > 0 sets ``clusters = pool size // samples_per_cluster``
    instead (128 is DataComp small's ratio, for pools far smaller than DataComp's). ``scale``: one of DataComp's
    (small, medium, large, xlarge) sets ``kmeans_sample_ratio`` to DataComp's for it. ``kmeans_sample``: train on this
    many samples (overrides the ratio); ``kmeans_gpu``: on faiss's GPUs when there are any.
    ``assign``: ``exact`` compares each sample with every centroid; ``ivf`` with the centroids of its ``nprobe``
    nearest of ``nlist`` groups (0: about 3.2 sqrt(clusters)); ``auto``: ``ivf`` from 16,384 centroids on.
    ``recall_sample`` rows are also assigned exhaustively and the agreement is recorded.
    ``pca_dim`` > 0: train k-means in a PCA projection (full-dimensional centroids are the cluster means) and find
    each sample's centroid among the ``candidates`` best in the projection.
    ``caption_filter``: DataComp first drops captions that are not English (fastText, ``language_model``) or have
    fewer than two words (fastText's tokens) or six characters."""

    reference: str = "imagenet_train"
    centroids: str = ""
    clusters: int = DATACOMP_CLUSTERS
    samples_per_cluster: int = 0
    kmeans_sample_ratio: float = 1.0
    scale: Literal["", "small", "medium", "large", "xlarge"] = ""
    kmeans_sample: int = 0
    niter: int = 20
    kmeans_gpu: bool = True
    assign: Literal["auto", "exact", "ivf"] = "auto"
    nlist: int = 0
    nprobe: int = 32
    recall_sample: int = 2000
    pca_dim: int = 0
    candidates: int = 16
    seed: int = 0
    caption_filter: bool = True
    language: str = "en"
    language_model: str = FASTTEXT

    def __post_init__(self):
        if not 0 < self.kmeans_sample_ratio <= 1:
            raise ValueError(f"kmeans_sample_ratio must be in (0, 1], got {self.kmeans_sample_ratio}")
        if self.clusters < 1 or self.samples_per_cluster < 0 or self.nprobe < 1:
            raise ValueError("clusters and nprobe must be >= 1, samples_per_cluster >= 0")
        if self.scale and self.kmeans_sample_ratio != 1.0:
            raise ValueError("set scale (DataComp's sample ratio for it) or kmeans_sample_ratio, not both")

    @property
    def sample_ratio(self) -> float:
        return DATACOMP_SAMPLE_RATIO[self.scale] if self.scale else self.kmeans_sample_ratio

    @property
    def released_centroids(self) -> str:
        return DATACOMP_CENTROIDS[self.scale or "small"]


def caption_filter_mask(view: FilterView, language: str, language_model: str = FASTTEXT) -> np.ndarray:
    """DataComp's ``caption_filter``: more than one fastText token, more than five characters, and (unless
    ``language`` is '') the predicted language."""
    texts = view.text()
    ok = np.fromiter(((len(fasttext_tokens(t)) > 1) and (len(t) > 5) for t in texts), bool, len(texts))
    if language:
        idx = np.flatnonzero(ok)
        ok[idx] = language_mask([texts[i] for i in idx], language, language_model)
    return ok


def cluster_count(cfg: ImageBasedConfig, n: int) -> int:
    return max(1, n // cfg.samples_per_cluster) if cfg.samples_per_cluster else cfg.clusters


def train_centroids(flt: Filter, img: np.ndarray, rows: np.ndarray, cfg: ImageBasedConfig, k: int):
    """k-means on the training rows (the caption-filtered samples or a share of them): ``(centroids, pca)``."""
    size = cfg.kmeans_sample or int(len(rows) * cfg.sample_ratio)
    train_rows = sample_rows(rows, size, cfg.seed)
    if k > len(train_rows):
        raise ValueError(f"{k:,} clusters need at least as many k-means points, and {len(train_rows):,} samples "
                         "are there to train on; set clusters=, samples_per_cluster= (128: DataComp small's "
                         f"ratio) or centroids= (a centroid file such as DataComp's {cfg.released_centroids})")
    dim = cfg.pca_dim if 0 < cfg.pca_dim < img.shape[1] else img.shape[1]
    check_memory(len(train_rows) * dim * 4 * 1.2, f"k-means on {len(train_rows):,} points of width {dim}",
                 "train on a share of them (kmeans_sample_ratio=, kmeans_sample=) or give DataComp's released "
                 f"centroids (centroids={cfg.released_centroids})")
    gpu = cfg.kmeans_gpu and gpu_count() > 0 and dim == img.shape[1]  # k-means in a PCA projection runs on the CPU
    flop = 2.0 * len(train_rows) * k * dim * cfg.niter
    if not gpu and flop > CPU_KMEANS_WARN_FLOP:
        log.warning("%s: k-means of %s points into %s clusters is about %.0f TFLOP, hours on a CPU; DataComp runs "
                    "it on GPUs and releases the centroids (centroids=%s)", flt.name, f"{len(train_rows):,}",
                    f"{k:,}", flop / 1e12, cfg.released_centroids)
    flt.details.update(kmeans_points=len(train_rows), kmeans_device="gpu" if gpu else "cpu")
    if dim < img.shape[1]:
        return pca_kmeans(img, train_rows, k, dim=dim, niter=cfg.niter, seed=cfg.seed)
    return kmeans(gather_float32(img, train_rows), k, niter=cfg.niter, seed=cfg.seed, gpu=gpu), None


def target_cluster_mask(flt: Filter, view: FilterView, cfg: ImageBasedConfig,
                        also: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Rows whose nearest centroid is the nearest centroid of some reference embedding.

    k-means trains on the usable rows that pass the caption filter (DataComp clusters those); ``also(keep)``, if
    given, narrows the rows to assign further (the CLIP-score cut of the intersected filter, which does not change
    the centroids), so only the candidates are read and assigned."""
    img = view.image_embeddings()
    given = load_centroids(cfg.centroids, img.shape[1]) if cfg.centroids else None  # bad files fail first
    ref = view.reference(cfg.reference)
    if ref.shape[1] != img.shape[1]:
        raise ValueError(f"reference set {cfg.reference!r} has width {ref.shape[1]}, the embeddings {img.shape[1]}")
    valid = flt.drop_invalid(view)
    keep = valid.copy()
    if cfg.caption_filter:
        with flt.phase("caption_filter"):
            ok = caption_filter_mask(view, cfg.language, cfg.language_model)
            flt.drop("caption_filter", int((keep & ~ok).sum()))
            keep &= ok
    if not keep.any():
        return keep
    if view.check_embeddings:  # the vectors themselves say which rows have none (DataComp: zero vectors)
        usable = view.usable("image")
        flt.drop("no_embedding", int((keep & ~usable).sum()))
        keep &= usable
    train = np.flatnonzero(keep)
    if also is not None:
        keep = also(keep)
    rows = np.flatnonzero(keep)
    pca = None
    with flt.phase("kmeans"):
        if given is not None:
            centroids, given = given, None
            flt.details.update(centroids=str(cfg.centroids))
        else:
            centroids, pca = train_centroids(flt, img, train, cfg, cluster_count(cfg, view.n))
    n_clusters = len(centroids)
    with flt.phase("assign"):
        labels = np.full(view.n, -1, np.int64)
        if pca is not None:
            labels[rows] = nearest_centroid_pca(img, rows, centroids, pca, cfg.candidates, desc="assign")
            targets = np.unique(nearest_centroid_pca(ref, np.arange(len(ref)), centroids, pca, cfg.candidates))
            flt.details["assignment"] = {"method": "pca", "candidates": cfg.candidates}
        else:
            index = InnerProductIndex(centroids, method=cfg.assign, nlist=cfg.nlist, nprobe=cfg.nprobe,
                                      seed=cfg.seed)
            centroids = None  # the index holds its own copy
            labels[rows] = index.assign(img, rows, desc="assign")
            targets = reference_targets(flt, view, cfg, index, ref)
            flt.details["assignment"] = index.describe()
            recall = index.recall(img, rows, labels[rows], cfg.recall_sample, cfg.seed)
            if recall is not None:
                flt.details["assignment"]["recall_sample"] = {"rows": min(cfg.recall_sample, len(rows)),
                                                             "agree_with_exhaustive": round(recall, 4)}
                log.info("%s: %.2f%% of %d sampled rows get the exhaustive search's centroid", flt.name,
                         100 * recall, min(cfg.recall_sample, len(rows)))
    in_target = np.isin(labels, targets) & keep
    flt.drop("off_target_cluster", int((keep & ~in_target).sum()))
    flt.details.update(clusters=n_clusters, target_clusters=len(targets))
    log.info("%s: %d clusters, %d of them nearest to a reference sample", flt.name, n_clusters, len(targets))
    return in_target


def reference_targets(flt: Filter, view: FilterView, cfg: ImageBasedConfig, index: InnerProductIndex,
                      ref: np.ndarray) -> np.ndarray:
    """The centroids nearest to some reference embedding.

    With a centroid file and reference files (DataComp's released centroids and 1.28M ImageNet features: a fifth of
    the assignment work at DataComp small) they depend on neither the pool nor the run. So they are kept in the work
    directory, keyed by both files (path, size, modification time) and the search's settings, and a later run reads
    them (``image_based_clip_score`` after ``image_based``, another pool, a rerun)."""
    if not (cfg.centroids and is_saved_file(cfg.reference)):
        return np.unique(index.assign(ref, np.arange(len(ref))))
    files = [Path(cfg.centroids).resolve(), *(p.resolve() for p in expand_paths(cfg.reference))]
    key = stable_hash({"files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
                       "search": index.describe(), "seed": cfg.seed})
    path = view.workdir / f"image_based_targets-{key}.npy"
    if path.is_file():
        flt.details["reference_targets"] = f"read from {path}"
        return np.load(path)
    targets = np.unique(index.assign(ref, np.arange(len(ref)), desc="assign reference"))
    view.workdir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, targets)
    flt.details["reference_targets"] = f"written to {path}"
    return targets


class ImageBasedFilter(Filter):
    name = "image_based"
    version = "2"  # 2: DataComp's 100k clusters by default (1: one per 128 samples), released centroids
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
        super().__post_init__()
        check_fraction_or_threshold(self.fraction, self.threshold)


class ImageBasedClipFilter(ImageBasedFilter):
    name = "image_based_clip_score"
    version = "2"
    description = "image-based clusters ∩ CLIP-score top fraction (DataComp-1B's recipe)"
    Config = ImageBasedClipConfig
    needs = ("image_embeddings", "scores", "reference:{reference}", "metadata:text")

    def select(self, view: FilterView) -> np.ndarray:
        c = self.config
        clip = clip_score_mask(None, view, c.fraction, c.threshold, c.column)  # threshold over the whole pool

        def also(keep: np.ndarray) -> np.ndarray:
            self.drop("low_clip_score", int((keep & ~clip).sum()))
            return keep & clip

        return view.uids_of(target_cluster_mask(self, view, c, also))


@dataclass(frozen=True)
class SemDeDupConfig:
    """SemDeDup as its authors' code runs it: spherical k-means of the image embeddings into ``clusters`` (0: one
    per 8,800 samples, the paper's 50k clusters for LAION-440M), ``niter`` 100 iterations; each cluster's members
    ordered by decreasing distance to their centroid (the hardest first, their ``keep_hard``), and a member dropped
    when its cosine similarity to ANY earlier member exceeds ``1 - eps``.

    ``compare="kept"`` is this project's earlier variant: compare with the members kept so far only, so the last
    member of a chain of near-duplicates (a ~ b ~ c, a and c apart) survives when its predecessor was dropped; it
    keeps a little more. ``kmeans_sample``: train k-means on that many random samples (0: all, as the paper; at
    millions of samples the float32 training set alone exceeds a workstation's memory)."""

    eps: float = 0.05
    clusters: int = 0
    kmeans_sample: int = 0
    niter: int = 100
    compare: Literal["any", "kept"] = "any"
    seed: int = 0


def dedup_cluster(x: np.ndarray, threshold: float, block: int = 1024, compare: str = "any") -> np.ndarray:
    """Keep mask for members ``x`` (float32, already in walk order).

    ``any`` (the paper's code): drop a member whose similarity to any earlier member exceeds ``threshold``.
    ``kept``: greedy against kept members only. Similarities are computed a block of rows at a time against the
    rows before them (memory: ``block`` x n, not n x n); under ``kept`` the loop only resolves members that have
    such a neighbour, which are few.
    """
    n = len(x)
    keep = np.ones(n, bool)
    for s in range(0, n, block):
        e = min(n, s + block)
        sim = x[s:e] @ x[:e].T  # rows s..e-1 against rows 0..e-1
        close = sim > threshold
        close &= np.arange(e)[None, :] < np.arange(s, e)[:, None]  # earlier members only
        if compare == "any":
            keep[s:e] = ~close.any(1)
            continue
        for r in np.flatnonzero(close.any(1)):
            if (close[r] & keep[:e]).any():  # keep[:i] is final when member i is decided
                keep[s + r] = False
    return keep


class SemDeDupFilter(Filter):
    name = "semdedup"
    version = "2"  # 2: the paper's rule (any earlier member) and 100 k-means iterations; 1: compare=kept, niter=20
    description = "SemDeDup: k-means, then drop semantic near-duplicates within each cluster (cosine > 1 - eps)"
    Config = SemDeDupConfig
    needs = ("image_embeddings",)

    def select(self, view: FilterView) -> np.ndarray:
        c = self.config
        valid = self.drop_invalid(view, "image")
        rows = np.flatnonzero(valid)
        if len(rows) == 0:  # nothing to cluster
            return view.uids_of(valid)
        img = view.image_embeddings()
        k = c.clusters or max(1, len(rows) // 8800)
        with self.phase("kmeans"):
            train = sample_rows(rows, c.kmeans_sample, c.seed)
            check_memory(len(train) * img.shape[1] * 4 * 1.2, f"k-means on {len(train):,} points",
                         "train on a sample (kmeans_sample=)")
            # Spherical k-means, as SemDeDup's code clusters by cosine distance.
            centroids = kmeans(gather_float32(img, train), k, niter=c.niter, seed=c.seed, spherical=True)
        with self.phase("assign"):
            labels = InnerProductIndex(centroids, seed=c.seed).assign(img, rows, desc="assign")
        keep = np.zeros(view.n, bool)
        with self.phase("dedup"):
            order = np.argsort(labels, kind="stable")
            bounds = np.searchsorted(labels[order], np.arange(len(centroids) + 1))
            for ci in tqdm(range(len(centroids)), desc="dedup", unit="cluster", disable=len(centroids) < 64):
                members = rows[order[bounds[ci]:bounds[ci + 1]]]  # increasing rows: reads follow the files
                if len(members) == 0:
                    continue
                x = np.asarray(img[members], np.float32)
                cos = x @ centroids[ci] / max(float(np.linalg.norm(centroids[ci])), 1e-12)
                walk = np.lexsort((members, cos))  # farthest from the centroid first, ties by row
                kept = dedup_cluster(x[walk], 1.0 - c.eps, compare=c.compare)
                keep[members[walk[kept]]] = True
        self.drop("near_duplicate", int(len(rows) - keep.sum()))
        return view.uids_of(keep)
