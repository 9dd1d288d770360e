"""``Pool``: the read side of the Pool format, the type every later stage starts from."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datafilter.common.files import read_json, stable_hash
from datafilter.pool.format import IMAGE_EXTS, shard_paths, skipped_path
from datafilter.pool.uid import hex_to_uids, uids_from_arrow

log = logging.getLogger(__name__)


# The parquet columns that identify a pool's content (see ``Pool.pool_id``).
CONTENT_COLUMNS = ("uid", "key", "text", "sha256", "width", "height")


class PoolError(RuntimeError):
    """A structural problem with a pool directory (missing files, mismatched counts)."""


@dataclass(frozen=True)
class Shard:
    name: str
    tar: Path
    parquet: Path
    stats: Path
    num_samples: int

    def read_stats(self) -> dict[str, Any]:
        return read_json(self.stats) if self.stats.exists() else {}

    def read_skipped(self) -> list[dict[str, Any]]:
        """The inputs this shard skipped, in input order: ``index`` (position among the shard's inputs), ``input``
        (path, key or URL; None where the writer did not know it), ``reason``, ``detail``."""
        path = skipped_path(self.stats.parent, self.name)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class Sample:
    uid: str
    key: str
    text: str
    image: bytes
    ext: str
    meta: dict[str, Any]


class Pool:
    """A directory of shards. Metadata is read lazily, column by column; images only when iterated.

    >>> pool = Pool("my_pool")                     # doctest: +SKIP
    >>> pool.num_samples, pool.column("text")[:3]  # doctest: +SKIP
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise PoolError(f"pool directory not found: {self.path}")
        self.shards = self._find_shards()
        if not self.shards:
            raise PoolError(f"no shards in {self.path} (expected NNNNNNNN.tar with NNNNNNNN.parquet beside it)")

    def _find_shards(self) -> list[Shard]:
        shards = []
        for parquet in sorted(self.path.glob("*.parquet")):
            name = parquet.stem
            if not name.isdigit():
                continue
            tar, _, stats = shard_paths(self.path, name)
            if not tar.exists():
                raise PoolError(f"{parquet} has no tar beside it ({tar.name} missing)")
            meta = pq.ParquetFile(parquet)
            names = set(meta.schema_arrow.names)
            if "uid" not in names or "status" in names:
                # img2dataset's own parquet lists failed downloads too, so its rows do not match the tar.
                raise PoolError(f"{parquet} is a producer's parquet, not a pool index (columns: "
                                f"{', '.join(sorted(names)[:8])}); run `datafilter pool ingest {self.path}` to index "
                                f"these shards in place")
            shards.append(Shard(name, tar, parquet, stats, meta.metadata.num_rows))
        orphans = {p.stem for p in self.path.glob("*.tar") if p.stem.isdigit()} - {s.name for s in shards}
        if orphans:
            log.warning("%s: %d tar(s) without parquet (not indexed yet?): %s", self.path, len(orphans),
                        ", ".join(sorted(orphans)[:5]))
        return shards

    def __repr__(self) -> str:
        return f"Pool({str(self.path)!r}, shards={len(self.shards)}, samples={self.num_samples})"

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @cached_property
    def offsets(self) -> np.ndarray:
        """Row offset of each shard in pool order (length ``len(shards) + 1``)."""
        return np.concatenate([[0], np.cumsum([s.num_samples for s in self.shards])]).astype(np.int64)

    def shard(self, name: str) -> Shard:
        for s in self.shards:
            if s.name == name:
                return s
        raise KeyError(f"no shard {name!r} in {self.path}")

    # --- metadata -------------------------------------------------------------------------------------------------
    def columns(self) -> list[str]:
        # the first non-empty shard: an empty one may lack the source's own columns
        first = next((s for s in self.shards if s.num_samples), self.shards[0])
        return list(pq.read_schema(first.parquet).names)

    def metadata(self, columns: Sequence[str] | None = None, shards: Sequence[Shard] | None = None) -> pa.Table:
        """The named columns of the chosen shards (default: all), concatenated in pool order."""
        tables = []
        for s in shards or self.shards:
            if columns and s.num_samples == 0:
                # a shard whose every sample was skipped has only the core columns; it adds no rows, only a schema
                have = set(pq.read_schema(s.parquet).names)
                tables.append(pa.table({c: pq.read_table(s.parquet, columns=[c]).column(c) if c in have
                                        else pa.nulls(0) for c in columns}))
                continue
            try:
                tables.append(pq.read_table(s.parquet, columns=list(columns) if columns else None))
            except (pa.ArrowInvalid, KeyError) as exc:
                raise PoolError(f"{s.parquet}: {exc}") from None
        return pa.concat_tables(tables, promote_options="permissive")

    def column(self, name: str) -> np.ndarray:
        return self.metadata([name]).column(name).to_numpy(zero_copy_only=False)

    @cached_property
    def uids(self) -> np.ndarray:
        """All uids in pool order as ``u8,u8``."""
        return uids_from_arrow(self.metadata(["uid"]).column("uid"))

    @cached_property
    def _uid_index(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.lexsort((self.uids["f1"], self.uids["f0"]))
        return self.uids[order], order

    def rows_of(self, uids: np.ndarray) -> np.ndarray:
        """Pool row of each uid (``u8,u8`` array); -1 where the uid is not in the pool."""
        sorted_uids, order = self._uid_index
        if len(sorted_uids) == 0:
            return np.full(len(uids), -1, np.int64)
        pos = np.searchsorted(sorted_uids, uids)
        pos_c = np.minimum(pos, len(sorted_uids) - 1)
        found = (len(sorted_uids) > 0) & (sorted_uids[pos_c] == uids)
        return np.where(found, order[pos_c], -1)

    def lookup(self, uid: str) -> dict[str, Any]:
        """The metadata row of one uid (32 hex chars), with its shard name and row within the shard."""
        row = int(self.rows_of(hex_to_uids([uid]))[0])
        if row < 0:
            raise KeyError(f"uid {uid} not in {self.path}")
        si = int(np.searchsorted(self.offsets, row, side="right") - 1)
        shard = self.shards[si]
        local = row - int(self.offsets[si])
        rec = pq.read_table(shard.parquet).slice(local, 1).to_pylist()[0]
        return {**rec, "shard": shard.name, "row": local}

    # --- samples ---------------------------------------------------------------------------------------------------
    def iter_samples(self, shards: Sequence[Shard] | None = None) -> Iterator[Sample]:
        """Samples in pool order (tar order equals parquet order); checks the two agree."""
        for s in shards or self.shards:
            yield from iter_shard(s)

    # --- summary ---------------------------------------------------------------------------------------------------
    @cached_property
    def pool_id(self) -> str:
        """A short content id: per shard, its name, its tar's size and a hash of the parquet's uids, keys, captions,
        image sha256s and sizes.

        Two pools share an id exactly when they hold the same samples stored the same way (a re-encode changes the
        tar's size), whatever parquet writer produced the files; caches keyed by it (scorers, decoded images,
        training runs) never confuse two builds.
        """
        import hashlib

        parts = []
        for s in self.shards:
            h = hashlib.sha256()
            table = pq.read_table(s.parquet, columns=[c for c in CONTENT_COLUMNS if c in self._schema_names(s)])
            for name in table.column_names:
                h.update(name.encode())
                for buf in table.column(name).combine_chunks().buffers():
                    if buf is not None:
                        h.update(buf)
            parts.append((s.name, s.tar.stat().st_size, h.hexdigest()))
        return stable_hash(parts)

    @staticmethod
    def _schema_names(shard: Shard) -> set[str]:
        return set(pq.read_schema(shard.parquet).names)

    def skipped(self, reason: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """Every skipped input (optionally of one ``reason``), each with its ``shard``, and how many skips the shards'
        stats count but no list names (shards written before skip lists were kept)."""
        listed, unlisted = [], 0
        for s in self.shards:
            entries = s.read_skipped()
            counts = s.read_stats().get("skipped") or {}
            if reason is not None:
                entries = [e for e in entries if e.get("reason") == reason]
                counts = {reason: counts.get(reason, 0)}
            unlisted += max(0, sum(int(n) for n in counts.values()) - len(entries))
            listed.extend({"shard": s.name, **e} for e in entries)
        return listed, unlisted

    def summary(self) -> dict[str, Any]:
        skipped: dict[str, int] = {}
        written = inputs = nbytes = 0
        incomplete = []
        for s in self.shards:
            st = s.read_stats()
            if not st:
                incomplete.append(s.name)
            for reason, n in (st.get("skipped") or {}).items():
                skipped[reason] = skipped.get(reason, 0) + int(n)
            written += s.num_samples
            inputs += int(st.get("input", st.get("count", s.num_samples)))
            nbytes += s.tar.stat().st_size
        return {
            "path": str(self.path),
            "shards": len(self.shards),
            "samples": written,
            "input": inputs,
            "skipped": dict(sorted(skipped.items(), key=lambda kv: -kv[1])),
            "skipped_total": sum(skipped.values()),
            "bytes": nbytes,
            "shards_without_stats": incomplete,
            "columns": self.columns(),
        }


def iter_shard(shard: Shard) -> Iterator[Sample]:
    """Read one shard's tar, grouped by key; the tar must hold exactly the parquet's rows, in the same order."""
    from datafilter.pool.tario import TarError, tar_samples

    rows = pq.read_table(shard.parquet).to_pylist()
    tar_count = 0
    try:
        for key, files in tar_samples(shard.tar):
            tar_count += 1
            if tar_count > len(rows):
                continue  # counted, reported below
            row = rows[tar_count - 1]
            if row["key"] != key:
                raise PoolError(f"{shard.tar}: sample {tar_count - 1} is {key!r} but {shard.parquet.name} "
                                f"has {row['key']!r} there; the tar and its parquet disagree")
            ext = next((e for e in IMAGE_EXTS if e in files), None)
            if ext is None:
                raise PoolError(f"{shard.tar}: sample {key} has no image ({', '.join(IMAGE_EXTS)})")
            meta = json.loads(files["json"]) if "json" in files else {}
            text = files["txt"].decode("utf-8") if "txt" in files else row.get("text", "")
            yield Sample(row["uid"], key, text, files[ext], ext, meta)
    except TarError as exc:
        raise PoolError(str(exc)) from None
    if tar_count != len(rows):
        raise PoolError(f"{shard.tar}: {tar_count} samples in the tar but {len(rows)} rows in {shard.parquet.name}")
