"""Where embeddings and CLIP scores live, and the only code that reads or writes them.

Layout, for an embedding *space* (one model; e.g. ``scorer-micro-v1`` or ``ViT-B-32__openai``)::

    POOL/embeddings/SPACE/space.json             model name, checkpoint hash, dim, score column, pool path and id
    POOL/embeddings/SPACE/NNNNNNNN_img.npy       float16 [rows, dim], L2-normalised, row-aligned with NNNNNNNN.parquet
    POOL/embeddings/SPACE/NNNNNNNN_txt.npy       float16 [rows, dim], L2-normalised
    POOL/embeddings/SPACE/NNNNNNNN_scores.parquet  uid, valid (decoded and embedded), SCORE_COLUMN (cosine similarity)
    POOL/embeddings/SPACE/NNNNNNNN_stats.json    rows, valid rows, invalid rows counted by reason
    POOL/embeddings/SPACE/reference/NAME.npy     a reference set's image embeddings (float16, L2-normalised)
    POOL/embeddings/SPACE/reference/NAME_labels.npy  its class labels (int64), row-aligned

The scores parquet is written last and marks the shard complete. Rows whose image could not be decoded have
``valid = False``, a NaN score and NaN vectors: never a silent zero vector that a filter would mistake for data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datafilter.common.files import atomic_path, read_json, write_json
from datafilter.pool.pool import Pool, PoolError, Shard

EMBED_DIR = "embeddings"
SPACE_FILE = "space.json"
REFERENCE_DIR = "reference"


class EmbeddingError(PoolError):
    """Embeddings missing, incomplete, or from a different model or pool than expected."""


def space_name(model: str, tag: str | None = None) -> str:
    """A directory-safe name for an embedding space, e.g. ``ViT-B-32__openai``."""
    raw = f"{model}__{tag}" if tag else model
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)


@dataclass(frozen=True)
class SpaceInfo:
    """What produced a space; stored in ``space.json`` and checked whenever more shards are added."""

    model: str
    checkpoint: str  # a pretrained tag, a file's sha256, or "" for random weights in tests
    dim: int
    score_column: str = "clip_score"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "checkpoint": self.checkpoint, "dim": self.dim, "score_column": self.score_column}


class EmbeddingStore:
    """Read and write one embedding space of one pool."""

    def __init__(self, pool: Pool, space: str):
        self.pool = pool
        self.space = space
        self.dir = pool.path / EMBED_DIR / space

    # --- info ------------------------------------------------------------------------------------------------------
    @property
    def info(self) -> SpaceInfo:
        path = self.dir / SPACE_FILE
        if not path.exists():
            raise EmbeddingError(f"no embeddings '{self.space}' for {self.pool.path} ({path} missing); run "
                                 f"`datafilter embed {self.pool.path}` first")
        d = read_json(path)
        return SpaceInfo(d["model"], d["checkpoint"], int(d["dim"]), d.get("score_column", "clip_score"))

    def init(self, info: SpaceInfo) -> None:
        """Create the space, or check that an existing one was made by the same model and checkpoint, for this pool's
        current content (a pool rebuilt in place must not reuse vectors of its old samples)."""
        path = self.dir / SPACE_FILE
        if path.exists():
            stored_pool = read_json(path).get("pool_id")
            if stored_pool not in (None, self.pool.pool_id):
                raise EmbeddingError(f"{path} holds embeddings of another version of {self.pool.path} (pool id "
                                     f"{stored_pool}, now {self.pool.pool_id}); delete {self.dir} and embed again")
            old = self.info
            if (old.model, old.checkpoint, old.dim) != (info.model, info.checkpoint, info.dim):
                raise EmbeddingError(
                    f"{path} was written by model {old.model} (checkpoint {old.checkpoint[:16] or 'none'}, dim "
                    f"{old.dim}); refusing to mix in {info.model} (checkpoint {info.checkpoint[:16] or 'none'}, dim "
                    f"{info.dim}). Use another space name or delete {self.dir}.")
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(path, {**info.to_json(), "pool": str(self.pool.path), "pool_id": self.pool.pool_id})

    # --- per shard -------------------------------------------------------------------------------------------------
    def paths(self, shard: Shard) -> tuple[Path, Path, Path]:
        d = self.dir
        return d / f"{shard.name}_img.npy", d / f"{shard.name}_txt.npy", d / f"{shard.name}_scores.parquet"

    def stats_path(self, shard: Shard) -> Path:
        return self.dir / f"{shard.name}_stats.json"

    def shard_stats(self, shard: Shard) -> dict[str, Any]:
        """Row counts of a finished shard: ``rows``, ``valid``, ``invalid`` ({reason: count})."""
        self._require(shard)
        path = self.stats_path(shard)
        return read_json(path) if path.exists() else {}

    def done(self, shard: Shard) -> bool:
        return self.paths(shard)[2].exists()

    def missing(self) -> list[Shard]:
        return [s for s in self.pool.shards if not self.done(s)]

    def write_shard(self, shard: Shard, uids: list[str], image: np.ndarray, text: np.ndarray,
                    valid: np.ndarray, stats: dict[str, Any] | None = None) -> None:
        """Write one shard's vectors, its ``stats`` (if given) and scores; rows must follow the shard's parquet."""
        n = shard.num_samples
        if not (len(uids) == len(image) == len(text) == len(valid) == n):
            raise EmbeddingError(f"shard {shard.name}: {len(image)} embeddings for {n} parquet rows")
        info = self.info
        image = image.astype(np.float32)
        text = text.astype(np.float32)
        image[~valid] = np.nan
        text[~valid] = np.nan
        score = np.einsum("nd,nd->n", image, text)
        img_p, txt_p, scores_p = self.paths(shard)
        for path, arr in ((img_p, image), (txt_p, text)):
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, arr.astype(np.float16))
        if stats is not None:
            write_json(self.stats_path(shard), stats)
        table = pa.table({"uid": pa.array(uids, pa.string()), "valid": pa.array(valid, pa.bool_()),
                          info.score_column: pa.array(score.astype(np.float32), pa.float32())})
        with atomic_path(scores_p) as tmp:
            pq.write_table(table, tmp)

    def image(self, shard: Shard) -> np.ndarray:
        return self._load(shard, 0)

    def text(self, shard: Shard) -> np.ndarray:
        return self._load(shard, 1)

    def scores(self, shard: Shard) -> pa.Table:
        self._require(shard)
        return pq.read_table(self.paths(shard)[2])

    def _require(self, shard: Shard) -> None:
        if not self.done(shard):
            raise EmbeddingError(f"shard {shard.name} of {self.pool.path} has no embeddings in space "
                                 f"'{self.space}' ({self.paths(shard)[2]} missing)")

    def _load(self, shard: Shard, which: int, info: SpaceInfo | None = None) -> np.ndarray:
        self._require(shard)
        path = self.paths(shard)[which]
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise EmbeddingError(f"{path}: unreadable embeddings ({exc})") from None
        if arr.ndim != 2 or arr.shape[0] != shard.num_samples:
            raise EmbeddingError(f"{path}: shape {arr.shape} but {shard.parquet.name} has {shard.num_samples} rows")
        info = info or self.info
        if arr.shape[1] != info.dim or arr.dtype != np.float16:
            raise EmbeddingError(f"{path}: {arr.dtype} vectors of width {arr.shape[1]}, but space '{self.space}' holds "
                                 f"float16 vectors of width {info.dim} from {info.model}; the file is from another "
                                 f"model, delete it and rerun `datafilter embed`")
        return arr

    # --- reference sets (e.g. ImageNet train for the image-based filter) ------------------------------------------
    def reference_paths(self, name: str) -> tuple[Path, Path, Path]:
        """(embeddings, labels, stats) of reference set ``name``; the embeddings file is written last."""
        d = self.dir / REFERENCE_DIR
        return d / f"{name}.npy", d / f"{name}_labels.npy", d / f"{name}.json"

    def has_reference(self, name: str) -> bool:
        return self.reference_paths(name)[0].exists()

    def references(self) -> list[str]:
        return sorted(p.stem for p in (self.dir / REFERENCE_DIR).glob("*.npy") if not p.stem.endswith("_labels"))

    def write_reference(self, name: str, image: np.ndarray, labels: np.ndarray, stats: dict[str, Any]) -> None:
        if len(image) != len(labels):
            raise EmbeddingError(f"reference set {name}: {len(image)} embeddings for {len(labels)} labels")
        emb_p, lab_p, stats_p = self.reference_paths(name)
        emb_p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(lab_p) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(labels, np.int64))
        write_json(stats_p, stats)
        with atomic_path(emb_p) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(image, np.float16))

    def reference(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A reference set's image embeddings (float16, memory-mapped) and int64 labels."""
        emb_p, lab_p, _ = self.reference_paths(name)
        if not emb_p.exists():
            have = ", ".join(self.references()) or "none"
            raise EmbeddingError(f"no reference set '{name}' in space '{self.space}' ({emb_p} missing; have: {have}); "
                                 f"run `datafilter embed {self.pool.path} --reference SUITE_DIR` first")
        emb, labels = np.load(emb_p, mmap_mode="r"), np.load(lab_p)
        if len(emb) != len(labels):
            raise EmbeddingError(f"{emb_p}: {len(emb)} rows but {lab_p.name} has {len(labels)}")
        return emb, labels

    # --- whole pool ------------------------------------------------------------------------------------------------
    def _sharded(self, which: int) -> np.ndarray:
        shards = self.pool.shards
        missing = self.missing()
        if missing:
            self._require(missing[0])
        info = self.info
        if len(shards) == 1:
            return self._load(shards[0], which, info)
        arr = ShardedArray([s.num_samples for s in shards], info.dim, lambda i: self._load(shards[i], which, info),
                           name=str(self.dir))
        for i in range(len(shards)):  # opening a memory map reads its header: a bad file fails here, not later
            arr.shard(i)
        return arr

    def all_image(self) -> np.ndarray:
        """Image embeddings of the whole pool in pool order: the per-shard memory maps seen as one array
        (``ShardedArray``), never joined in memory."""
        return self._sharded(0)

    def all_text(self) -> np.ndarray:
        return self._sharded(1)

    def all_scores(self) -> pa.Table:
        """uid, valid and the score column for the whole pool, in pool order."""
        return pa.concat_tables([self.scores(s) for s in self.pool.shards])


class ShardedArray:
    """Row-aligned per-shard ``[rows_i, dim]`` arrays seen as one read-only ``[sum(rows_i), dim]`` array.

    A pool's embeddings live in one file per shard; joining them would hold the whole pool in memory (20 GB of
    float16 per L/14 modality at DataComp's small scale). Here each shard's array is opened on first use by
    ``open_shard(i)`` (a memory map, whose pages the kernel reads and drops as needed) and indexing by rows (an int,
    a slice, an int or bool array) gathers from the shards that hold them into a new array. A shard whose loader
    returns an array in memory (not a memory map) is kept only until another such shard is opened, so at most one
    of them is held. ``np.asarray`` on the whole array joins it (for small pools and tests only).
    """

    ndim = 2

    def __init__(self, rows: Sequence[int], dim: int, open_shard: Callable[[int], np.ndarray],
                 dtype: Any = np.float16, name: str = ""):
        self.rows = [int(r) for r in rows]
        self.offsets = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), int(dim))
        self.dtype = np.dtype(dtype)
        self.name = name
        self._open_shard = open_shard
        self._maps: dict[int, np.ndarray] = {}
        self._loaded: tuple[int, np.ndarray] | None = None

    def __repr__(self) -> str:
        return f"ShardedArray({self.name!r}, shards={len(self.rows)}, shape={self.shape}, dtype={self.dtype})"

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def num_shards(self) -> int:
        return len(self.rows)

    def shard(self, i: int) -> np.ndarray:
        """Shard ``i``'s array (opened and checked on first use)."""
        if i in self._maps:
            return self._maps[i]
        if self.rows[i] == 0:  # nothing to read (and an empty file cannot be memory-mapped)
            return np.empty((0, self.shape[1]), self.dtype)
        if self._loaded is not None and self._loaded[0] == i:
            return self._loaded[1]
        arr = self._open_shard(i)
        if arr.ndim != 2 or arr.shape != (self.rows[i], self.shape[1]):
            raise EmbeddingError(f"{self.name}: shard {i} has shape {arr.shape}, expected ({self.rows[i]}, "
                                 f"{self.shape[1]})")
        if isinstance(arr, np.memmap):
            self._maps[i] = arr
        else:
            self._loaded = (i, arr)
        return arr

    def __setitem__(self, key: Any, value: Any) -> None:
        raise ValueError("embeddings are read-only")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype: Any) -> np.ndarray:
        """The whole array joined in memory, as ``dtype`` (small pools and tests only)."""
        return np.asarray(self, dtype)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.dtype.itemsize

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            rows, *cols = key
            return self[rows][(slice(None), *cols)]
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            s = int(np.searchsorted(self.offsets, i, "right") - 1)
            return np.array(self.shard(s)[i - self.offsets[s]])
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self._range(start, max(start, stop))
            key = np.arange(start, stop, step)
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} for {n} rows")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).ravel()
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = np.where(idx < 0, idx + n, idx)
        return self._gather(idx)

    def _range(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.shape[1]), self.dtype)
        first = int(np.searchsorted(self.offsets, start, "right") - 1)
        pos = start
        s = first
        while pos < stop:
            lo, hi = self.offsets[s], self.offsets[s + 1]
            end = min(stop, hi)
            if end > pos:
                out[pos - start:end - start] = self.shard(s)[pos - lo:end - lo]
            pos = end
            s += 1
        return out

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), self.shape[1]), self.dtype)
        if not len(idx):
            return out
        shard_of = np.searchsorted(self.offsets, idx, "right") - 1
        order = np.argsort(shard_of, kind="stable")
        bounds = np.searchsorted(shard_of[order], np.arange(len(self.rows) + 1))
        for s in np.flatnonzero(np.diff(bounds)):
            pos = order[bounds[s]:bounds[s + 1]]
            local = idx[pos] - self.offsets[s]
            arr = self.shard(int(s))
            if local[-1] - local[0] + 1 == len(local) and (len(local) < 2 or (np.diff(local) == 1).all()):
                out[pos] = arr[local[0]:local[-1] + 1]  # a run of consecutive rows: one copy, no index
            else:
                out[pos] = arr[local]
        return out


def usable_mask(block: np.ndarray) -> np.ndarray:
    """Rows of a float block that are embeddings: finite and not zero (DataComp marks a missing one with zeros,
    this project with NaN)."""
    block = np.asarray(block, np.float32)
    return np.isfinite(block).all(axis=1) & (np.einsum("nd,nd->n", block, block) > 0)


def usable_rows(arrays: Sequence[Any], chunk: int = 65536) -> np.ndarray:
    """``usable_mask`` over whole row-aligned arrays (``ShardedArray`` or numpy), read shard by shard and chunk by
    chunk, so memory stays one float32 chunk."""
    n = len(arrays[0])
    ok = np.ones(n, bool)
    for arr in arrays:
        pieces = ([(lo, arr.shard(s)) for s, lo in enumerate(arr.offsets[:-1])] if isinstance(arr, ShardedArray)
                  else [(0, arr)])
        for lo, part in pieces:
            for s in range(0, len(part), chunk):
                block = part[s:s + chunk]
                ok[lo + s:lo + s + len(block)] &= usable_mask(block)
    return ok
