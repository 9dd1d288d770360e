"""Score-based filters: CLIP score (DataComp), negCLIPLoss and NormSim (Wang et al., "CLIPLoss and Norm-Based
Data Selection Methods for Multimodal Contrastive Learning")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from datafilter.filters.base import Filter
from datafilter.common.launch import free_cores
from datafilter.filters.ops import float32_rows, top_fraction_mask
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
    """negCLIPLoss: the CLIP score minus the batch-level normalisation term
    ``tau/2 * (logsumexp_j s_ij/tau + logsumexp_j s_ji/tau)``, averaged over ``repeats`` random batchings of the
    pool into batches of ``batch_size``. ``temperature`` is the scorer's (OpenAI CLIP: 0.01). Keeps the top
    ``fraction`` by DataComp's quantile rule."""

    fraction: float = 0.3
    batch_size: int = 4096
    repeats: int = 3
    temperature: float = 0.01
    seed: int = 0


def _logsumexp_rows(s: np.ndarray) -> np.ndarray:
    m = s.max(axis=1, keepdims=True)
    return (m[:, 0] + np.log(np.exp(s - m).sum(axis=1))).astype(np.float64)


def negclip_scores(view: FilterView, rows: np.ndarray, cfg: NegClipConfig) -> np.ndarray:
    """negCLIPLoss of each of ``rows`` (float64); every row is in exactly one batch per repeat."""
    import torch

    torch.set_num_threads(free_cores())
    img, txt = view.image_embeddings(), view.text_embeddings()
    rng = np.random.default_rng(cfg.seed)
    out = np.zeros(len(rows), np.float64)
    tau = cfg.temperature
    for _ in range(cfg.repeats):
        perm = rng.permutation(len(rows))
        # Near-equal batches: a short last batch would have fewer negatives and flatter scores.
        for pos in np.array_split(perm, max(1, -(-len(perm) // cfg.batch_size))):
            pos = np.sort(pos)
            r = rows[pos]
            a = torch.from_numpy(np.asarray(img[r], np.float32))
            b = torch.from_numpy(np.asarray(txt[r], np.float32))
            s = (a @ b.T) / tau
            norm = 0.5 * tau * (torch.logsumexp(s, 1) + torch.logsumexp(s, 0)).double().numpy()
            out[pos] += (a * b).sum(1).double().numpy() - norm
    return out / max(1, cfg.repeats)


class NegClipFilter(Filter):
    name = "negclip"
    version = "1"
    description = "negCLIPLoss: CLIP score minus its batch contrastive normalisation, top fraction"
    Config = NegClipConfig
    needs = ("image_embeddings", "text_embeddings")

    def select(self, view: FilterView) -> np.ndarray:
        valid = self.drop_invalid(view)
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
    """NormSim_p: the p-norm of a sample's image similarities to a target set (``reference``): ``p='inf'`` is the
    largest similarity, ``p='2'`` the root of the summed squares. Keeps the top ``fraction`` of valid samples.
    ``negclip_fraction > 0`` first keeps that top fraction by negCLIPLoss (the paper's negCLIPLoss ∩ NormSim)."""

    reference: str = "imagenet_train"
    p: Literal["inf", "2"] = "inf"
    fraction: float = 0.3
    negclip_fraction: float = 0.0
    negclip_batch_size: int = 4096
    negclip_repeats: int = 3
    temperature: float = 0.01
    seed: int = 0


def normsim_scores(view: FilterView, rows: np.ndarray, target: np.ndarray, p: str, target_chunk: int = 65536
                   ) -> np.ndarray:
    """NormSim_p: the p-norm of |<x, t>| over the target set (p = inf: the largest), the target read in chunks so
    that memory stays bounded for targets as large as ImageNet's train set."""
    out = np.empty(len(rows), np.float64)
    for start, block in float32_rows(view.image_embeddings(), rows, 8192):
        acc = np.zeros(len(block), np.float64)
        for t0 in range(0, len(target), target_chunk):
            sim = np.abs(block @ np.ascontiguousarray(target[t0:t0 + target_chunk], np.float32).T)
            acc = np.maximum(acc, sim.max(1)) if p == "inf" else acc + (sim.astype(np.float64) ** 2).sum(1)
        out[start:start + len(block)] = acc if p == "inf" else np.sqrt(acc)
    return out


class NormSimFilter(Filter):
    name = "normsim"
    version = "1"
    description = "NormSim: image similarity to a target set (max or 2-norm), optionally after negCLIPLoss"
    Config = NormSimConfig
    needs = ("image_embeddings", "reference:{reference}")

    def required(self) -> tuple[str, ...]:
        extra = ("text_embeddings",) if self.config.negclip_fraction > 0 else ()
        return super().required() + extra

    def select(self, view: FilterView) -> np.ndarray:
        c = self.config
        valid = self.drop_invalid(view)
        rows = np.flatnonzero(valid)
        budget = int(len(rows) * c.fraction)
        if c.negclip_fraction > 0:
            with self.phase("negclip"):
                s = np.full(view.n, np.nan)
                s[rows] = negclip_scores(view, rows, NegClipConfig(c.negclip_fraction, c.negclip_batch_size,
                                                                   c.negclip_repeats, c.temperature, c.seed))
                cand = top_fraction_mask(s, c.negclip_fraction)
                self.drop("low_negclip", int(len(rows) - cand.sum()))
                rows = np.flatnonzero(cand)
        with self.phase("normsim"):
            ns = np.full(view.n, np.nan)
            ns[rows] = normsim_scores(view, rows, view.reference(c.reference), c.p)
        with self.phase("select"):
            frac = min(1.0, budget / len(rows)) if len(rows) else 1.0
            keep = top_fraction_mask(ns, frac)
            self.drop("low_normsim", int(len(rows) - keep.sum()))
            return view.uids_of(keep)
