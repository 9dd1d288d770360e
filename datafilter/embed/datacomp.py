"""DataComp's released metadata, read as is, so filters run on it without re-embedding anything.

DataComp publishes, per metadata shard ``NNNNNNNN``, a parquet (``uid`` as 32 hex characters, ``url``, ``text``,
``original_width``, ``original_height``, ``clip_b32_similarity_score``, ``clip_l14_similarity_score``, ...) and an
``.npz`` with four row-aligned float16 arrays: ``b32_img``, ``b32_txt`` (OpenAI ViT-B/32) and ``l14_img``, ``l14_txt``
(OpenAI ViT-L/14), L2-normalised. ``DataCompMetadata`` offers the same whole-pool accessors as ``EmbeddingStore``
(``all_image``, ``all_text``, ``all_scores``) plus the pool-side ones (``uids``, ``metadata``, ``column``), reading
each file only when an array from it is asked for.
"""

from __future__ import annotations

import zipfile
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datafilter.embed.store import EmbeddingError
from datafilter.pool.uid import hex_to_uids

MODELS = ("b32", "l14")
SCORE_COLUMNS = {"b32": "clip_b32_similarity_score", "l14": "clip_l14_similarity_score"}
MODEL_NAMES = {"b32": "ViT-B-32", "l14": "ViT-L-14"}  # open_clip names; the weights are OpenAI's ("openai")


class DataCompMetadata:
    """A folder of DataComp metadata shards (``NNNNNNNN.parquet`` + ``NNNNNNNN.npz``), for one model (b32 or l14)."""

    def __init__(self, path: str | Path, model: str = "l14"):
        if model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)} (DataComp's embeddings), got {model!r}")
        self.path = Path(path)
        self.model = model
        if not self.path.is_dir():
            raise EmbeddingError(f"DataComp metadata folder not found: {self.path}")
        self.parquets = sorted(p for p in self.path.glob("*.parquet") if p.stem.isdigit())
        if not self.parquets:
            raise EmbeddingError(f"no DataComp metadata in {self.path} (expected NNNNNNNN.parquet + NNNNNNNN.npz)")
        missing = [p.with_suffix(".npz").name for p in self.parquets if not p.with_suffix(".npz").is_file()]
        if missing:
            raise EmbeddingError(f"{self.path}: {len(missing)} parquet file(s) without their .npz embeddings: "
                                 f"{', '.join(missing[:5])}")
        self.rows = []
        for p in self.parquets:
            try:
                self.rows.append(pq.ParquetFile(p).metadata.num_rows)
            except (pa.ArrowInvalid, OSError) as exc:
                raise EmbeddingError(f"{p}: unreadable parquet ({exc})") from None

    def __repr__(self) -> str:
        return f"DataCompMetadata({str(self.path)!r}, model={self.model!r}, shards={len(self.parquets)}, " \
               f"samples={self.num_samples})"

    @property
    def num_samples(self) -> int:
        return sum(self.rows)

    @cached_property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)

    @property
    def score_column(self) -> str:
        return SCORE_COLUMNS[self.model]

    # --- metadata --------------------------------------------------------------------------------------------------
    def columns(self) -> list[str]:
        return list(pq.read_schema(self.parquets[0]).names)

    def metadata(self, columns: Sequence[str] | None = None) -> pa.Table:
        tables = []
        for p in self.parquets:
            try:
                tables.append(pq.read_table(p, columns=list(columns) if columns else None))
            except (pa.ArrowInvalid, KeyError) as exc:
                raise EmbeddingError(f"{p}: {exc}") from None
        return pa.concat_tables(tables, promote_options="permissive")

    def column(self, name: str) -> np.ndarray:
        return self.metadata([name]).column(name).to_numpy(zero_copy_only=False)

    @cached_property
    def uids(self) -> np.ndarray:
        """All uids in file order as ``u8,u8``."""
        parts = []
        for p in self.parquets:
            try:
                parts.append(hex_to_uids(pq.read_table(p, columns=["uid"]).column("uid").to_pylist()))
            except (ValueError, KeyError, pa.ArrowInvalid) as exc:
                raise EmbeddingError(f"{p}: bad uid column ({exc})") from None
        return np.concatenate(parts)

    # --- embeddings ------------------------------------------------------------------------------------------------
    def shard_array(self, index: int, kind: str) -> np.ndarray:
        """``img`` or ``txt`` embeddings of one shard (float16), checked against its parquet's row count."""
        npz_path = self.parquets[index].with_suffix(".npz")
        key = f"{self.model}_{kind}"
        try:
            with np.load(npz_path) as npz:
                if key not in npz.files:
                    raise EmbeddingError(f"{npz_path}: no array {key!r} (has {', '.join(npz.files) or 'none'}); "
                                         "not DataComp metadata for this model")
                arr = npz[key]
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise EmbeddingError(f"{npz_path}: unreadable npz ({exc})") from None
        if arr.ndim != 2 or arr.shape[0] != self.rows[index]:
            raise EmbeddingError(f"{npz_path}: {key} has shape {arr.shape} but {self.parquets[index].name} has "
                                 f"{self.rows[index]} rows")
        return arr.astype(np.float16, copy=False)

    def _concat(self, kind: str) -> np.ndarray:
        parts = [self.shard_array(i, kind) for i in range(len(self.parquets))]
        dims = {p.shape[1] for p in parts}
        if len(dims) > 1:
            raise EmbeddingError(f"{self.path}: {self.model}_{kind} has different widths across shards: {sorted(dims)}")
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def all_image(self) -> np.ndarray:
        return self._concat("img")

    def all_text(self) -> np.ndarray:
        return self._concat("txt")

    def valid(self) -> np.ndarray:
        """Rows with usable embeddings: finite and non-zero image and text vectors."""
        parts = []
        for i in range(len(self.parquets)):  # shard by shard: a whole pool in float32 would not fit in memory
            ok = np.ones(self.rows[i], bool)
            for kind in ("img", "txt"):
                arr = self.shard_array(i, kind).astype(np.float32)
                ok &= np.isfinite(arr).all(axis=1) & (np.einsum("nd,nd->n", arr, arr) > 0)
            parts.append(ok)
        return np.concatenate(parts) if parts else np.zeros(0, bool)

    def scores(self) -> np.ndarray:
        """The released CLIP score column of the chosen model (float32)."""
        return self.column(self.score_column).astype(np.float32)

    def all_scores(self) -> pa.Table:
        """uid, valid and the score column for the whole folder, in file order (the ``EmbeddingStore`` shape)."""
        uids = self.metadata(["uid"]).column("uid")
        return pa.table({"uid": uids, "valid": pa.array(self.valid()),
                         self.score_column: pa.array(self.scores(), pa.float32())})
