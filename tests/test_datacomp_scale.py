"""DataComp's released metadata at scale, on small fixtures in its exact layout: embeddings memory-mapped in place or
unpacked once (resumably), read only by filters that need them; parity of the uid sets with DataComp's own
algorithms (CLIP score, image-based with released centroids and ImageNet feature files); memory-mapped paths giving
the same subsets as in-memory arrays; D²'s on-disk graph resuming after a kill; bad input failing clearly."""

from __future__ import annotations

import errno

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from test_embed_datacomp import write_fake_datacomp
from test_filters import run
from test_filters_helpers import make_pool, unit, write_reference

from datafilter.embed.datacomp import DataCompMetadata, load_centroids, load_features
from datafilter.embed.store import EmbeddingError, ShardedArray
from datafilter.filters import FilterError, FilterView
from datafilter.filters import ops
from datafilter.pool.uid import hex_to_uids, sort_uids


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setattr("datafilter.filters.ops.free_cores", lambda: 1)


def clustered_datacomp(path, rows=(70, 50, 40), seed=0, compressed=False, dim=768):
    """DataComp's layout with clustered L/14 vectors, English and other captions, and tied scores."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    centres = unit(rng.normal(size=(6, dim)))
    words = ["a red bicycle leaning on a wall", "two dogs playing in the snow", "fresh bread on a table",
             "un chat noir sur le canapé", "ok", "mountain lake at sunrise"]
    out = {"uid": [], "l14_img": [], "text": [], "score": []}
    for shard, n in enumerate(rows):
        blob = rng.integers(0, 6, n)
        img = unit(centres[blob] + 0.8 * rng.normal(size=(n, dim)) / np.sqrt(dim))
        img[5:10] = unit(img[:5] + 0.05 * rng.normal(size=(5, dim)) / np.sqrt(dim))  # near-duplicates
        img = img.astype(np.float16)
        txt = unit(img.astype(np.float32) + 1.2 * rng.normal(size=(n, dim)) / np.sqrt(dim)).astype(np.float16)
        score = np.round((img.astype(np.float32) * txt).sum(1), 2).astype(np.float32)  # rounded: many ties
        uids = [f"{rng.integers(0, 2**63):016x}{rng.integers(0, 2**63):016x}" for _ in range(n)]
        text = [words[i] for i in rng.integers(0, len(words), n)]
        pq.write_table(pa.table({"uid": uids, "text": text, "clip_l14_similarity_score": score,
                                 "clip_b32_similarity_score": score}), path / f"{shard:08d}.parquet")
        arrays = {"l14_img": img, "l14_txt": txt, "b32_img": img[:, :512], "b32_txt": txt[:, :512]}
        (np.savez_compressed if compressed else np.savez)(path / f"{shard:08d}.npz", **arrays)
        out["uid"] += uids
        out["l14_img"].append(img)
        out["text"] += text
        out["score"].append(score)
    return {"uid": hex_to_uids(out["uid"]), "l14_img": np.concatenate(out["l14_img"]), "text": out["text"],
            "score": np.concatenate(out["score"]), "centres": centres}


def in_memory_view(meta: DataCompMetadata, **kw) -> FilterView:
    """The same pool as plain in-memory arrays: the reference the memory-mapped paths must agree with."""
    table = meta.metadata()
    return FilterView(meta.uids, metadata=table, image=np.asarray(meta.array("img")),
                      text=np.asarray(meta.array("txt")),
                      scores={meta.score_column: table.column(meta.score_column).to_numpy()},
                      score_column=meta.score_column, **kw)


# --- reading the files -------------------------------------------------------------------------------------------------
def test_sharded_array_indexes_like_the_joined_array():
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 3)).astype(np.float16) for n in (4, 0, 5, 2)]
    joined = np.concatenate(parts)
    arr = ShardedArray([len(p) for p in parts], 3, lambda i: parts[i])
    for key in (3, -1, slice(None), slice(2, 9), slice(1, 10, 3), np.array([10, 0, 4, 4, 7]), joined[:, 0] > 0,
                [5, 6, 7, 8], (slice(2, 6), 1)):
        assert np.array_equal(arr[key], joined[key]), key
    assert arr.shape == (11, 3) and len(arr) == 11 and np.array_equal(np.asarray(arr), joined)
    with pytest.raises(IndexError):
        arr[11]
    with pytest.raises(ValueError, match="read-only"):
        arr[0] = 1


def test_uncompressed_npz_is_memory_mapped_in_place_and_compressed_is_unpacked_once(tmp_path, monkeypatch):
    plain = clustered_datacomp(tmp_path / "plain")
    meta = DataCompMetadata(tmp_path / "plain")
    arr = meta.shard_array(1, "img")
    assert isinstance(arr, np.memmap) and str(arr.filename).endswith("00000001.npz")  # no copy, no unpacking
    assert np.array_equal(np.asarray(meta.array("img")), plain["l14_img"])

    clustered_datacomp(tmp_path / "packed", compressed=True)
    meta = DataCompMetadata(tmp_path / "packed", arrays_dir=tmp_path / "arrays")
    assert not isinstance(meta.shard_array(0, "img"), np.memmap)  # decompressed a shard at a time
    assert np.array_equal(np.asarray(meta.array("img")), plain["l14_img"])  # same values (same seed)

    import shutil

    real_copy = shutil.copyfileobj
    calls = []

    def killed_after_two(src, dst, length=0):  # the third array's unpacking is interrupted
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real_copy(src, dst, length)

    monkeypatch.setattr(shutil, "copyfileobj", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        meta.unpack(["img"], progress=False)
    monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    done = sorted(p.name for p in (tmp_path / "arrays").glob("*.npy"))
    assert len(done) == 2 and not list((tmp_path / "arrays").glob(".*tmp*"))
    written = meta.unpack(["img"], progress=False)  # resumes: only what is left
    assert [p.name for p in written] == ["00000002_l14_img.npy"]
    assert isinstance(meta.shard_array(2, "img"), np.memmap)
    assert np.array_equal(np.asarray(meta.array("img")), plain["l14_img"])


def test_unpacking_on_a_full_disk_fails_clearly_and_keeps_what_is_done(tmp_path, monkeypatch):
    import shutil

    clustered_datacomp(tmp_path / "packed", compressed=True)
    meta = DataCompMetadata(tmp_path / "packed", arrays_dir=tmp_path / "arrays")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(EmbeddingError, match=r"arrays: unpacking 3 array\(s\) needs .* GiB free"):
        meta.unpack(["img"], progress=False)
    monkeypatch.undo()
    real = shutil.copyfileobj
    count = []

    def full_after_one(src, dst, length=0):
        if count:
            raise OSError(errno.ENOSPC, "No space left on device")
        count.append(1)
        return real(src, dst, length)

    monkeypatch.setattr(shutil, "copyfileobj", full_after_one)
    with pytest.raises(EmbeddingError, match=r"00000001_l14_img\.npy: disk full .* 1 file\(s\) finished are kept"):
        meta.unpack(["img"], progress=False)
    assert [p.name for p in (tmp_path / "arrays").iterdir()] == ["00000000_l14_img.npy"]


def test_bad_metadata_files_are_named(tmp_path):
    clustered_datacomp(tmp_path / "m")
    npz = tmp_path / "m" / "00000001.npz"
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(EmbeddingError, match=r"00000001\.npz: unreadable npz, truncated"):
        DataCompMetadata(tmp_path / "m").array("img")
    npz.write_bytes(data)
    pq.write_table(pq.read_table(tmp_path / "m" / "00000002.parquet").slice(0, 30), tmp_path / "m" / "00000002.parquet")
    with pytest.raises(EmbeddingError, match=r"00000002\.npz: l14_img has shape \(40, 768\) but 00000002\.parquet "
                                             r"has 30 rows"):
        FilterView.from_datacomp(tmp_path / "m").image_embeddings()
    (tmp_path / "m" / "00000000.npz").unlink()
    with pytest.raises(EmbeddingError, match=r"00000000\.npz"):
        DataCompMetadata(tmp_path / "m")


def test_score_filters_read_no_embedding_and_zero_or_nan_vectors_are_found_when_read(tmp_path):
    got = clustered_datacomp(tmp_path / "m")
    npz = tmp_path / "m" / "00000000.npz"
    arrays = dict(np.load(npz))
    arrays["l14_img"][3] = 0
    arrays["l14_txt"][8] = np.nan
    np.savez(npz, **arrays)
    view = FilterView.from_datacomp(tmp_path / "m")
    res = run("clip_score", view, fraction=0.3)
    assert "image" not in view._cache and "text" not in view._cache and res.counts.get("no_embedding", 0) == 0
    assert np.isin(got["uid"][[3, 8]], view.uids[np.argsort(-got["score"], kind="stable")]).all()
    neg = run("negclip", view, fraction=0.5)
    assert neg.counts["no_embedding"] == 2 and not np.isin(got["uid"][[3, 8]], neg.uids).any()
    assert view.usable("image")[[3, 8]].tolist() == [False, True]  # image-only filters keep the NaN caption row


# --- parity with DataComp's algorithms ----------------------------------------------------------------------------------
def datacomp_clip_score_uids(folder, fraction):
    """``baselines/apply_filter.py``: the threshold is ``-sort(-scores)[int(N * fraction)]`` over every parquet,
    then each parquet keeps ``score >= threshold``."""
    parquets = sorted(folder.glob("*.parquet"))
    scores = np.concatenate([pq.read_table(p, columns=["clip_l14_similarity_score"]).column(0).to_numpy()
                             for p in parquets])
    threshold = -np.sort(-scores)[int(len(scores) * fraction)]
    keep = []
    for p in parquets:
        t = pq.read_table(p, columns=["uid", "clip_l14_similarity_score"]).to_pydict()
        keep += [u for u, s in zip(t["uid"], t["clip_l14_similarity_score"]) if s >= threshold]
    return sort_uids(hex_to_uids(keep))


def datacomp_image_based_uids(folder, centroids, target):
    """``load_uids_with_image_filter``: caption filter (fastText English, > 1 fastText token, > 5 characters) on
    each parquet, argmax of the L/14 image embeddings against the pool centroids, kept if the argmax is the argmax of
    some ImageNet feature."""
    import fasttext

    from datafilter.filters.language import bundled_fasttext_model

    model = fasttext.load_model(str(bundled_fasttext_model()))
    targets = set(np.argmax(target.astype(np.float32) @ centroids.T, axis=1).tolist())
    keep = []
    for p in sorted(folder.glob("*.parquet")):
        t = pq.read_table(p, columns=["uid", "text"]).to_pydict()
        emb = np.load(p.with_suffix(".npz"))["l14_img"].astype(np.float32)
        langs = [model.predict(x.replace("\n", " "))[0][0] for x in t["text"]]
        # fastText's tokens of these one-line captions are their space-separated words (the installed
        # prediction-only fastText build has no tokenize())
        mask = [lang == "__label__en" and len(x.split()) > 1 and len(x) > 5 for lang, x in zip(langs, t["text"])]
        labels = np.argmax(emb @ centroids.T, axis=1)
        keep += [u for u, ok, lab in zip(t["uid"], mask, labels) if ok and lab in targets]
    return sort_uids(hex_to_uids(keep))


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.45])
def test_clip_score_uids_equal_datacomps(tmp_path, fraction):
    clustered_datacomp(tmp_path / "m")
    res = run("clip_score", FilterView.from_datacomp(tmp_path / "m"), fraction=fraction)
    expected = datacomp_clip_score_uids(tmp_path / "m", fraction)
    assert len(expected) > int(160 * fraction)  # ties at the threshold are all kept
    assert np.array_equal(res.uids, expected)


def test_image_based_with_released_centroids_and_imagenet_files_equals_datacomp(tmp_path):
    import torch

    got = clustered_datacomp(tmp_path / "m")
    rng = np.random.default_rng(1)
    centroids = unit(got["centres"][rng.integers(0, 6, 24)] + 0.2 * rng.normal(size=(24, 768)) / 3).astype(
        np.float32)
    torch.save(centroids, tmp_path / "small_centroids_l14.pt", pickle_protocol=4)  # as DataComp saves them
    target = unit(got["centres"][[0, 0, 3]] + 0.1 * rng.normal(size=(3, 768)) / 3).astype(np.float16)
    for i, part in enumerate((target[:2], target[2:])):  # as DataComp's in1k_clip_vit_l14_{i}.pt
        torch.save({"image_features": torch.from_numpy(part)}, tmp_path / f"in1k_clip_vit_l14_{i}.pt")
    expected = datacomp_image_based_uids(tmp_path / "m", centroids, target)
    assert 0 < len(expected) < 160
    view = FilterView.from_datacomp(tmp_path / "m", workdir=tmp_path / "work")
    params = {"centroids": tmp_path / "small_centroids_l14.pt", "reference": tmp_path / "in1k_clip_vit_l14_*.pt"}
    for assign in ({"assign": "exact"}, {"assign": "ivf", "nlist": 4, "nprobe": 4}):
        res = run("image_based", view, **params, **assign)
        assert np.array_equal(res.uids, expected), assign
        assert res.extra["reference_targets"].startswith("written to")  # each search its own targets
    assert res.extra["assignment"]["method"] == "ivf" and res.extra["clusters"] == 24
    both = run("image_based_clip_score", view, **params, fraction=0.3, assign="ivf", nlist=4, nprobe=4)
    assert both.extra["reference_targets"].startswith("read from")  # the same files and search: kept
    clip = datacomp_clip_score_uids(tmp_path / "m", 0.3)
    assert np.array_equal(both.uids, expected[np.isin(expected, clip)])
    assert sum(both.counts.values()) + both.kept == 160

    # other reference features under the same name are a new key, never the kept targets
    torch.save({"image_features": torch.from_numpy(target[2:] * 0 + target[:1])}, tmp_path / "in1k_clip_vit_l14_1.pt")
    again = run("image_based", FilterView.from_datacomp(tmp_path / "m", workdir=tmp_path / "work"), **params,
                assign="exact")
    assert again.extra["reference_targets"].startswith("written to")
    fewer = datacomp_image_based_uids(tmp_path / "m", centroids, target[[0, 1, 0]])
    assert np.array_equal(again.uids, fewer)
    assert again.extra["target_clusters"] < both.extra["target_clusters"]


def test_wrong_centroid_or_reference_width_is_named_before_any_work(tmp_path):
    clustered_datacomp(tmp_path / "m")
    np.save(tmp_path / "c512.npy", np.ones((8, 512), np.float32))
    view = FilterView.from_datacomp(tmp_path / "m")
    with pytest.raises(FilterError, match=r"c512\.npy: centroids of width 512, but the embeddings have width 768"):
        run("image_based", view, centroids=tmp_path / "c512.npy", reference=tmp_path / "c512.npy")
    assert "texts" not in view._cache  # failed before the caption filter read any caption
    np.save(tmp_path / "c768.npy", np.ones((8, 768), np.float32))
    with pytest.raises(FilterError, match="reference set .* has width 512, the embeddings 768"):
        run("image_based", view, centroids=tmp_path / "c768.npy", reference=tmp_path / "c512.npy")
    with pytest.raises(EmbeddingError, match="no 'image_features' entry"):
        import torch

        torch.save({"features": torch.ones(2, 768)}, tmp_path / "f.pt")
        load_features(tmp_path / "f.pt")
    assert load_centroids(tmp_path / "c768.npy").shape == (8, 768)


def test_image_based_default_is_datacomps_100k_clusters_and_refuses_a_pool_too_small(tmp_path):
    clustered_datacomp(tmp_path / "m")
    np.save(tmp_path / "ref.npy", np.ones((2, 768), np.float16))
    view = FilterView.from_datacomp(tmp_path / "m")
    with pytest.raises(FilterError, match=r"100,000 clusters need at least as many k-means points.*samples_per_cluster"):
        run("image_based", view, reference=tmp_path / "ref.npy")


def test_micro_config_keeps_one_cluster_per_128_samples(tmp_path):
    """configs/micro.yaml gives its image-based entries the N/128 setting explicitly: the same subsets as before
    DataComp's 100k clusters became the default (then K = N // 128)."""
    import yaml

    from conftest import ROOT

    entries = [f for f in yaml.safe_load((ROOT / "configs" / "micro.yaml").read_text())["filters"]
               if f["name"].startswith("image_based")]
    assert len(entries) == 2 and all(f["params"]["samples_per_cluster"] == 128 for f in entries)
    pool, arr = make_pool(tmp_path, n=650, shard_size=400, dim=8)
    write_reference(pool, "imagenet_train", arr["image"][:20])
    view = FilterView.from_pool(pool)
    for entry in entries:
        params = {**entry["params"], "caption_filter": False}
        res = run(entry["name"], view, **params)
        old = run(entry["name"], view, **{**params, "samples_per_cluster": 0, "clusters": 650 // 128})
        assert res.extra["clusters"] == 5 and np.array_equal(res.uids, old.uids)


# --- memory-mapped and in-memory paths agree -----------------------------------------------------------------------
@pytest.mark.parametrize("name,params", [
    ("image_based", {"clusters": 6, "caption_filter": False}),
    ("semdedup", {"clusters": 3, "niter": 10}),
    ("negclip", {"batch_size": 64}),
    ("normsim", {"reference": "target", "negclip_fraction": 0.5}),
    ("d2_pruning", {"knn": "ivf", "pca_dim": 8, "k": 3, "features": "image"}),
    ("d2_pruning", {"knn": "ivf", "pca_dim": 8, "k": 3, "features": "image", "on_disk": "always"}),
])
def test_memory_mapped_datacomp_paths_give_the_in_memory_subsets(tmp_path, name, params):
    got = clustered_datacomp(tmp_path / "m")
    meta = DataCompMetadata(tmp_path / "m")
    refs = {"target": got["l14_img"][:5], "imagenet_train": got["l14_img"][:5]}
    mapped = FilterView.from_datacomp(tmp_path / "m", workdir=tmp_path / "work")
    mapped._refs.update(refs)
    plain = in_memory_view(meta, references=refs, shard_rows=meta.rows, workdir=tmp_path / "work2")
    a, b = run(name, mapped, **params), run(name, plain, **params)
    assert isinstance(mapped.image_embeddings(), ShardedArray)
    assert 0 < a.kept < 160 and np.array_equal(a.uids, b.uids)


# --- inverted lists ------------------------------------------------------------------------------------------------------
def test_inverted_lists_equal_exhaustive_search_when_every_list_is_probed():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    vectors[7] = vectors[3]  # a tie: the lower index wins, as in the exhaustive search
    x = rng.normal(size=(500, 16)).astype(np.float32)
    x[0] = vectors[3] * 2
    exact = ops.InnerProductIndex(vectors, method="exact")
    full = ops.InnerProductIndex(vectors, method="ivf", nlist=12, nprobe=12)
    few = ops.InnerProductIndex(vectors, method="ivf", nlist=12, nprobe=3)
    want = np.argmax(x @ vectors.T, axis=1)
    assert np.array_equal(exact.search(x)[0], want) and np.array_equal(full.search(x)[0], want) and want[0] == 3
    assert 0.5 < np.mean(few.search(x)[0] == want) < 1
    assert few.recall(x, np.arange(500), few.search(x)[0], 200, 0) == pytest.approx(
        np.mean(few.search(x)[0][np.sort(np.random.default_rng(0).choice(500, 200, replace=False))]
                == want[np.sort(np.random.default_rng(0).choice(500, 200, replace=False))]))
    np.testing.assert_allclose(full.max_abs(x), np.abs(x @ vectors.T).max(1), rtol=1e-5)


# --- D²'s graph on disk ----------------------------------------------------------------------------------------------------
def test_d2_graph_build_resumes_after_a_kill(tmp_path, monkeypatch, caplog):
    import logging

    from test_filters import array_view

    view, arr = array_view(3000, seed=4, dim=16, workdir=tmp_path / "w")
    params = {"knn": "ivf", "k": 4, "pca_dim": 8, "on_disk": "always"}
    real_save = ops.WorkDir.save
    saves = []

    def killed_midway(self, name, a):
        if name == "lists_done" and len(saves) == 5:
            raise KeyboardInterrupt
        saves.append(name)
        return real_save(self, name, a)

    monkeypatch.setattr(ops.WorkDir, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        run("d2_pruning", view, **params)
    monkeypatch.setattr(ops.WorkDir, "save", real_save)
    with caplog.at_level(logging.INFO, logger="datafilter.filters.ops"):
        resumed = run("d2_pruning", view, **params)
    assert "resuming" in caplog.text
    memory = run("d2_pruning", array_view(3000, seed=4, dim=16)[0], **{**params, "on_disk": "never"})
    assert np.array_equal(resumed.uids, memory.uids)
    work = next((tmp_path / "w").iterdir())
    assert sorted(p.name for p in work.glob("*.npy")) == ["dist.npy", "ids.npy"]  # the rest is removed
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="datafilter.filters.ops"):
        again = run("d2_pruning", view, **{**params, "fraction": 0.5})  # the finished graph is reused
    assert "resuming" not in caplog.text and again.kept == int(3000 * 0.5)


def test_rows_written_in_order_resume_after_a_kill(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1000, 6)).astype(np.float16)
    order = rng.permutation(1000)
    state = ops.WorkDir(tmp_path)
    real = np.fromfile
    calls = []

    def killed(*a, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(np, "fromfile", killed)
    with pytest.raises(KeyboardInterrupt):
        ops.write_in_order(ops.Rows([x]), order, state, "ordered", chunk=128, bucket_bytes=6 * 2 * 100)
    monkeypatch.setattr(np, "fromfile", real)
    out = ops.write_in_order(ops.Rows([x]), order, state, "ordered", chunk=128, bucket_bytes=6 * 2 * 100)
    assert np.array_equal(out, x[order]) and state.done("ordered")


def test_datacomp_scale_sets_its_kmeans_sample_ratio():
    from test_filters import array_view

    view, _ = array_view(300, seed=2, references={"imagenet_train": np.ones((2, 8), np.float16)})
    res = run("image_based", view, clusters=5, caption_filter=False, scale="large")
    assert res.extra["kmeans_points"] == int(300 * 0.3)  # DataComp: sample_ratio 0.3 at large
    with pytest.raises(ValueError, match="not both"):
        run("image_based", view, scale="xlarge", kmeans_sample_ratio=0.5)


@pytest.mark.parametrize("name", ["image_based", "image_based_clip_score"])
def test_image_based_settings_are_checked_for_the_intersection_too(name):
    from datafilter.filters.registry import filter_class

    config = filter_class(name)[0].Config
    with pytest.raises(ValueError, match=r"kmeans_sample_ratio must be in \(0, 1\]"):
        config(kmeans_sample_ratio=5.0)
    with pytest.raises(ValueError, match="clusters and nprobe"):
        config(nprobe=0)
