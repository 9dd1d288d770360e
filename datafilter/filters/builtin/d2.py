"""D² pruning (Maharana et al., "D2 Pruning: Message Passing for Balancing Diversity and Difficulty in Data
Pruning"), on image-text pairs as in its DataComp experiments.

1. A kNN graph over the samples' embeddings (image and text concatenated, or either alone), squared L2 distances.
2. Forward message passing: each node's score becomes its own difficulty plus the difficulties of its neighbours
   weighted by ``exp(-gamma * d)``: ``g_i = max(s_i, eps) + sum_j exp(-gamma * d_ij) * max(s_j, eps)``, where the
   difficulty ``s`` is the CLIP score plus ``score_offset`` (the authors add 0.115 so that DataComp's scores are
   positive).
3. Reverse message passing while selecting: take the node with the largest ``g``, then lower each of its
   neighbours' scores by ``exp(-beta * d) * g_picked``, which pushes the next picks away from what is chosen. The
   authors' script finds "the largest" with a one-row lookahead over the initial order (``reverse_pass_lookahead``,
   the default); the exact repeated arg-max (``reverse_pass``) is the ``greedy`` option.

The neighbours of row ``i`` are always row ``i``'s: the graph is built with queries and index in one order. (The
authors' DataComp script joins per-file results in completion order while neighbour ids follow index order, which
pairs rows with the wrong neighbours; this implementation does not.) Both selections use lazy max-heaps: the greedy
one gives exactly the repeated-argmax order (ties: lowest row first), the lookahead one exactly the script's picks.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass
from typing import Literal

import numpy as np

from datafilter.common.files import stable_hash
from datafilter.filters.base import Filter
from datafilter.filters.ops import FLAT_LISTS, Rows, available_memory, knn_graph, knn_lists
from datafilter.filters.view import FilterView

EPS = 1e-7


def forward_pass(scores: np.ndarray, nbrs: np.ndarray, dists: np.ndarray, gamma: float) -> np.ndarray:
    """``g_i = max(s_i, eps) + sum_j exp(-gamma d_ij) max(s_j, eps)`` over row ``i``'s neighbours (missing: -1)."""
    s = np.maximum(scores.astype(np.float64), EPS)
    w = np.where(nbrs >= 0, np.exp(-gamma * dists.astype(np.float64)), 0.0)
    return s + (w * s[np.maximum(nbrs, 0)]).sum(axis=1)


def reverse_pass(graph_scores: np.ndarray, nbrs: np.ndarray, dists: np.ndarray, beta: float, budget: int
                 ) -> np.ndarray:
    """Pick ``budget`` rows greedily: take the largest score, then ``g_j -= exp(-beta d_ij) * g_i`` for its
    neighbours ``j``. Returns the picked rows in pick order."""
    g = graph_scores.astype(np.float64).copy()
    n = len(g)
    budget = min(budget, n)
    w = np.where(nbrs >= 0, np.exp(-beta * dists.astype(np.float64)), 0.0)
    nb = np.maximum(nbrs, 0)
    heap = list(zip((-g).tolist(), range(n)))
    heapq.heapify(heap)
    taken = np.zeros(n, bool)
    picked = np.empty(budget, np.int64)
    count = 0
    while count < budget:
        neg, i = heapq.heappop(heap)
        if taken[i]:
            continue
        if -neg != g[i]:  # stale entry: the score changed since it was pushed
            heapq.heappush(heap, (-g[i], i))
            continue
        taken[i] = True
        picked[count] = i
        count += 1
        gi = g[i]
        if gi == 0.0:
            continue
        real = nbrs[i] >= 0  # a missing neighbour (-1) must not write to row 0
        js = nb[i][real]
        old = g[js]
        g[js] = old - w[i][real] * gi
        if gi < 0:  # a negative pick raises its neighbours: their heap entries must move up now
            for j in js[(g[js] > old) & ~taken[js]].tolist():
                heapq.heappush(heap, (-g[j], j))
    return picked


def reverse_pass_lookahead(graph_scores: np.ndarray, nbrs: np.ndarray, dists: np.ndarray, beta: float,
                           budget: int) -> np.ndarray:
    """The selection loop of the authors' DataComp script (``iterative_selection`` in ``select_d2_datacomp.py``):
    walk the rows in order of their initial score; a row whose current score is below the next row's is set aside,
    otherwise it is picked; whenever the best set-aside row scores at least as much as the next row in line, it is
    picked first. Each pick lowers its neighbours as in ``reverse_pass``. It approximates the repeated arg-max of
    the paper, looking one row ahead instead of at every row; ties keep the earliest set-aside row, as the
    script's ``np.argmax`` over its list does. The set-aside rows are a lazy max-heap here (the script scans a
    list), which picks the same rows."""
    g = graph_scores.astype(np.float64).copy()
    n = len(g)
    budget = min(budget, n)
    w = np.where(nbrs >= 0, np.exp(-beta * dists.astype(np.float64)), 0.0)
    nb = np.maximum(nbrs, 0)
    order = np.argsort(-g, kind="stable")
    aside: list[tuple[float, int, int]] = []  # (-score, set-aside order, row)
    is_aside = np.zeros(n, bool)
    taken = np.zeros(n, bool)
    picked = np.empty(budget, np.int64)
    count = counter = stamp = 0

    def best_aside() -> int | None:
        while aside:
            neg, _, i = aside[0]
            if not is_aside[i]:
                heapq.heappop(aside)
            elif -neg != g[i]:  # stale: re-enter with its current score (and its original place among ties)
                _, when, _ = heapq.heappop(aside)
                heapq.heappush(aside, (-g[i], when, i))
            else:
                return i
        return None

    def pick(i: int) -> None:
        nonlocal count
        taken[i] = True
        picked[count] = i
        count += 1
        gi = g[i]
        real = nbrs[i] >= 0
        js = nb[i][real]
        old = g[js]
        g[js] = old - w[i][real] * gi
        for j in js[(g[js] > old) & is_aside[js]].tolist():  # a raised set-aside row must move up now
            heapq.heappush(aside, (-g[j], stamp_of[j], j))

    stamp_of = np.zeros(n, np.int64)
    while count < budget:
        b = best_aside()
        if b is not None and (counter >= n or g[b] >= g[order[counter]]):
            is_aside[b] = False
            pick(b)
            continue
        if counter >= n:
            break
        i = int(order[counter])
        if not taken[i]:
            if counter + 1 < n and g[i] < g[order[counter + 1]]:
                is_aside[i] = True
                stamp_of[i] = stamp
                heapq.heappush(aside, (-g[i], stamp, i))
                stamp += 1
            else:
                pick(i)
        counter += 1
    return picked[:count]


SELECTIONS = {"greedy": reverse_pass, "lookahead": reverse_pass_lookahead}
# The settings a kNN graph depends on: a graph kept on disk is reused when these (and the rows) are the same.
GRAPH_FIELDS = ("k", "exact_max", "pca_dim", "nlist", "nprobe", "balance", "seed")


@dataclass(frozen=True)
class D2Config:
    """Defaults are the authors' DataComp recipe (d2pruning's README and ``select_d2_datacomp.py``): image and text
    embeddings concatenated, one neighbour, forward and reverse gamma 1.0, score offset 0.115, the whole pool, 30%
    kept. Their image-classification recipes use ``k=5`` to ``10`` and ``gamma`` of about 0.1.

    ``features``: ``image_text`` (concatenated), ``image`` or ``text``. ``k`` neighbours; ``gamma`` forward and
    ``beta`` reverse kernel widths; ``fraction`` of valid samples kept; ``score_column`` ('' = the space's).
    ``selection``: ``lookahead``, the authors' script's loop (picks exactly its rows), or ``greedy``, the repeated
    arg-max the paper describes; on the micro pool the two share 72% of their rows.
    kNN: ``knn`` = auto (exhaustive up to ``exact_max`` samples, else ivf), flat or ivf; ivf splits the samples
    into ``nlist`` lists (0: 4 sqrt(N), one per 256 samples from about 1M on) by k-means on a
    ``pca_dim``-dimensional PCA projection and compares each sample with the members of the ``nprobe`` nearest
    lists, with exact distances; lists over ``balance`` times the mean size are halved along their principal axis
    (0: never; higher: more recall in dense regions, more time).
    ``on_disk``: keep the kNN graph's working arrays and the graph itself in files under the view's work directory
    (resumable after a kill; a finished graph is reused by a later run with the same inputs and kNN settings, such
    as another ``fraction``), with the rows copied there in list order; ``auto`` does so when the embeddings read
    exceed a quarter of the available memory."""

    fraction: float = 0.3
    features: Literal["image_text", "image", "text"] = "image_text"
    k: int = 1
    gamma: float = 1.0
    beta: float = 1.0
    score_offset: float = 0.115
    score_column: str = ""
    selection: Literal["lookahead", "greedy"] = "lookahead"
    knn: Literal["auto", "flat", "ivf"] = "auto"
    exact_max: int = 20000
    pca_dim: int = 64
    nlist: int = 0
    nprobe: int = 6
    balance: float = 2.0
    on_disk: Literal["auto", "always", "never"] = "auto"
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.fraction <= 1 or self.k < 1 or self.gamma < 0 or self.beta < 0 or self.balance < 0:
            raise ValueError("fraction must be in [0, 1], k >= 1, gamma, beta and balance >= 0")


class D2Filter(Filter):
    name = "d2_pruning"
    # 3: the authors' DataComp recipe by default (k = 1, their selection loop); 2: big kNN lists halved
    version = "3"
    description = "D² pruning: kNN graph, forward and reverse message passing of the CLIP score (image+text or one)"
    Config = D2Config
    needs = ("scores",)

    def required(self) -> tuple[str, ...]:
        f = self.config.features
        emb = {"image_text": ("image_embeddings", "text_embeddings"), "image": ("image_embeddings",),
               "text": ("text_embeddings",)}[f]
        return super().required() + emb

    def select(self, view: FilterView) -> np.ndarray:
        c = self.config
        kinds = {"image_text": ("image", "text"), "image": ("image",), "text": ("text",)}[c.features]
        scores = view.scores(c.score_column or None)
        valid = view.usable(*kinds) & np.isfinite(scores)
        self.drop("no_embedding", int((~valid).sum()))
        rows = np.flatnonzero(valid)
        parts = [view.image_embeddings() if kind == "image" else view.text_embeddings() for kind in kinds]
        src = Rows(parts, rows)
        m = len(rows)
        big = m * src.dim * 2 > available_memory() / 4
        method = c.knn if c.knn != "auto" else ("flat" if m <= c.exact_max else "ivf")
        workdir = None
        if method == "ivf" and (c.on_disk == "always" or (c.on_disk == "auto" and big)):
            lists = {"lists": knn_lists(m, c.nlist)}
            if lists["lists"] > FLAT_LISTS:  # lists made in two levels; graphs of one level keep their earlier keys
                lists["two_level"] = True
            key = stable_hash({"pool": view.pool_id, "space": view.space, "rows": hashlib.sha256(rows).hexdigest(),
                               "features": c.features, **lists, **{f: getattr(c, f) for f in GRAPH_FIELDS}})
            workdir = view.workdir / f"d2_knn-{key}"
            self.details["knn_workdir"] = str(workdir)
        with self.phase("knn"):
            # the graph's settings are exactly the fields its cache key holds
            nbrs, dists, method = knn_graph(src, method=method, workdir=workdir, copy=workdir is not None,
                                            **{f: getattr(c, f) for f in GRAPH_FIELDS})
            self.details["knn"] = method
        with self.phase("forward"):
            g = forward_pass(scores[rows] + c.score_offset, nbrs, dists, c.gamma)
        with self.phase("reverse"):
            picked = SELECTIONS[c.selection](g, nbrs, dists, c.beta, int(len(rows) * c.fraction))
        self.drop("d2_pruned", len(rows) - len(picked))
        return view.uids_of(rows[picked])
