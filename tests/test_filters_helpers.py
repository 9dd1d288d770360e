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
