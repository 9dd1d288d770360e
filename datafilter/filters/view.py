"""``FilterView``: the read-only picture of a pool that a filter works on.

It can be built from a pool directory and an embedding space (``FilterView.from_pool``) or from plain arrays
(``FilterView(uids, ...)``), so that any source of the same arrays (e.g. DataComp's released metadata: parquet plus
``.npz`` embeddings) can feed the same filters. Everything is read on first use and only what is asked for: a
filter that only reads scores reads the uid and score columns, never an embedding. Embeddings stay in their per-shard
files, memory-mapped (``ShardedArray``), so no filter holds a whole pool's vectors in memory. Arrays handed out are
read-only, so a filter cannot change what the next filter (or the report) sees. Ground truth about a synthetic pool's
noise is deliberately not reachable from here.

Which rows have embeddings: ``valid`` is what is known without reading them (an embedding store records it; a
plain-array view may be given it). Where the embeddings themselves must say (DataComp marks a missing embedding with
a zero vector), ``usable(kinds)`` reads the arrays of those kinds, shard by shard, when a filter that reads them
asks, and only then.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datafilter.embed.store import ShardedArray, usable_rows
from datafilter.pool.uid import UID_DTYPE, count_in_sorted, uids_from_arrow

log = logging.getLogger(__name__)

Source = Any  # an array, or a zero-argument callable that returns one
REFERENCE_DIR = "reference"

# Needs a filter may declare, and how a user produces each when it is missing.
HOW_TO = {
    "image_embeddings": "run `datafilter embed POOL` (or pass --space for an existing space)",
    "text_embeddings": "run `datafilter embed POOL` (or pass --space for an existing space)",
    "scores": "run `datafilter embed POOL`, which writes CLIP scores beside the embeddings",
    "reference": "embed the reference set (the embed stage writes POOL/embeddings/SPACE/reference/NAME.npy) "
                 "or pass --reference NAME=PATH.npy",
    "metadata": "the pool's parquet files need this column",
}


def _read_only(arr: np.ndarray) -> np.ndarray:
    if isinstance(arr, ShardedArray):  # read-only by construction
        return arr
    view = arr.view()
    view.flags.writeable = False
    return view


def column_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric or boolean arrow column as numpy, read straight from its buffers when it has no nulls.

    Arrow's own conversion imports pandas on first use, which alone costs more than a whole CLIP-score filter on
    a million rows; other columns go through it."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for c in chunks:
        if c.null_count == 0 and pa.types.is_boolean(c.type):
            bits = np.frombuffer(c.buffers()[1], np.uint8)
            parts.append(np.unpackbits(bits, bitorder="little")[c.offset:c.offset + len(c)].astype(bool))
        elif c.null_count == 0 and (pa.types.is_floating(c.type) or pa.types.is_integer(c.type)):
            dtype = np.dtype({"halffloat": "float16", "float": "float32", "double": "float64"}.get(str(c.type),
                                                                                                 str(c.type)))
            parts.append(np.frombuffer(c.buffers()[1], dtype, len(c), c.offset * dtype.itemsize))
        else:
            parts.append(np.asarray(c.to_numpy(zero_copy_only=False)))
    if not parts:
        return np.empty(0)
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()


def uid_order(uids: np.ndarray) -> np.ndarray:
    """The permutation that sorts ``u8,u8`` uids (high word, then low). Random 128-bit uids almost never share a
    high word, so one argsort of the high words usually decides; only equal high words need the low word."""
    order = np.argsort(uids["f0"], kind="stable")
    hi = uids["f0"][order]
    if len(hi) > 1 and np.any(hi[1:] == hi[:-1]):
        order = np.lexsort((uids["f1"], uids["f0"]))
    return order


class FilterView:
    """Read-only access to one pool's uids, metadata, embeddings, scores and reference sets.

    Args:
        uids: ``u8,u8`` uids in pool order; every other per-row array follows this order.
        metadata: a pyarrow table, or a callable ``columns -> table`` that reads only the columns asked for.
        image, text: ``[n, dim]`` float16 L2-normalised embeddings (NaN rows where ``valid`` is False): numpy
            arrays, ``ShardedArray``s, or callables returning one.
        scores: ``{column: [n] float}`` CLIP-style scores, or a callable returning that mapping.
        score_column: the default score column (the space's ``score_column``).
        valid: ``[n]`` bool, False where the sample has no embedding; default: all rows valid.
        check_embeddings: whether ``usable`` must read the embeddings to find rows without one (NaN or zero
            vectors); False where ``valid`` already says (an embedding store writes NaN rows exactly where it
            records ``valid = False``).
        references: ``{name: [m, dim] float16 array | path | callable}``; a path may be ``.npy``, a ``torch.save``
            file, a glob or a comma-separated list (``datafilter.embed.datacomp.load_features``).
        reference_labels: ``{name: [m] int array | path}``.
        shard_rows: rows per shard of the source, for filters that work shard by shard (default: one shard).
        workdir: where filters keep resumable working files (default ``work/cache/filters``).
        pool_path, pool_id, space: recorded in the subset's sidecar.
    """

    def __init__(self, uids: np.ndarray, *, metadata: pa.Table | Callable[[Sequence[str] | None], pa.Table]
                 | None = None, image: Source = None, text: Source = None,
                 scores: Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]] | None = None,
                 score_column: str | None = None, valid: Source = None,
                 references: Mapping[str, Source] | None = None, reference_labels: Mapping[str, Source] | None = None,
                 pool_path: str | Path | None = None, pool_id: str | None = None, space: str | None = None,
                 columns: Sequence[str] | None = None, check_embeddings: bool = True,
                 shard_rows: Sequence[int] | None = None, workdir: str | Path | None = None):
        uids = np.asarray(uids)
        if uids.dtype != UID_DTYPE:
            raise ValueError(f"uids must have dtype {UID_DTYPE}, got {uids.dtype}")
        self._uids = _read_only(uids)
        self._metadata = metadata
        self._columns = list(columns) if columns is not None else (
            list(metadata.column_names) if isinstance(metadata, pa.Table) else None)
        self._sources: dict[str, Source] = {"image": image, "text": text, "valid": valid}
        self._scores_src = scores
        self.score_column = score_column
        self._refs: dict[str, Source] = dict(references or {})
        self._ref_labels: dict[str, Source] = dict(reference_labels or {})
        self._cache: dict[str, Any] = {}
        self.pool_path = str(pool_path) if pool_path is not None else None
        self.pool_id = pool_id
        self.space = space
        self.check_embeddings = check_embeddings
        rows = [len(uids)] if shard_rows is None else [int(r) for r in shard_rows]
        if sum(rows) != len(uids):
            raise ValueError(f"shard_rows add up to {sum(rows)}, but there are {len(uids)} uids")
        self.shard_offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.workdir = Path(workdir) if workdir is not None else Path("work") / "cache" / "filters"
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None

    # --- construction from a pool ----------------------------------------------------------------------------------
    @classmethod
    def from_pool(cls, pool_dir: str | Path, space: str | None = None,
                  references: Mapping[str, str | Path] | None = None,
                  workdir: str | Path | None = None) -> "FilterView":
        """A view of a pool directory and one of its embedding spaces (the only one, if ``space`` is not given).

        Embeddings, scores and references are optional: a pool without them still serves filters that read only
        metadata; a filter that needs them is stopped before it starts, with a message that says how to make them.
        """
        from datafilter.embed.store import EMBED_DIR, EmbeddingError, EmbeddingStore
        from datafilter.pool.pool import Pool

        pool = Pool(pool_dir)
        # ParquetFile.read, unlike pq.read_table, does not import pyarrow.dataset (and pandas): a second saved
        chunks = [c for s in pool.shards for c in pq.ParquetFile(s.parquet).read(columns=["uid"]).column("uid").chunks]
        uid_col = pa.chunked_array(chunks) if chunks else pa.chunked_array([], type=pa.string())
        uids = uids_from_arrow(uid_col)
        pool.__dict__.setdefault("uids", uids)  # share the parsed uids so the pool does not parse them again
        if space is None:
            spaces = sorted(p.parent.name for p in (pool.path / EMBED_DIR).glob("*/space.json"))
            if len(spaces) > 1:
                raise ValueError(f"{pool.path} has embedding spaces {', '.join(spaces)}; choose one with --space")
            space = spaces[0] if spaces else None
        kwargs: dict[str, Any] = {}
        refs: dict[str, Source] = {}
        labels: dict[str, Source] = {}
        if space is not None:
            store = EmbeddingStore(pool, space)
            info = store.info  # raises with a clear message if the space does not exist
            missing = store.missing()
            if missing:
                log.warning("space %s of %s lacks %d shard(s) (first: %s); embedding-based filters will refuse to run",
                            space, pool.path, len(missing), missing[0].name)
            else:
                def load_scores() -> dict[str, np.ndarray]:
                    table = pa.concat_tables([pq.ParquetFile(store.paths(s)[2]).read() for s in pool.shards])
                    if not table.column("uid").equals(uid_col):
                        raise EmbeddingError(f"scores of space '{space}' in {store.dir} are not row-aligned with "
                                             f"the pool's parquet files (uid columns differ)")
                    return {c: column_to_numpy(table.column(c)).astype(np.float32)
                            for c in table.column_names if c not in ("uid", "valid")} | {
                        "__valid__": column_to_numpy(table.column("valid")).astype(bool)}

                kwargs.update(image=store.all_image, text=store.all_text, scores=load_scores,
                              score_column=info.score_column)
            ref_dir = store.dir / REFERENCE_DIR
            for path in sorted(ref_dir.glob("*.npy")):
                if path.stem.endswith("_labels"):
                    continue
                refs[path.stem] = path
                if (lab := path.with_name(f"{path.stem}_labels.npy")).exists():
                    labels[path.stem] = lab
        for name, path in (references or {}).items():
            refs[name] = path
            if (lab := Path(path).with_name(f"{Path(path).stem}_labels.npy")).exists():
                labels[name] = lab
        view = cls(uids, metadata=lambda cols: pool.metadata(cols), columns=pool.columns(), references=refs,
                   reference_labels=labels, pool_path=pool.path.resolve(), pool_id=pool.pool_id, space=space,
                   check_embeddings=False, shard_rows=[s.num_samples for s in pool.shards], workdir=workdir,
                   **kwargs)
        return view

    @classmethod
    def from_datacomp(cls, path: str | Path, model: str = "l14",
                      references: Mapping[str, str | Path] | None = None, arrays_dir: str | Path | None = None,
                      workdir: str | Path | None = None) -> "FilterView":
        """A view of DataComp's released metadata (``NNNNNNNN.parquet`` + ``.npz``) for ``model`` (b32 or l14):
        the same filters run on it without re-embedding anything. Scores come from the parquet's score columns;
        embeddings are read (memory-mapped where the files allow, see ``DataCompMetadata``) only by filters that
        use them, and only then are rows with zero or NaN vectors found."""
        from datafilter.common.files import stable_hash
        from datafilter.embed.datacomp import SCORE_COLUMNS, DataCompMetadata

        dc = DataCompMetadata(path, model, arrays_dir=arrays_dir)
        uids = dc.uids
        columns = dc.columns()

        def load_scores() -> dict[str, np.ndarray]:
            present = [c for c in SCORE_COLUMNS.values() if c in columns]
            table = dc.metadata(present)
            return {c: column_to_numpy(table.column(c)).astype(np.float32) for c in present}

        pool_id = stable_hash([(p.name, n) for p, n in zip(dc.parquets, dc.rows)])
        return cls(uids, metadata=lambda cols: dc.metadata(cols), columns=columns,
                   image=lambda: dc.array("img"), text=lambda: dc.array("txt"), scores=load_scores,
                   score_column=dc.score_column, references=dict(references or {}),
                   pool_path=dc.path.resolve(), pool_id=pool_id, space=f"datacomp-{model}", shard_rows=dc.rows,
                   workdir=workdir)

    # --- basic facts -----------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self._uids)

    @property
    def uids(self) -> np.ndarray:
        return self._uids

    @property
    def columns(self) -> list[str]:
        if self._columns is None:
            self._columns = list(self.metadata(None).column_names) if self._metadata is not None else []
        return self._columns

    def has(self, what: str) -> bool:
        if what in ("image_embeddings", "text_embeddings"):
            return self._sources["image" if what.startswith("image") else "text"] is not None
        if what == "scores":
            return self._scores_src is not None
        if what.startswith("metadata:"):
            return what.split(":", 1)[1] in self.columns
        if what.startswith("reference:"):
            return self._reference_source(what.split(":", 1)[1]) is not None
        raise ValueError(f"unknown need {what!r} (known: image_embeddings, text_embeddings, scores, "
                         f"metadata:COLUMN, reference:NAME)")

    def missing(self, needs: Iterable[str]) -> list[str]:
        """For each need not met, a line naming it and how to produce it."""
        out = []
        for need in needs:
            if not self.has(need):
                kind = need.split(":", 1)[0]
                extra = ""
                if kind == "reference":
                    extra = f" (available: {', '.join(self.references) or 'none'})"
                where = f" in space '{self.space}'" if self.space else ""
                out.append(f"{need}{where}{extra}: {HOW_TO[kind]}")
        return out

    # --- metadata --------------------------------------------------------------------------------------------------
    def metadata(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Metadata columns in pool order (uid, text, original_width, ... and source fields)."""
        if self._metadata is None:
            raise ValueError("this view has no metadata")
        if isinstance(self._metadata, pa.Table):
            return self._metadata.select(list(columns)) if columns else self._metadata
        return self._metadata(list(columns) if columns else None)

    def column(self, name: str) -> np.ndarray:
        key = f"col:{name}"
        if key not in self._cache:
            if name not in self.columns:
                raise ValueError(f"no metadata column {name!r} (columns: {', '.join(self.columns)})")
            col = self.metadata([name]).column(name)
            self._cache[key] = _read_only(np.asarray(col.to_numpy(zero_copy_only=False)))
        return self._cache[key]

    def text(self) -> tuple[str, ...]:
        """Captions as Python strings (the ``text`` column), in a tuple so that no filter can change them."""
        if "texts" not in self._cache:
            self._cache["texts"] = tuple("" if t is None else t
                                         for t in self.metadata(["text"]).column("text").to_pylist())
        return self._cache["texts"]

    # --- embeddings and scores -------------------------------------------------------------------------------------
    def _array(self, key: str) -> np.ndarray:
        if key not in self._cache:
            src = self._sources[key]
            if src is None:
                raise ValueError(f"this view has no {key} embeddings")
            arr = src() if callable(src) else src
            if arr.ndim != 2 or len(arr) != self.n:
                raise ValueError(f"{key} embeddings have shape {arr.shape}, expected [{self.n}, dim]")
            self._cache[key] = _read_only(arr)
        return self._cache[key]

    def image_embeddings(self) -> np.ndarray:
        """``[n, dim]`` float16, L2-normalised, memory-mapped where possible; NaN rows where not valid."""
        return self._array("image")

    def text_embeddings(self) -> np.ndarray:
        return self._array("text")

    def _score_table(self) -> Mapping[str, np.ndarray]:
        if "scores" not in self._cache:
            if self._scores_src is None:
                raise ValueError("this view has no scores")
            src = self._scores_src
            self._cache["scores"] = dict(src() if callable(src) else src)
        return self._cache["scores"]

    @property
    def score_columns(self) -> list[str]:
        return [c for c in self._score_table() if not c.startswith("__")] if self._scores_src is not None else []

    def scores(self, column: str | None = None) -> np.ndarray:
        """``[n]`` float32 scores from ``column`` (default: the space's score column); NaN where not valid."""
        table = self._score_table()
        column = column or self.score_column or (self.score_columns[0] if len(self.score_columns) == 1 else None)
        if column not in table:
            raise ValueError(f"no score column {column!r} (available: {', '.join(self.score_columns) or 'none'})")
        key = f"score:{column}"
        if key not in self._cache:
            s = np.asarray(table[column], np.float32).copy()
            s[~self.valid] = np.nan
            self._cache[key] = _read_only(s)
        return self._cache[key]

    @property
    def valid(self) -> np.ndarray:
        """``[n]`` bool: the row has embeddings as far as is known without reading them (False where its image
        could not be decoded or embedded). See ``usable`` for the rows whose vectors a filter can use."""
        if "valid" not in self._cache:
            src = self._sources["valid"]
            if src is not None:
                v = np.asarray(src() if callable(src) else src, bool)
            elif self._scores_src is not None and "__valid__" in self._score_table():
                v = np.asarray(self._score_table()["__valid__"], bool)
            else:
                v = np.ones(self.n, bool)
            if len(v) != self.n:
                raise ValueError(f"valid mask has {len(v)} rows, expected {self.n}")
            self._cache["valid"] = _read_only(v)
        return self._cache["valid"]

    def usable(self, *kinds: str) -> np.ndarray:
        """``[n]`` bool: ``valid`` and, for each of ``kinds`` (``image``, ``text``), a finite non-zero vector.

        Where the source already guarantees that (an embedding store), this is ``valid``; otherwise the arrays of
        those kinds are read once, shard by shard, a chunk at a time (DataComp's metadata: a zero vector marks a
        missing embedding), and the answer is kept."""
        for kind in kinds:
            if kind not in ("image", "text"):
                raise ValueError(f"unknown embedding kind {kind!r} (image, text)")
        if not self.check_embeddings or not kinds:
            return self.valid
        key = "usable:" + ",".join(sorted(set(kinds)))
        if key not in self._cache:
            ok = self.valid.copy()
            for kind in sorted(set(kinds)):
                if f"usable:{kind}" not in self._cache:
                    self._cache[f"usable:{kind}"] = _read_only(usable_rows([self._array(kind)]))
                ok &= self._cache[f"usable:{kind}"]
            self._cache[key] = _read_only(ok)
        return self._cache[key]

    # --- reference sets --------------------------------------------------------------------------------------------
    @property
    def references(self) -> list[str]:
        return sorted(self._refs)

    def _reference_source(self, name: str) -> Source | None:
        if name in self._refs:
            return self._refs[name]
        from datafilter.embed.datacomp import expand_paths, is_saved_file
        from datafilter.embed.store import EmbeddingError

        if is_saved_file(name):
            try:
                return name if all(p.is_file() for p in expand_paths(name)) else None
            except EmbeddingError:  # a glob that matches nothing
                return None
        return None

    def reference(self, name: str) -> np.ndarray:
        """A reference set's ``[m, dim]`` embeddings, by name or by file: an ``.npy``, a ``torch.save`` file such
        as DataComp's ``in1k_clip_vit_l14_0.pt`` (its ``image_features``), a glob or a comma-separated list."""
        src = self._reference_source(name)
        if src is None:
            raise ValueError(f"no reference set {name!r} (available: {', '.join(self.references) or 'none'}); "
                             f"{HOW_TO['reference']}")
        key = f"ref:{name}"
        if key not in self._cache:
            if isinstance(src, (str, Path)):
                from datafilter.embed.datacomp import load_features

                arr = load_features(src)
            else:
                arr = src() if callable(src) else src
            if arr.ndim != 2:
                raise ValueError(f"reference set {name!r} ({src if isinstance(src, (str, Path)) else 'array'}) "
                                 f"has shape {arr.shape}, expected [m, dim]")
            finite = usable_rows([arr])
            if not finite.all():  # a reference image that failed to embed carries no information
                log.warning("reference set %r: ignoring %d row(s) without a finite, non-zero embedding", name,
                            int((~finite).sum()))
                arr = arr[np.flatnonzero(finite)]
            if len(arr) == 0:
                raise ValueError(f"reference set {name!r} has no usable embeddings")
            self._cache[key] = _read_only(arr if isinstance(arr, ShardedArray) else np.asarray(arr))
        return self._cache[key]

    def reference_labels(self, name: str) -> np.ndarray | None:
        src = self._ref_labels.get(name)
        if src is None:
            return None
        return _read_only(np.load(src) if isinstance(src, (str, Path)) else np.asarray(src))

    # --- helpers for filters ---------------------------------------------------------------------------------------
    def uids_of(self, rows: np.ndarray) -> np.ndarray:
        """Sorted uids of the given rows (a bool mask or row indices; repeated indices give repeated uids)."""
        rows = np.asarray(rows)
        picked = self._uids[rows] if rows.dtype == bool else self._uids[rows.astype(np.int64)]
        return picked[uid_order(picked)]

    def sorted_uids(self) -> np.ndarray:
        if self._sorted is None:
            order = uid_order(self._uids)
            self._sorted = (self._uids[order], order)
        return self._sorted[0]

    def contains(self, uids: np.ndarray) -> np.ndarray:
        """Bool per uid: is it in the pool (exact on both words)."""
        return count_in_sorted(self.sorted_uids(), uids) > 0
