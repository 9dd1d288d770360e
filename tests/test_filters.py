"""Filters: each built-in against an independent brute-force computation, determinism, the plugin harness's checks,
configs, subsets and the command line. Everything runs on toy pools with random embeddings (CPU, a few seconds)."""

from __future__ import annotations

import importlib.metadata as im
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pytest

from test_filters_helpers import SPACE, embed_pool, make_pool, unit, write_reference

from conftest import write_toy_pool
from datafilter.filters import FilterError, FilterView, load_filter, load_subset, run_filter, save_subset
from datafilter.filters import registry
from datafilter.filters.base import Filter, make_config, parse_params
from datafilter.filters.builtin import clusters as clusters_mod
from datafilter.filters.builtin.d2 import forward_pass, reverse_pass
from datafilter.filters.builtin.scores import ClipScoreConfig
from datafilter.filters.builtin.simple import caption_matches
from datafilter.filters.harness import filter_pool
from datafilter.filters.ops import Rows, knn_graph, split_lists, top_fraction_mask
from datafilter.pool.uid import uids_from_arrow
from datafilter.pool.uid import UID_DTYPE, hex_to_uids, make_uid, sort_uids, uids_to_hex


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    import torch

    torch.set_num_threads(1)
    monkeypatch.setattr("datafilter.filters.ops.free_cores", lambda: 1)


def array_view(n: int, seed: int = 0, dim: int = 8, scores=None, invalid=(), **kw) -> tuple[FilterView, dict]:
    rng = np.random.default_rng(seed)
    uids = hex_to_uids([make_uid("t", str(seed), str(i)) for i in range(n)])
    img = unit(rng.normal(size=(n, dim))).astype(np.float16)
    txt = unit(rng.normal(size=(n, dim))).astype(np.float16)
    valid = np.ones(n, bool)
    valid[list(invalid)] = False
    img[~valid] = np.nan
    txt[~valid] = np.nan
    s = (img.astype(np.float32) * txt.astype(np.float32)).sum(1) if scores is None else np.asarray(scores, np.float32)
    view = FilterView(uids, image=img, text=txt, scores={"clip_score": s}, score_column="clip_score", valid=valid,
                      metadata=pa.table({"uid": uids_to_hex(uids), "text": [f"caption {i}" for i in range(n)]}),
                      **kw)
    return view, {"uids": uids, "image": img.astype(np.float32), "text": txt.astype(np.float32), "valid": valid,
                  "score": s}


def run(name: str, view: FilterView, **params):
    flt, where = load_filter(name, {k: str(v) for k, v in params.items()})
    return run_filter(flt, view, plugin=where)


# --- utilities ---------------------------------------------------------------------------------------------------------
def test_fast_uid_parser_matches_reference_parser():
    hexes = [make_uid("x", str(i)) for i in range(1000)] + ["F" * 32, "0" * 32]
    col = pa.chunked_array([pa.array(hexes[:500]), pa.array(hexes[500:])])
    assert np.array_equal(uids_from_arrow(col), hex_to_uids(hexes))
    with pytest.raises(ValueError, match="32 hex"):
        uids_from_arrow(pa.array(["zz" * 16]))


def test_view_is_read_only_and_hides_nothing_it_should_not(tmp_path):
    pool, arr = make_pool(tmp_path)
    (pool / "ground_truth.parquet").write_bytes(b"")
    view = FilterView.from_pool(pool)
    with pytest.raises(ValueError):
        view.image_embeddings()[0, 0] = 1
    with pytest.raises(ValueError):
        view.scores()[0] = 1
    assert not hasattr(view, "ground_truth") and "noise" not in view.columns
    assert np.array_equal(view.uids, arr["uids"])
    assert np.allclose(view.image_embeddings(), arr["image"])


# --- CLIP score -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.45, 0.999, 1.0])
def test_clip_score_top_fraction_is_datacomps_quantile_with_ties_and_nan(fraction):
    rng = np.random.default_rng(1)
    scores = rng.choice(np.round(np.linspace(-0.1, 0.4, 23), 2), 400).astype(np.float32)  # many ties
    invalid = (0, 7, 99)
    view, arr = array_view(400, scores=scores, invalid=invalid)
    res = run("clip_score", view, fraction=fraction)
    s = scores.copy()
    s[list(invalid)] = np.nan
    finite = s[np.isfinite(s)]
    n = int(len(finite) * fraction)  # DataComp: threshold = -sort(-s)[n], keep s >= threshold
    expected = np.isfinite(s) if n >= len(finite) else np.isfinite(s) & (s >= -np.sort(-finite)[n])
    assert np.array_equal(res.uids, sort_uids(arr["uids"][expected]))
    assert res.counts["no_embedding"] == 3
    assert res.counts["low_clip_score"] == 397 - expected.sum()


def test_clip_score_threshold_and_named_column():
    view, arr = array_view(100, seed=2)
    res = run("clip_score", view, fraction="none", threshold=0.05, column="clip_score")
    assert np.array_equal(res.uids, sort_uids(arr["uids"][arr["score"] >= 0.05]))
    with pytest.raises(ValueError, match="exactly one"):
        make_config(ClipScoreConfig, {"threshold": "0.1"}, owner="clip_score")
    with pytest.raises(FilterError, match="no score column 'nope'"):
        run("clip_score", view, column="nope")


# --- image-based ------------------------------------------------------------------------------------------------------
def test_image_based_selection_with_given_centroids(monkeypatch):
    view, arr = array_view(300, seed=3, invalid=(5, 6), references={"ref": None})
    rng = np.random.default_rng(4)
    centroids = unit(rng.normal(size=(12, 8))).astype(np.float32)
    ref = unit(rng.normal(size=(4, 8))).astype(np.float16)
    view._refs["ref"] = ref
    monkeypatch.setattr(clusters_mod, "kmeans", lambda x, k, **kw: centroids)
    res = run("image_based", view, reference="ref", caption_filter=False, clusters=12)
    # brute force: nearest centroid by inner product, for pool rows and reference rows
    pool_label = np.argmax(arr["image"] @ centroids.T, axis=1)
    targets = set(np.argmax(ref.astype(np.float32) @ centroids.T, axis=1).tolist())
    expected = arr["valid"] & np.isin(pool_label, list(targets))
    assert 0 < expected.sum() < 298
    assert np.array_equal(res.uids, sort_uids(arr["uids"][expected]))
    assert res.counts == {"no_embedding": 2, "off_target_cluster": int(298 - expected.sum())}


def test_image_based_keeps_exactly_the_reference_blobs_and_intersects_with_clip_score(tmp_path):
    rng = np.random.default_rng(5)
    centres = unit(rng.normal(size=(6, 16)))
    blob = np.arange(96) % 6
    image = unit(centres[blob] + 0.02 * rng.normal(size=(96, 16)))
    pool = write_toy_pool(tmp_path / "pool", n=96, shard_size=32)
    arr = embed_pool(pool, image=image, text=unit(rng.normal(size=(96, 16))))
    # many reference samples in blobs 1 and 4: every cluster k-means makes inside those blobs gets a reference hit
    write_reference(pool, "imagenet_train", unit(centres[np.repeat([1, 4], 30)] + 0.02 * rng.normal(size=(60, 16))))
    view = FilterView.from_pool(pool)
    res = run("image_based", view, clusters=12, caption_filter=False)
    assert np.array_equal(res.uids, sort_uids(arr["uids"][np.isin(blob, [1, 4])]))
    fast = run("image_based", view, clusters=12, caption_filter=False, pca_dim=4, kmeans_sample=64, candidates=3)
    assert np.array_equal(fast.uids, res.uids) and fast.extra["kmeans_points"] == 64
    both = run("image_based_clip_score", view, clusters=12, caption_filter=False, fraction=0.5)
    clip = top_fraction_mask(arr["score"], 0.5)
    assert np.array_equal(both.uids, sort_uids(arr["uids"][np.isin(blob, [1, 4]) & clip]))
    assert sum(both.counts.values()) + both.kept == 96


def test_two_step_nearest_centroid_is_exact_when_all_centroids_are_candidates():
    from datafilter.filters.ops import PCA, nearest_centroid, nearest_centroid_pca

    rng = np.random.default_rng(14)
    basis = rng.normal(size=(6, 24))  # data near a 6-dimensional subspace, as embeddings mostly are
    x = unit(rng.normal(size=(500, 6)) @ basis + 0.05 * rng.normal(size=(500, 24))).astype(np.float16)
    centroids = (x[:40].astype(np.float32) * rng.uniform(0.5, 1.5, (40, 1))).astype(np.float32)  # unequal norms
    pca = PCA(x.astype(np.float32), 6)
    exact = nearest_centroid(x, np.arange(500), centroids)
    assert np.array_equal(nearest_centroid_pca(x, np.arange(500), centroids, pca, 40), exact)
    assert (nearest_centroid_pca(x, np.arange(500), centroids, pca, 4) == exact).mean() > 0.95


# --- D² pruning -------------------------------------------------------------------------------------------------------
def test_d2_forward_and_reverse_on_a_hand_computed_graph():
    # 4 nodes on a line; each node's neighbours (k=2) and squared distances, by hand.
    s = np.array([0.5, 0.4, 0.3, 0.6])
    nbrs = np.array([[1, 2], [0, 2], [1, 3], [2, 1]])
    d = np.array([[1.0, 4.0], [1.0, 1.0], [1.0, 1.0], [1.0, 4.0]])
    e1, e4 = np.exp(-1.0), np.exp(-4.0)
    g = forward_pass(s, nbrs, d, gamma=1.0)
    assert np.allclose(g, [0.5 + 0.4 * e1 + 0.3 * e4, 0.4 + 0.5 * e1 + 0.3 * e1, 0.3 + 0.4 * e1 + 0.6 * e1,
                           0.6 + 0.3 * e1 + 0.4 * e4])
    # reverse: node 3 has the largest score (0.6 + 0.3e^-1 + 0.4e^-4 = 0.7177); it lowers nodes 2 and 1.
    picked = reverse_pass(g, nbrs, d, beta=1.0, budget=2)
    g2 = g.copy()
    g2[[2, 1]] -= np.array([e1, e4]) * g[3]
    g2[3] = -np.inf
    assert picked[0] == 3 and picked[1] == int(np.argmax(g2))


def test_d2_with_one_neighbour_on_a_hand_computed_graph():
    """The authors' DataComp recipe (k = 1, gamma = beta = 1): a near-duplicate pair keeps one member, and a
    low-score sample far from everything picked is kept before a higher-score neighbour of a picked one."""
    s = np.array([0.30, 0.28, 0.10, 0.25, 0.05])  # CLIP score + offset
    nbrs = np.array([[1], [0], [3], [2], [3]])  # 0 <-> 1 (near-duplicates), 2 <-> 3, 4 -> 3
    d = np.array([[0.01], [0.01], [0.5], [0.5], [2.0]])
    g = forward_pass(s, nbrs, d, gamma=1.0)
    assert np.allclose(g, [0.30 + 0.28 * np.exp(-0.01), 0.28 + 0.30 * np.exp(-0.01), 0.10 + 0.25 * np.exp(-0.5),
                           0.25 + 0.10 * np.exp(-0.5), 0.05 + 0.25 * np.exp(-2.0)])
    # 0 first (0.5772); it lowers 1 to 0.5770 - e^-0.01 * 0.5772 = 0.0055. Then 3 (0.3107), which lowers 2 to
    # 0.2516 - e^-0.5 * 0.3107 = 0.0632. Then 4 (0.0838) beats 2 (0.0632) and 1 (0.0055).
    assert reverse_pass(g, nbrs, d, beta=1.0, budget=3).tolist() == [0, 3, 4]
    assert reverse_pass(g, nbrs, d, beta=1.0, budget=5).tolist() == [0, 3, 4, 2, 1]
    # The authors' loop, by hand: 0 is picked (it beats 1, next in the initial order); 1, lowered below 3, is set
    # aside; 3 beats 2 and is picked; 2, lowered below 4, is set aside; 4 is last in line and picked; then the
    # set-aside rows, best first.
    from datafilter.filters.builtin.d2 import reverse_pass_lookahead

    assert reverse_pass_lookahead(g, nbrs, d, beta=1.0, budget=5).tolist() == [0, 3, 4, 2, 1]


def test_d2_defaults_are_the_authors_datacomp_recipe():
    from datafilter.filters.builtin.d2 import D2Config

    c = D2Config()
    assert (c.features, c.k, c.gamma, c.beta, c.score_offset, c.fraction, c.selection) == (
        "image_text", 1, 1.0, 1.0, 0.115, 0.3, "lookahead")


def naive_reverse(g, nbrs, d, beta, budget):
    g = g.astype(np.float64).copy()
    taken = np.zeros(len(g), bool)
    out = []
    for _ in range(budget):
        i = int(np.argmax(np.where(taken, -np.inf, g)))
        out.append(i)
        taken[i] = True
        for j, dist in zip(nbrs[i], d[i]):
            g[j] -= np.exp(-beta * dist) * g[i]
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_d2_reverse_pass_equals_repeated_argmax(seed):
    rng = np.random.default_rng(seed)
    n, k = 300, 5
    nbrs = np.array([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    d = rng.uniform(0, 3, size=(n, k))
    g = rng.normal(0.3, 0.4, n)  # negative scores included: picks can raise neighbours
    assert np.array_equal(reverse_pass(g, nbrs, d, 1.5, 200), naive_reverse(g, nbrs, d, 1.5, 200))


def naive_lookahead(g, nbrs, d, beta, budget):
    """The authors' DataComp selection loop, step by step with a plain list of set-aside rows."""
    g = g.astype(np.float64).copy()
    order = np.argsort(-g, kind="stable")
    aside, picked, counter = [], [], 0

    def lower(i):
        for j, dist in zip(nbrs[i], d[i]):
            g[j] -= np.exp(-beta * dist) * g[i]

    while len(picked) < budget:
        if aside and (counter >= len(g) or max(g[aside]) >= g[order[counter]]):
            i = aside.pop(int(np.argmax(g[aside])))
            picked.append(i)
            lower(i)
            continue
        i = order[counter]
        if counter + 1 < len(g) and g[i] < g[order[counter + 1]]:
            aside.append(i)
        else:
            picked.append(i)
            lower(i)
        counter += 1
    return np.array(picked)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5])
def test_d2_lookahead_selection_equals_the_authors_loop(seed, k):
    from datafilter.filters.builtin.d2 import reverse_pass_lookahead

    rng = np.random.default_rng(seed)
    n = 300
    nbrs = np.array([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    d = rng.uniform(0, 3, size=(n, k))
    g = rng.normal(0.3, 0.4, n)  # negative scores included: picks can raise set-aside rows
    assert np.array_equal(reverse_pass_lookahead(g, nbrs, d, 1.0, 200), naive_lookahead(g, nbrs, d, 1.0, 200))


@pytest.mark.parametrize("features, selection", [("image_text", "greedy"), ("image_text", "lookahead"),
                                                 ("image", "lookahead"), ("text", "greedy")])
def test_d2_filter_equals_brute_force_on_exact_neighbours(features, selection):
    view, arr = array_view(160, seed=7, invalid=(3, 50))
    res = run("d2_pruning", view, fraction=0.4, features=features, k=6, gamma=2.0, beta=1.5, selection=selection)
    rows = np.flatnonzero(arr["valid"])
    x = {"image_text": np.hstack([arr["image"], arr["text"]]), "image": arr["image"], "text": arr["text"]}[features]
    x = x[rows].astype(np.float64)
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    nbrs = np.argsort(d2, axis=1, kind="stable")[:, :6]
    dist = np.take_along_axis(d2, nbrs, 1)
    s = np.maximum(arr["score"][rows] + 0.115, 1e-7)
    g = s + (np.exp(-2.0 * dist) * s[nbrs]).sum(1)
    naive = {"greedy": naive_reverse, "lookahead": naive_lookahead}[selection]
    picked = naive(g, nbrs, dist, 1.5, int(len(rows) * 0.4))
    assert np.array_equal(res.uids, sort_uids(arr["uids"][rows[picked]]))
    assert res.counts == {"no_embedding": 2, "d2_pruned": len(rows) - len(picked)}


def test_knn_neighbours_belong_to_their_rows_with_duplicates_and_ivf():
    rng = np.random.default_rng(8)
    centres = rng.normal(size=(30, 32))
    x = unit(centres[rng.integers(0, 30, 3000)] + 0.3 * rng.normal(size=(3000, 32))).astype(np.float32)
    x[10] = x[11]  # exact duplicate: the self match may not come first
    ids, dist, method = knn_graph(x, 5, method="flat")
    assert method == "flat" and not (ids == np.arange(3000)[:, None]).any()
    assert ids[10, 0] == 11 and dist[10, 0] < 1e-5
    brute = np.argsort(((x[:200, None] - x[None]) ** 2).sum(-1) + np.eye(200, 3000) * 1e9, axis=1)[:, :5]
    assert (ids[:200] == brute).mean() > 0.99
    ids_ivf, dist_ivf, _ = knn_graph(x, 5, method="ivf", pca_dim=0, nprobe=8)
    assert not (ids_ivf == np.arange(3000)[:, None]).any()
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids_ivf, ids)])
    assert recall > 0.9
    exact = ((x[:, None] - x[ids_ivf[:, :1].ravel()][:, None]) ** 2).sum(-1)[:, 0]
    assert np.allclose(dist_ivf[:, 0], exact, atol=1e-4)
    # lists made on a PCA projection: distances are still exact in the full space
    ids_pca, dist_pca, _ = knn_graph(x, 5, method="ivf", pca_dim=16, nprobe=8)
    exact = ((x[:, None] - x[ids_pca.ravel()].reshape(3000, 5, 32)) ** 2).sum(-1)
    assert np.allclose(dist_pca, exact, atol=1e-4) and np.all(np.diff(ids_pca, axis=1) != 0)


def test_split_lists_caps_sizes_and_separates_blobs():
    rng = np.random.default_rng(21)
    # list 0: two far-apart blobs of 300 rows each; list 1: 50 rows; cap 200
    blobs = np.concatenate([rng.normal(-5, 0.1, (300, 4)), rng.normal(5, 0.1, (300, 4)), rng.normal(0, 1, (50, 4))])
    lists = np.array([0] * 600 + [1] * 50)
    out = split_lists(blobs.astype(np.float32), lists, cap=200)
    sizes = np.bincount(out)
    assert sizes.max() <= 200 and sizes.sum() == 650
    assert np.array_equal(out[600:], lists[600:])  # a list under the cap is left alone
    # the first cut is the principal axis: no piece mixes the two blobs
    assert not set(out[:300]) & set(out[300:600])
    assert np.array_equal(split_lists(blobs.astype(np.float32), lists, cap=200), out)  # deterministic


def test_ivf_knn_over_two_parts_matches_brute_force_on_separated_clusters():
    """Image and text read as two arrays (float16, as stored) give the graph of their concatenation."""
    rng = np.random.default_rng(22)
    c = rng.integers(0, 40, 4000)
    img = unit(rng.normal(size=(40, 24))[c] + 0.2 * rng.normal(size=(4000, 24))).astype(np.float16)
    txt = unit(rng.normal(size=(40, 24))[c] + 0.2 * rng.normal(size=(4000, 24))).astype(np.float16)
    rows = np.sort(rng.choice(4000, 3000, replace=False))
    ids, dist, method = knn_graph(Rows([img, txt], rows), 5, method="ivf", pca_dim=8, nlist=60, nprobe=3)
    x = np.concatenate([img, txt], axis=1).astype(np.float32)[rows]
    d = ((x[:300, None] - x[None]) ** 2).sum(-1)
    d[np.arange(300), np.arange(300)] = np.inf
    brute = np.argsort(d, axis=1, kind="stable")[:, :5]
    assert method == "ivf"
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids[:300], brute)]) > 0.95
    assert np.allclose(dist[:300], np.take_along_axis(d, ids[:300], 1), atol=1e-4)


def test_ivf_knn_with_halved_lists_is_exact_when_every_list_is_probed(monkeypatch):
    """One dense blob holds most rows: k-means gives it one big list, which is halved; probing every list then
    must give the brute-force graph exactly (the halves lose no row, and each row keeps its own neighbours)."""
    import datafilter.filters.ops as ops

    rng = np.random.default_rng(23)
    x = np.concatenate([rng.normal(0, 0.05, (900, 6)), rng.normal(3, 1.0, (100, 6))]).astype(np.float32)
    # k-means as it goes on such data: one centroid on the blob, the others on the sparse rows
    monkeypatch.setattr(ops, "kmeans", lambda v, k, **kw: np.concatenate([np.zeros((1, 6)), x[900:909]]).astype(
        np.float32))
    made = []
    real = ops.split_lists
    monkeypatch.setattr(ops, "split_lists", lambda *a: made.append(real(*a)) or made[-1])
    ids, dist, _ = knn_graph(x, 4, method="ivf", pca_dim=0, nlist=10, nprobe=1000, balance=1.5)
    assert len(made) == 1 and np.bincount(made[0]).max() <= 150 < np.bincount(made[0][:900]).sum()  # blob halved
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    d[np.arange(1000), np.arange(1000)] = np.inf
    assert np.array_equal(np.sort(ids, 1), np.sort(np.argsort(d, axis=1, kind="stable")[:, :4], 1))
    assert np.allclose(dist, np.sort(d, 1)[:, :4], atol=1e-5)


def test_two_level_lists_cover_every_row_once_and_keep_the_graph(monkeypatch):
    """Lists made in two levels (coarse cells, then k-means inside each): about ``nlist`` lists, no list crossing
    a coarse cell, and a graph as good as with lists from one k-means."""
    import functools

    import datafilter.filters.ops as ops

    rng = np.random.default_rng(25)
    c = rng.integers(0, 80, 6000)
    x = unit(rng.normal(size=(80, 16))[c] + 0.15 * rng.normal(size=(6000, 16))).astype(np.float32)
    lists = ops.kmeans_lists(x, 100, niter=10, seed=0, flat_max=0)
    assert lists.shape == (6000,) and lists.min() == 0 and 80 <= lists.max() + 1 <= 120
    coarse = ops._kmeans_cells(x, 10, 3200, niter=10, seed=0)
    assert all(len(set(coarse[lists == li])) == 1 for li in np.unique(lists))  # fine lists split coarse cells
    assert np.array_equal(ops.kmeans_lists(x, 100, niter=10, seed=0, flat_max=0), lists)  # deterministic
    flat = ops.kmeans_lists(x, 100, niter=10, seed=0)
    assert flat.max() + 1 == 100 and not np.array_equal(flat, lists)

    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    d[np.arange(6000), np.arange(6000)] = np.inf
    brute = np.argsort(d, axis=1)[:, :5]
    real = ops.kmeans_lists
    recall = {}
    for name, flat_max in [("flat", ops.FLAT_LISTS), ("two_level", 0)]:
        monkeypatch.setattr(ops, "kmeans_lists", functools.partial(real, flat_max=flat_max))
        ids, dist, _ = knn_graph(x, 5, method="ivf", pca_dim=0, nlist=100, nprobe=6)
        recall[name] = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ids, brute)])
        assert np.allclose(dist, np.take_along_axis(d, ids, 1), atol=1e-4)  # distances stay exact
    assert recall["two_level"] > 0.9 and recall["two_level"] > recall["flat"] - 0.05


def test_ivf_knn_pads_rows_with_too_few_candidates(monkeypatch):
    """A list of 4 rows probed alone: each of its rows gets the 3 others, then -1 / inf, never itself."""
    import datafilter.filters.ops as ops

    rng = np.random.default_rng(24)
    x = np.concatenate([rng.normal(0, 0.1, (12, 2)), rng.normal(100, 0.1, (4, 2))]).astype(np.float32)
    monkeypatch.setattr(ops, "kmeans", lambda v, k, **kw: np.array([[0, 0], [100, 100]], np.float32))
    ids, dist, _ = knn_graph(x, 6, method="ivf", pca_dim=0, nlist=2, nprobe=1, balance=0)
    assert not (ids == np.arange(16)[:, None]).any() and np.array_equal(ids < 0, np.isinf(dist))
    assert (ids[:12] >= 0).all() and (ids[:12] < 12).all()
    for i in range(12, 16):
        assert sorted(ids[i, :3]) == sorted(set(range(12, 16)) - {i}) and (ids[i, 3:] == -1).all()


# --- SemDeDup ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compare", ["any", "kept"])
def test_semdedup_drops_planted_pairs_like_brute_force(compare):
    rng = np.random.default_rng(9)
    n = 120
    view, arr = array_view(n, seed=9, dim=16)
    base = arr["image"].copy()
    for a, b in [(1, 2), (10, 40), (41, 42), (42, 43)]:  # a chain 41-42-43 as well
        base[b] = unit(base[a][None] + 0.01 * rng.normal(size=(1, 16)))[0]
    view = FilterView(arr["uids"], image=base.astype(np.float16), text=arr["text"].astype(np.float16))
    res = run("semdedup", view, clusters=1, eps=0.01, compare=compare)
    x = base.astype(np.float16).astype(np.float32)
    c = x.mean(0)  # one cluster: its centroid is the mean
    order = np.lexsort((np.arange(n), x @ c / np.linalg.norm(c)))
    kept: list[int] = []
    for pos, i in enumerate(order):
        earlier = kept if compare == "kept" else order[:pos]  # the paper: any earlier member, kept or not
        if all(float(x[i] @ x[j]) <= 0.99 for j in earlier):
            kept.append(i)
    assert np.array_equal(res.uids, sort_uids(arr["uids"][np.sort(kept)]))
    assert 3 <= res.counts["near_duplicate"] <= 4


def test_semdedup_blocks_do_not_change_the_result():
    from datafilter.filters.builtin.clusters import dedup_cluster

    rng = np.random.default_rng(15)
    x = unit(rng.normal(size=(50, 8)))
    x[20:30] = unit(x[:10] + 0.05 * rng.normal(size=(10, 8)))
    x[30:35] = unit(x[20:25] + 0.05 * rng.normal(size=(5, 8)))  # chains: the two rules differ
    x = x.astype(np.float32)
    for compare in ("kept", "any"):
        kept: list[int] = []
        for i in range(50):
            earlier = kept if compare == "kept" else range(i)
            if all(float(x[i] @ x[j]) <= 0.97 for j in earlier):
                kept.append(i)
        expected = np.isin(np.arange(50), kept)
        assert 0 < (~expected).sum()
        assert np.array_equal(dedup_cluster(x, 0.97, block=7, compare=compare), expected)
        assert np.array_equal(dedup_cluster(x, 0.97, compare=compare), expected)
    assert (dedup_cluster(x, 0.97, compare="any") <= dedup_cluster(x, 0.97, compare="kept")).all()


# --- negCLIPLoss, NormSim, VAE ----------------------------------------------------------------------------------------
def test_negclip_one_batch_matches_the_formula():
    view, arr = array_view(64, seed=10, invalid=(0,))
    res = run("negclip", view, fraction=0.5, batch_size=1000, repeats=1, temperature=0.05)
    v = arr["valid"]
    a, b = arr["image"][v], arr["text"][v]
    s = a @ b.T / 0.05

    def lse(m, ax):
        mx = m.max(ax, keepdims=True)
        return (mx + np.log(np.exp(m - mx).sum(ax, keepdims=True))).squeeze(ax)

    neg = np.full(64, np.nan)
    neg[v] = (a * b).sum(1) - 0.025 * (lse(s, 1) + lse(s, 0))
    assert np.array_equal(res.uids, sort_uids(arr["uids"][top_fraction_mask(neg, 0.5)]))


def test_negclip_batches_stay_within_shards_as_the_papers_code():
    view, arr = array_view(64, seed=10, shard_rows=[30, 34])
    res = run("negclip", view, fraction=0.5, temperature=0.05)  # batch 32,768: each shard is one batch
    neg = np.empty(64)
    for lo, hi in ((0, 30), (30, 64)):
        a, b = arr["image"][lo:hi], arr["text"][lo:hi]
        s = a @ b.T / 0.05
        lse = lambda m, ax: np.log(np.exp(m - m.max()).sum(ax)) + m.max()  # noqa: E731
        neg[lo:hi] = (a * b).sum(1) - 0.025 * (lse(s, 1) + lse(s, 0))
    assert np.array_equal(res.uids, sort_uids(arr["uids"][top_fraction_mask(neg, 0.5)]))
    pooled = run("negclip", view, fraction=0.5, temperature=0.05, batching="pool")  # one batch of all 64
    assert not np.array_equal(pooled.uids, res.uids)


def test_normsim_inverted_lists_equal_exhaustive_when_every_list_is_probed():
    target = unit(np.random.default_rng(1).normal(size=(40, 8)))
    view, arr = array_view(80, seed=11, references={"target": target})
    exact = run("normsim", view, reference="target", search="exact", fraction=0.25)
    ivf = run("normsim", view, reference="target", search="ivf", nlist=5, nprobe=5, fraction=0.25)
    assert np.array_equal(exact.uids, ivf.uids) and ivf.extra["normsim"]["search"]["method"] == "ivf"
    assert ivf.extra["normsim"]["search"]["recall_sample"]["agree_with_exhaustive"] == 1.0


@pytest.mark.parametrize("p", ["inf", "2"])
def test_normsim_matches_the_formula(p):
    view, arr = array_view(80, seed=11, references={"target": unit(np.random.default_rng(0).normal(size=(5, 8)))})
    res = run("normsim", view, reference="target", p=p, fraction=0.25)
    sim = np.abs(arr["image"] @ view.reference("target").astype(np.float32).T)  # the paper's |<x, t>|
    score = sim.max(1) if p == "inf" else np.sqrt((sim ** 2).sum(1))
    assert np.array_equal(res.uids, sort_uids(arr["uids"][top_fraction_mask(score, 0.25)]))


def test_vae_drops_planted_outliers_and_is_deterministic():
    rng = np.random.default_rng(12)
    n, dim = 400, 16
    basis = unit(rng.normal(size=(2, dim)))
    x = unit(rng.normal(size=(n, 2)) @ basis + 0.01 * rng.normal(size=(n, dim)))
    outliers = np.arange(0, n, 40)  # 10 samples off the data's plane
    x[outliers] = unit(rng.normal(size=(len(outliers), dim)))
    uids = hex_to_uids([make_uid("v", str(i)) for i in range(n)])
    view = FilterView(uids, image=x.astype(np.float16))
    params = dict(drop_fraction=0.05, epochs=40, hidden=32, latent=2, batch_size=64, threads=1)
    res = run("vae_outlier", view, **params)
    dropped = ~np.isin(uids, res.uids)
    assert dropped.sum() == 20 and dropped[outliers].sum() >= 9
    assert np.array_equal(res.uids, run("vae_outlier", view, **params).uids)


# --- basic and text-based ---------------------------------------------------------------------------------------------
def test_caption_matching_is_whole_words():
    texts = ["A golden retriever on grass", "retrievers", "goldfish bowl", "the tench, a fish", "Great White Shark!"]
    got = caption_matches(texts, ["golden retriever", "tench", "great white shark", "fish"])
    assert got.tolist() == [True, False, False, True, True]


def test_basic_filter_counts_each_sample_once():
    texts = ["ok", "a dog on a beach", "un chien sur la plage avec un ballon rouge", "a cat on a sofa", "a bird in a tree"]
    n = len(texts)
    uids = hex_to_uids([make_uid("b", str(i)) for i in range(n)])
    meta = pa.table({"uid": uids_to_hex(uids), "text": texts, "original_width": [300, 300, 300, 100, 900],
                     "original_height": [300, 300, 300, 300, 200]})
    res = run("basic", FilterView(uids, metadata=meta))
    assert res.counts == {"caption_too_short": 1, "wrong_language": 1, "image_too_small": 1, "aspect_ratio": 1}
    assert np.array_equal(res.uids, sort_uids(uids[[1]]))


# --- determinism ------------------------------------------------------------------------------------------------------
DETERMINISM = [("random", {"fraction": 0.4, "seed": 3}), ("clip_score", {}), ("image_based", {"clusters": 5}),
               ("image_based_clip_score", {"clusters": 5}), ("d2_pruning", {"knn": "ivf", "pca_dim": 4}),
               ("semdedup", {"eps": 0.3, "clusters": 3}), ("negclip", {"batch_size": 32}),
               ("normsim", {"negclip_fraction": 0.5}), ("vae_outlier", {"epochs": 2, "threads": 1}),
               ("none", {})]


def test_same_config_same_subset_byte_for_byte(tmp_path):
    pool, arr = make_pool(tmp_path, n=96, shard_size=40, invalid=(4,))
    write_reference(pool, "imagenet_train", arr["image"][10:14])
    for name, params in DETERMINISM:
        p = {k: str(v) for k, v in params.items()}
        if name.startswith("image_based"):
            p["caption_filter"] = "false"
        a, _ = filter_pool(name, pool, tmp_path / "a" / f"{name}.npy", params=p)
        b, _ = filter_pool(name, pool, tmp_path / "b" / f"{name}.npy", params=p)
        assert (tmp_path / "a" / f"{name}.npy").read_bytes() == (tmp_path / "b" / f"{name}.npy").read_bytes(), name
        if name != "none":  # rows without embeddings never survive an embedding-based filter
            assert not np.isin(arr["uids"][4], a.uids) or name == "random", name
    r3 = filter_pool("random", pool, tmp_path / "c.npy", params={"fraction": "0.4", "seed": "4"})[0]
    assert not np.array_equal(r3.uids, load_subset(tmp_path / "a" / "random.npy")[0])


# --- bad plugins and missing inputs ---------------------------------------------------------------------------------------
class RaisingFilter(Filter):
    name = "raising"
    description = "raises halfway"

    def select(self, view):
        raise ZeroDivisionError("boom")


class StrangerFilter(Filter):
    name = "stranger"

    def select(self, view):
        return sort_uids(np.concatenate([view.uids[:3], hex_to_uids(["ab" * 16])]))


class UnsortedFilter(Filter):
    name = "unsorted"

    def select(self, view):
        u = view.sorted_uids()
        return u[::-1].copy()


class WrongDtypeFilter(Filter):
    name = "wrong_dtype"

    def select(self, view):
        return np.arange(view.n)


@pytest.fixture
def bad_plugins(monkeypatch):
    real = registry.available

    def fake():
        eps = real()
        for cls in (RaisingFilter, StrangerFilter, UnsortedFilter, WrongDtypeFilter):
            eps[cls.name] = im.EntryPoint(cls.name, f"test_filters:{cls.__name__}", registry.GROUP)
        return eps

    monkeypatch.setattr(registry, "available", fake)


@pytest.mark.parametrize("name,problem", [("raising", "raised ZeroDivisionError: boom"),
                                          ("stranger", "1 uid\\(s\\) that are not in the pool"),
                                          ("unsorted", "unsorted"), ("wrong_dtype", "dtype int64")])
def test_misbehaving_plugin_is_named_and_nothing_is_lost(tmp_path, bad_plugins, name, problem):
    pool, _ = make_pool(tmp_path)
    out = tmp_path / "subset.npy"
    filter_pool("clip_score", pool, out)
    before = (out.read_bytes(), out.with_suffix(".json").read_bytes())
    with pytest.raises(FilterError, match=f"filter '{name}' \\(test_filters:.*\\).*{problem}"):
        filter_pool(name, pool, out)
    assert (out.read_bytes(), out.with_suffix(".json").read_bytes()) == before
    assert not (tmp_path / f"{name}.npy").exists()


def test_missing_embeddings_and_reference_are_named_with_the_fix(tmp_path):
    pool = write_toy_pool(tmp_path / "pool", n=20, shard_size=10)
    with pytest.raises(FilterError, match="'clip_score'.*missing:\n  scores.*datafilter embed"):
        filter_pool("clip_score", pool, tmp_path / "x.npy")
    res, _ = filter_pool("none", pool, tmp_path / "none.npy")  # metadata-only filters still run
    assert res.kept == 20
    embed_pool(pool)
    with pytest.raises(FilterError, match="reference:imagenet_train in space 'test-space' \\(available: none\\)"):
        filter_pool("image_based", pool, tmp_path / "x.npy")
    assert not (tmp_path / "x.npy").exists()


def test_unknown_filter_and_parameter_get_did_you_mean():
    with pytest.raises(FilterError, match="did you mean 'd2_pruning'"):
        load_filter("d2_prunning")
    with pytest.raises(ValueError, match="did you mean 'fraction'"):
        load_filter("clip_score", {"fracton": "0.2"})
    with pytest.raises(ValueError, match="is not float"):
        load_filter("clip_score", {"fraction": "lots"})


def test_config_typing_and_yaml(tmp_path):
    cfg_file = tmp_path / "d2.yaml"
    cfg_file.write_text("params:\n  k: 7\n  features: image\n  nprobe: 3\n")
    params = parse_params(["gamma=0.5"], cfg_file)
    flt, _ = load_filter("d2_pruning", params)
    assert (flt.config.k, flt.config.features, flt.config.nprobe, flt.config.gamma) == (7, "image", 3, 0.5)
    with pytest.raises(ValueError, match="filter config not found"):
        parse_params([], tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("params: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        parse_params([], tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="not one of"):
        load_filter("d2_pruning", {"features": "audio"})
    assert flt.required() == ("scores", "image_embeddings")


# --- subset files ------------------------------------------------------------------------------------------------------
def test_subset_roundtrip_sidecar_and_stale_sidecar(tmp_path):
    uids = sort_uids(hex_to_uids([make_uid("s", str(i)) for i in range(10)]))
    uids = np.sort(np.concatenate([uids, uids[:2]]))  # repeats are allowed
    save_subset(tmp_path / "s.npy", uids, {"filter": "x"})
    got, meta = load_subset(tmp_path / "s.npy")
    assert np.array_equal(got, uids) and meta["filter"] == "x" and meta["count"] == 12
    assert np.load(tmp_path / "s.npy").dtype == UID_DTYPE  # what DataComp's resharder reads
    np.save(tmp_path / "s.npy", uids[:5])
    with pytest.raises(ValueError, match="another version"):
        load_subset(tmp_path / "s.npy")
    np.save(tmp_path / "plain.npy", uids[:5])
    assert load_subset(tmp_path / "plain.npy")[1] == {}
    with pytest.raises(ValueError, match="sorted"):
        save_subset(tmp_path / "t.npy", uids[::-1].copy(), {})


# --- command line --------------------------------------------------------------------------------------------------------
def test_cli_list_show_and_run(tmp_path, capsys):
    from datafilter.cli import main

    assert main(["filters", "list"]) == 0
    listed = capsys.readouterr().out
    for name in ("none", "random", "basic", "text_based", "clip_score", "image_based", "image_based_clip_score",
                 "d2_pruning", "semdedup", "negclip", "normsim", "vae_outlier"):
        assert f"\n{name} " in "\n" + listed
    assert main(["filters", "show", "clip_score"]) == 0
    assert "fraction" in capsys.readouterr().out
    pool, arr = make_pool(tmp_path)
    out = tmp_path / "sub" / "clip.npy"
    assert main(["filter", "clip_score", str(pool), "--out", str(out), "--param", "fraction=0.5"]) == 0
    uids, meta = load_subset(out)
    assert np.array_equal(uids, sort_uids(arr["uids"][top_fraction_mask(arr["score"], 0.5)]))
    assert meta["filter"] == "clip_score" and meta["params"]["fraction"] == 0.5 and meta["space"] == SPACE
    assert meta["input"] == 48 and meta["kept"] == len(uids) and meta["pool_id"]
    assert main(["filter", "clip_scor", str(pool), "--out", str(out)]) == 2


@dataclass(frozen=True)
class NeedsTargetConfig:
    target: str
    fraction: float = 0.5
    tags: list = field(default_factory=lambda: ["a"])


class NeedsTargetFilter(Filter):
    name = "needs_target"
    description = "a plugin whose config has a required field"
    Config = NeedsTargetConfig
    needs = ("reference:{target}",)

    def select(self, view):
        return view.sorted_uids()


def test_cli_show_plugin_with_required_config_field(monkeypatch, capsys):
    from datafilter.cli import main

    real = registry.available
    monkeypatch.setattr(registry, "available", lambda: real() | {
        "needs_target": im.EntryPoint("needs_target", "test_filters:NeedsTargetFilter", registry.GROUP)})
    assert main(["filters", "show", "needs_target"]) == 0
    out = capsys.readouterr().out
    assert "needs: reference:{target}" in out
    assert "target (str), required" in out and "fraction (float) = 0.5" in out and "tags (list) = ['a']" in out


def test_view_from_datacomp_metadata_runs_the_same_filters(tmp_path):
    """DataComp's released layout (parquet + npz with b32/l14 arrays) feeds the filters unchanged. CLIP score reads
    the score column only, as DataComp's baseline does; a filter that reads embeddings finds the zero vector."""
    import pyarrow.parquet as pq

    view, arr = array_view(60, seed=13)
    hexes = uids_to_hex(arr["uids"])
    zero = arr["image"].copy()
    zero[5] = 0  # DataComp marks missing embeddings with zero vectors
    for i, (lo, hi) in enumerate([(0, 30), (30, 60)]):
        pq.write_table(pa.table({"uid": hexes[lo:hi], "text": ["x"] * (hi - lo),
                                 "clip_l14_similarity_score": arr["score"][lo:hi]}), tmp_path / f"{i:08d}.parquet")
        np.savez(tmp_path / f"{i:08d}.npz", l14_img=zero[lo:hi].astype(np.float16),
                 l14_txt=arr["text"][lo:hi].astype(np.float16))
    dc = FilterView.from_datacomp(tmp_path, "l14")
    res = run("clip_score", dc, fraction=0.5)
    assert np.array_equal(res.uids, sort_uids(arr["uids"][top_fraction_mask(arr["score"], 0.5)]))
    assert "image" not in dc._cache and "text" not in dc._cache  # no embedding was read
    neg = run("negclip", dc, fraction=0.5, batch_size=1000)
    assert neg.counts["no_embedding"] == 1 and not np.isin(arr["uids"][5], neg.uids)


def test_d2_reverse_pass_ignores_missing_neighbours():
    from datafilter.filters.builtin.d2 import reverse_pass

    # Row 1 has one real neighbour (row 0) and one missing (-1). Picking row 1 must lower row 0 (2 - 1*2 < 0.5), and
    # the missing slot must not write row 0's old score back.
    nbrs = np.array([[-1, -1], [0, -1], [-1, -1]])
    picked = reverse_pass(np.array([1.0, 2.0, 0.5]), nbrs, np.zeros((3, 2)), beta=1.0, budget=2)
    assert picked.tolist() == [1, 2]


@pytest.mark.parametrize("name", ["semdedup", "image_based"])
def test_cluster_filters_on_a_pool_without_valid_embeddings_keep_nothing(name):
    target = unit(np.random.default_rng(0).normal(size=(3, 8)))
    view, _ = array_view(12, seed=3, invalid=range(12), references={"imagenet_train": target})
    res = run(name, view, **({"caption_filter": False} if name == "image_based" else {}))
    assert len(res.uids) == 0 and res.counts.get("no_embedding") == 12


def test_literal_parameters_from_yaml_numbers_are_accepted():
    flt, _ = load_filter("normsim", {"p": 2})  # YAML reads `p: 2` as an int; the choices are "inf" and "2"
    assert flt.config.p == "2"
    with pytest.raises(ValueError, match="not one of"):
        load_filter("normsim", {"p": 3})
