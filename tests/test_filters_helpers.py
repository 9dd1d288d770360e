"""Helpers for the filter tests: toy pools with random embeddings written through the real EmbeddingStore."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import write_toy_pool
from datafilter.embed.store import EmbeddingStore, SpaceInfo
from datafilter.pool import Pool

SPACE = "test-space"


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def embed_pool(pool_dir: Path, *, dim: int = 8, invalid: tuple[int, ...] = (), seed: int = 0,
               image: np.ndarray | None = None, text: np.ndarray | None = None,
               score_column: str = "clip_score") -> dict[str, np.ndarray]:
    """Write (random unless given) L2-normalised embeddings for every shard; rows in ``invalid`` get valid=False.
    Returns the float16-rounded arrays in pool order, as a filter reads them."""
    pool = Pool(pool_dir)
    rng = np.random.default_rng(seed)
    n = pool.num_samples
    image = unit(rng.normal(size=(n, dim))) if image is None else image
    text = unit(rng.normal(size=(n, dim))) if text is None else text
    valid = np.ones(n, bool)
    valid[list(invalid)] = False
    store = EmbeddingStore(pool, SPACE)
    store.init(SpaceInfo("random", "", image.shape[1], score_column))
    uids = pool.metadata(["uid"]).column("uid").to_pylist()
    for s, lo, hi in zip(pool.shards, pool.offsets[:-1], pool.offsets[1:]):
        store.write_shard(s, uids[lo:hi], image[lo:hi], text[lo:hi], valid[lo:hi])
    img16 = np.asarray(store.all_image(), np.float32)
    txt16 = np.asarray(store.all_text(), np.float32)
    score = store.all_scores().column(score_column).to_numpy(zero_copy_only=False)
    return {"image": img16, "text": txt16, "valid": valid, "score": score, "uids": pool.uids}


def make_pool(tmp_path: Path, n: int = 48, shard_size: int = 16, **kw) -> tuple[Path, dict[str, np.ndarray]]:
    pool_dir = write_toy_pool(tmp_path / "pool", n=n, shard_size=shard_size)
    return pool_dir, embed_pool(pool_dir, **kw)


def write_reference(pool_dir: Path, name: str, ref: np.ndarray) -> Path:
    path = pool_dir / "embeddings" / SPACE / "reference" / f"{name}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, ref.astype(np.float16))
    return path


def test_float32_rows_reads_every_chunk_through_one_buffer():
    from datafilter.embed.store import ShardedArray
    from datafilter.filters.ops import float32_rows

    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 5)).astype(np.float16) for n in (7, 0, 11)]
    arr = ShardedArray([len(p) for p in parts], 5, lambda i: parts[i])
    rows = np.array([17, 0, 3, 3, 9, 12, 1, 16, 5])
    whole = np.concatenate(parts).astype(np.float32)[rows]
    seen, buffers = [], set()
    for start, block in float32_rows(arr, rows, chunk=4):
        assert block.dtype == np.float32 and np.array_equal(block, whole[start:start + len(block)])
        seen.append(len(block))
        buffers.add(block.base.__array_interface__["data"][0] if block.base is not None else id(block))
    assert seen == [4, 4, 1] and len(buffers) == 1


def test_knn_lists_keep_the_rows_per_list_fixed_from_a_million_rows_on():
    from datafilter.filters.ops import knn_lists

    assert knn_lists(10_000) == 400 and knn_lists(1_000_000) == 4000  # faiss's 4 sqrt(N)
    assert knn_lists(4_000_000) == 15_625 and knn_lists(12_800_000) == 50_000  # 256 rows per list
    assert knn_lists(4_000_000, nlist=123) == 123
