"""Is an evaluation image (or a near-copy of one) in the pool? Exact pixels and grey-thumbnail cosine similarity.

The thumbnail is a 16x16 grey image with its mean removed and unit norm, so a copy that was shifted by a pixel,
re-coloured slightly or re-encoded still scores close to 1, while two different drawings of one concept (another
artist's dog face) score well below. Blank images have no shape and are compared by exact pixels only.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

THUMB = 16


def fingerprints(images: list[np.ndarray]) -> np.ndarray:
    """(N, 256) float32, L2-normalised mean-free grey thumbnails; all-zero rows for flat images."""
    out = np.zeros((len(images), THUMB * THUMB), np.float32)
    for i, im in enumerate(images):
        g = np.asarray(Image.fromarray(im).convert("L").resize((THUMB, THUMB), Image.Resampling.BOX), np.float32)
        v = g.ravel() - g.mean()
        n = np.linalg.norm(v)
        if n > 1e-3:
            out[i] = v / n
    return out


def pixel_hash(im: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(im).tobytes()).digest()[:16]


class OverlapIndex:
    """The pool side of the check: pixel hashes and thumbnails of every pool image added."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.hashes: set[bytes] = set()
        self.vectors: list[np.ndarray] = []

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.vectors)

    def add(self, images: list[np.ndarray]) -> None:
        self.add_prints({pixel_hash(im) for im in images}, fingerprints(images))

    def add_prints(self, hashes: set[bytes], vectors: np.ndarray) -> None:
        self.hashes.update(hashes)
        if len(vectors):
            self.vectors.append(vectors)

    def add_pool(self, pool_dir: str | Path, workers: int = 1) -> None:
        """Add every image of a built pool, one shard per task (in ``workers`` processes)."""
        from datafilter.pool import Pool

        tars = [str(s.tar) for s in Pool(pool_dir).shards]
        if workers > 1 and len(tars) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
                results = list(ex.map(_shard_prints, tars))
        else:
            results = [_shard_prints(t) for t in tars]
        for hashes, vectors in results:
            self.add_prints(hashes, vectors)

    def query(self, images: list[np.ndarray], chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """(exact match?, highest cosine with any pool image) for each image."""
        exact = np.array([pixel_hash(im) in self.hashes for im in images], bool)
        best = np.zeros(len(images), np.float32)
        if not images or not self.vectors:
            return exact, best
        q = fingerprints(images)
        for v in self.vectors:
            for lo in range(0, len(v), chunk):
                best = np.maximum(best, (q @ v[lo:lo + chunk].T).max(axis=1))
        return exact, best


def _shard_prints(tar_path: str) -> tuple[set[bytes], np.ndarray]:
    """Pixel hashes and thumbnails of the images in one shard tar (read directly: only the images are needed)."""
    import tarfile

    from datafilter.pool.format import IMAGE_EXTS

    images = []
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                images.append(np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")))
    return {pixel_hash(im) for im in images}, fingerprints(images)


def check_suite(suite_dir: str | Path, pool_dir: str | Path, threshold: float, workers: int = 1) -> dict:
    """Compare every image of a built suite with every image of a built pool, and every reference-split image with
    every test image; returns counts and the worst cases."""
    import json

    from datafilter.micro.suite import read_task

    suite_dir = Path(suite_dir)
    meta = json.loads((suite_dir / "suite.json").read_text())
    index = OverlapIndex(threshold)
    index.add_pool(pool_dir, workers)
    result = {"threshold": threshold, "pool_images": index.size, "eval_images": 0, "exact": 0, "near_duplicate": 0,
              "max_similarity": 0.0, "by_task": {}}
    paths = [(t["name"], suite_dir / t["path"], "test") for t in meta["tasks"]]
    references = [(name, suite_dir / Path(p).parent, Path(p).name) for name, p in meta["reference_sets"].items()]
    tests = OverlapIndex(threshold)
    result["reference_vs_test"] = {}
    for name, d, split in paths + references:
        images, _ = read_task(d, split)
        if split == "test":
            tests.add(images)
        else:  # a reference (train) split must hold no test image either, nor a near-copy of one
            t_exact, t_sim = tests.query(images)
            result["reference_vs_test"][name] = {
                "images": len(images), "test_images": tests.size, "exact": int(t_exact.sum()),
                "near_duplicate": int((t_sim >= threshold).sum()),
                "max_similarity": float(t_sim.max()) if len(t_sim) else 0.0}
        exact, sim = index.query(images)
        result["eval_images"] += len(images)
        result["exact"] += int(exact.sum())
        result["near_duplicate"] += int((sim >= threshold).sum())
        result["max_similarity"] = max(result["max_similarity"], float(sim.max()) if len(sim) else 0.0)
        result["by_task"][name] = {"images": len(images), "exact": int(exact.sum()),
                                   "near_duplicate": int((sim >= threshold).sum()),
                                   "max_similarity": float(sim.max()) if len(sim) else 0.0}
    return result
