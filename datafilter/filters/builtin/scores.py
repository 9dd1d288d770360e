"""Score-based filters: CLIP score (DataComp), negCLIPLoss and NormSim (Wang et al., "CLIPLoss and Norm-Based
Data Selection Methods for Multimodal Contrastive Learning")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Optional

import numpy as np

from datafilter.filters.base import Filter
from datafilter.common.launch import free_cores
from datafilter.filters.ops import InnerProductIndex, float32_rows, top_fraction_mask
from datafilter.filters.view import FilterView


@dataclass(frozen=True)
class ClipScoreConfig:
    """Keep the top ``fraction`` by a global quantile (DataComp's rule, ties at the threshold kept) or every sample
    with a score ``>= threshold``; exactly one of the two. ``column``: a score column of the space ('' = the
    space's own, e.g. ``clip_b32_similarity_score``)."""

    fraction: Optional[float] = 0.3
    threshold: Optional[float] = None
    column: str = ""

    def __post_init__(self):
        check_fraction_or_threshold(self.fraction, self.threshold)


def check_fraction_or_threshold(fraction: float | None, threshold: float | None) -> None:
    """The CLIP-score rule takes a top fraction or a threshold, exactly one of the two."""
    if (fraction is None) == (threshold is None):
        raise ValueError("set exactly one of fraction and threshold (use fraction=none with a threshold)")


def clip_score_mask(flt: Filter | None, view: FilterView, fraction: float | None, threshold: float | None,
                    column: str = "") -> np.ndarray:
    """Rows kept by the CLIP-score rule; removals are counted on ``flt`` unless it is None (a caller that
    combines this with other tests and counts each sample once itself)."""
    scores = view.scores(column or None)
    finite = np.isfinite(scores)
    keep = top_fraction_mask(scores, fraction) if fraction is not None else finite & (scores >= threshold)
    if flt is not None:
        flt.drop("no_embedding", int((~finite).sum()))
        flt.drop("low_clip_score", int((finite & ~keep).sum()))
    return keep


class ClipScoreFilter(Filter):
    name = "clip_score"
    version = "1"
    description = "keep the top fraction (global quantile) or the samples above a threshold of the CLIP score"
    Config = ClipScoreConfig
    needs = ("scores",)

    def select(self, view: FilterView) -> np.ndarray:
        c = self.config
        self.details["score_column"] = c.column or view.score_column
        with self.phase("select"):
            keep = clip_score_mask(self, view, c.fraction, c.threshold, c.column)
            return view.uids_of(keep)


@dataclass(frozen=True)
class NegClipConfig:
    """negCLIPLoss as the paper's code computes it (ypwang61/negCLIPLoss_NormSim, ``cal_new_clip_score``): the
    CLIP score minus ``tau/2 * (logsumexp_j s_ij/tau + logsumexp_j s_ji/tau)`` over a batch, with ``batch_size``
    32,768, one batching (``repeats``, their ``average_num``) and ``temperature`` 0.01 (OpenAI CLIP's). Like their
    code, ``batching="shard"`` permutes each metadata shard's samples and cuts them into batches of ``batch_size``
    (the last one shorter), so a batch never crosses shards (and reads stay within a shard's file).
    ``batching="pool"`` is this project's earlier variant: the whole pool permuted into near-equal batches (no
    short batch with fewer negatives), averaged over ``repeats`` batchings (it used 4,096 and 3). Keeps the top
    ``fraction`` by DataComp's quantile rule."""

    fraction: float = 0.3
    batch_size: int = 32768
    repeats: int = 1
    temperature: float = 0.01
    batching: Literal["shard", "pool"] = "shard"
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.repeats < 1 or self.temperature <= 0:
            raise ValueError("batch_size and repeats must be >= 1 and temperature > 0")


def _batches(view: FilterView, rows: np.ndarray, cfg: NegClipConfig, rng: np.random.Generator
             ) -> Iterator[np.ndarray]:
    """Positions into ``rows`` of each batch of one batching (every row in exactly one batch)."""
    if cfg.batching == "pool":
        perm = rng.permutation(len(rows))
        yield from np.array_split(perm, max(1, -(-len(perm) // cfg.batch_size)))
        return
    bounds = np.searchsorted(rows, view.shard_offsets)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        perm = lo + rng.permutation(hi - lo)
        for s in range(0, len(perm), cfg.batch_size):
            yield perm[s:s + cfg.batch_size]


def negclip_scores(view: FilterView, rows: np.ndarray, cfg: NegClipConfig, block: int = 2048) -> np.ndarray:
    """negCLIPLoss of each of ``rows`` (float64); every row is in exactly one batch per repeat.

    The batch's similarity matrix is never held whole (32,768^2 floats are 4 GB): rows of it are computed a block
    at a time, their log-sum-exp taken along the row, and the column log-sum-exps accumulated block by block."""
    import torch

    torch.set_num_threads(free_cores())
    img, txt = view.image_embeddings(), view.text_embeddings()
    rng = np.random.default_rng(cfg.seed)
    out = np.zeros(len(rows), np.float64)
    tau = cfg.temperature
    for _ in range(cfg.repeats):
        for pos in _batches(view, rows, cfg, rng):
            pos = np.sort(pos)
            r = rows[pos]
            a = torch.from_numpy(np.asarray(img[r], np.float32))
            b = torch.from_numpy(np.asarray(txt[r], np.float32))
            row_lse = torch.empty(len(r), dtype=torch.float32)
            col_lse = torch.full((len(r),), -torch.inf)
            for s in range(0, len(r), block):
                sim = (a[s:s + block] @ b.T) / tau
                row_lse[s:s + block] = torch.logsumexp(sim, 1)
                col_lse = torch.logaddexp(col_lse, torch.logsumexp(sim, 0))
            norm = 0.5 * tau * (row_lse.double() + col_lse.double()).numpy()
            out[pos] += (a * b).sum(1).double().numpy() - norm
    return out / cfg.repeats


class NegClipFilter(Filter):
    name = "negclip"
    version = "2"  # 2: the paper's defaults (batch 32,768 per shard, 1 repeat); 1: batching=pool, 4,096, 3
    description = "negCLIPLoss: CLIP score minus its batch contrastive normalisation, top fraction"
    Config = NegClipConfig
    needs = ("image_embeddings", "text_embeddings")

    def select(self, view: FilterView) -> np.ndarray:
        valid = self.drop_invalid(view, "image", "text")
        rows = np.flatnonzero(valid)
        with self.phase("score"):
            s = np.full(view.n, np.nan)
            s[rows] = negclip_scores(view, rows, self.config)
        with self.phase("select"):
            keep = top_fraction_mask(s, self.config.fraction)
            self.drop("low_negclip", int(valid.sum() - keep.sum()))
            return view.uids_of(keep)


@dataclass(frozen=True)
class NormSimConfig:
    """NormSim_p (the paper's ``cal_similarity_scores_norm``): the p-norm of a sample's image similarities to a
    target set (``reference``; the paper's is ImageNet-1k train): ``p='inf'`` is the largest ``|<x, t>|``, ``p='2'``
    the root of the summed squares. Keeps the top ``fraction`` of valid samples. ``negclip_fraction > 0`` first
    keeps that top fraction by negCLIPLoss (the paper's negCLIPLoss ∩ NormSim; ``negclip_*`` as ``negclip``'s).

    p = 2 is computed exactly as ``sqrt(x' (T'T) x)``, one d x d matrix for the whole target set. p = inf needs the
    best target of each sample: ``search="exact"`` compares with every target, ``ivf`` with the targets of the
    ``nprobe`` nearest of ``nlist`` groups (``datafilter.filters.ops.InnerProductIndex``; a missed best target
    gives the second best's similarity), ``auto`` uses ``ivf`` from 16,384 targets on (ImageNet's 1.28M against a
    12.8M pool is 10^16 multiply-adds exhaustively); ``recall_sample`` samples are checked exhaustively."""

    reference: str = "imagenet_train"
    p: Literal["inf", "2"] = "inf"
    fraction: float = 0.3
    negclip_fraction: float = 0.0
    negclip_batch_size: int = 32768
    negclip_repeats: int = 1
    negclip_batching: Literal["shard", "pool"] = "shard"
    temperature: float = 0.01
    search: Literal["auto", "exact", "ivf"] = "auto"
    nlist: int = 0
    nprobe: int = 32
    recall_sample: int = 2000
    seed: int = 0


def normsim_scores(view: FilterView, rows: np.ndarray, target: np.ndarray, p: str, *, search: str = "exact",
                   nlist: int = 0, nprobe: int = 32, seed: int = 0, details: dict | None = None,
                   recall_sample: int = 0, target_chunk: int = 65536) -> np.ndarray:
    """NormSim_p of each of ``rows``, reading the image embeddings a chunk at a time."""
    img = view.image_embeddings()
    out = np.empty(len(rows), np.float64)
    if p == "2":
        gram = np.zeros((target.shape[1],) * 2, np.float64)
        for t0 in range(0, len(target), target_chunk):
            t = np.asarray(target[t0:t0 + target_chunk], np.float64)
            gram += t.T @ t
        gram = gram.astype(np.float32)
        for start, block in float32_rows(img, rows, 8192):
            q = np.einsum("nd,nd->n", block @ gram, block).astype(np.float64)
            out[start:start + len(block)] = np.sqrt(np.maximum(q, 0.0))
        return out
    index = InnerProductIndex(target, method=search, nlist=nlist, nprobe=nprobe, seed=seed)
    for start, block in float32_rows(img, rows, 65536, "normsim"):
        out[start:start + len(block)] = index.max_abs(block)
    if details is not None:
        details["search"] = index.describe()
        if index.method == "ivf" and recall_sample > 0 and len(rows):
            pick = np.sort(np.random.default_rng(seed).choice(len(rows), min(recall_sample, len(rows)), False))
            exact = index.search_exact(np.asarray(img[rows[pick]], np.float32), absolute=True)[1]
            agree = np.isclose(exact, out[pick], rtol=1e-5, atol=0)  # equal up to the order of float sums
            details["search"]["recall_sample"] = {"rows": len(pick),
                                                  "agree_with_exhaustive": round(float(np.mean(agree)), 4)}
    return out


class NormSimFilter(Filter):
    name = "normsim"
    version = "2"  # 2: negCLIPLoss part with the paper's defaults; inverted lists for large target sets
    description = "NormSim: image similarity to a target set (max or 2-norm), optionally after negCLIPLoss"
    Config = NormSimConfig
    needs = ("image_embeddings", "reference:{reference}")

    def required(self) -> tuple[str, ...]:
        extra = ("text_embeddings",) if self.config.negclip_fraction > 0 else ()
        return super().required() + extra

    def select(self, view: FilterView) -> np.ndarray:
        c = self.config
        valid = self.drop_invalid(view, "image", *(("text",) if c.negclip_fraction > 0 else ()))
        rows = np.flatnonzero(valid)
        budget = int(len(rows) * c.fraction)
        if c.negclip_fraction > 0:
            with self.phase("negclip"):
                s = np.full(view.n, np.nan)
                s[rows] = negclip_scores(view, rows, NegClipConfig(c.negclip_fraction, c.negclip_batch_size,
                                                                   c.negclip_repeats, c.temperature,
                                                                   c.negclip_batching, c.seed))
                cand = top_fraction_mask(s, c.negclip_fraction)
                self.drop("low_negclip", int(len(rows) - cand.sum()))
                rows = np.flatnonzero(cand)
        with self.phase("normsim"):
            ns = np.full(view.n, np.nan)
            self.details["normsim"] = {}
            ns[rows] = normsim_scores(view, rows, view.reference(c.reference), c.p, search=c.search,
                                      nlist=c.nlist, nprobe=c.nprobe, seed=c.seed, details=self.details["normsim"],
                                      recall_sample=c.recall_sample)
        with self.phase("select"):
            frac = min(1.0, budget / len(rows)) if len(rows) else 1.0
            keep = top_fraction_mask(ns, frac)
            self.drop("low_normsim", int(len(rows) - keep.sum()))
            return view.uids_of(keep)
