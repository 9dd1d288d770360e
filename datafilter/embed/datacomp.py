"""DataComp's released metadata and assets, read as they are, so filters run on them without re-embedding anything.

DataComp publishes, per metadata shard ``NNNNNNNN``, a parquet (``uid`` as 32 hex characters, ``url``, ``text``,
``original_width``, ``original_height``, ``clip_b32_similarity_score``, ``clip_l14_similarity_score``, ...) and an
``.npz`` with four row-aligned float16 arrays: ``b32_img``, ``b32_txt`` (OpenAI ViT-B/32) and ``l14_img``, ``l14_txt``
(OpenAI ViT-L/14), L2-normalised. At DataComp's small scale that is 12.8M rows, about 20 GB of float16 per L/14
modality: more than a workstation's memory, so nothing here joins a pool's arrays.

Reading only what is needed: the parquet columns a filter asks for; an array of a shard only when a filter reads
embeddings, and then through a memory map when the file allows one:

* an ``.npz`` member stored without compression (what ``np.savez`` writes) is memory-mapped in place, inside the
  zip file: no copy, no unpacking;
* a compressed member (``np.savez_compressed``) cannot be mapped; it is decompressed a shard at a time when read,
  or, once, by ``unpack`` into ``NNNNNNNN_l14_img.npy`` files (beside the metadata or in ``arrays_dir``) that are
  mapped from then on. Unpacking is resumable (each file is written under a temporary name and renamed when
  complete) and checks the free disk space first.

Also here: DataComp's released image-based assets, the pool centroids (``small_centroids_l14.pt`` ...,
``torch.save`` of a float32 numpy array) and the ImageNet-1k L/14 features (``in1k_clip_vit_l14_{0..4}.pt``, a dict
whose ``image_features`` is a tensor), loaded as they are.
"""

from __future__ import annotations

import errno
import glob
import logging
import pickle
import shutil
import struct
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datafilter.common.files import atomic_path
from datafilter.embed.store import EmbeddingError, ShardedArray, usable_rows

log = logging.getLogger(__name__)

MODELS = ("b32", "l14")
KINDS = ("img", "txt")
SCORE_COLUMNS = {"b32": "clip_b32_similarity_score", "l14": "clip_l14_similarity_score"}
MODEL_NAMES = {"b32": "ViT-B-32", "l14": "ViT-L-14"}  # open_clip names; the weights are OpenAI's ("openai")


@dataclass(frozen=True)
class Member:
    """Where one array lives inside an ``.npz``: its shape and dtype and, if stored uncompressed, the byte offset of
    its data in the zip file (None when compressed)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int | None


def npz_member(npz_path: Path, key: str) -> Member:
    """Read the header of array ``key`` of an ``.npz`` (a few hundred bytes, whatever the array's size)."""
    name = f"{key}.npy"
    try:
        with zipfile.ZipFile(npz_path) as zf:
            try:
                info = zf.getinfo(name)
            except KeyError:
                have = ", ".join(n[:-4] for n in zf.namelist() if n.endswith(".npy")) or "none"
                raise EmbeddingError(f"{npz_path}: no array {key!r} (has {have}); not DataComp metadata for this "
                                     "model") from None
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise EmbeddingError(f"{npz_path}: {name} has unsupported .npy version {version}")
                shape, fortran, dtype = read_header(f)
                header_len = f.tell()
        offset = None
        if info.compress_type == zipfile.ZIP_STORED:
            with open(npz_path, "rb") as raw:
                raw.seek(info.header_offset)
                local = raw.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise EmbeddingError(f"{npz_path}: corrupt zip entry for {name}")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                offset = info.header_offset + 30 + name_len + extra_len + header_len
            nbytes = int(np.prod(shape)) * dtype.itemsize
            size = npz_path.stat().st_size
            if offset + nbytes > size:
                raise EmbeddingError(f"{npz_path}: truncated ({name} needs {offset + nbytes:,} bytes, the file has "
                                     f"{size:,}); download it again")
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        if isinstance(exc, EmbeddingError):
            raise
        raise EmbeddingError(f"{npz_path}: unreadable npz, truncated or not a zip file ({exc})") from None
    return Member(tuple(shape), dtype, fortran, offset)


class DataCompMetadata:
    """A folder of DataComp metadata shards (``NNNNNNNN.parquet`` + ``NNNNNNNN.npz``), for one model (b32 or l14).

    ``arrays_dir``: where ``unpack`` writes (and where later reads look for) unpacked ``.npy`` arrays; default the
    metadata folder itself.
    """

    def __init__(self, path: str | Path, model: str = "l14", arrays_dir: str | Path | None = None):
        if model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)} (DataComp's embeddings), got {model!r}")
        self.path = Path(path)
        self.model = model
        if not self.path.is_dir():
            raise EmbeddingError(f"DataComp metadata folder not found: {self.path}")
        self.arrays_dir = Path(arrays_dir) if arrays_dir is not None else self.path
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
        self._warned_compressed = False

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

    def key(self, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return f"{self.model}_{kind}"

    # --- metadata --------------------------------------------------------------------------------------------------
    def columns(self) -> list[str]:
        return list(pq.read_schema(self.parquets[0]).names)

    def metadata(self, columns: Sequence[str] | None = None) -> pa.Table:
        tables = []
        for p in self.parquets:
            try:
                # ParquetFile.read, unlike pq.read_table, does not import pyarrow.dataset (and pandas)
                tables.append(pq.ParquetFile(p).read(columns=list(columns) if columns else None))
            except (pa.ArrowInvalid, KeyError, OSError) as exc:
                raise EmbeddingError(f"{p}: {exc}") from None
        return pa.concat_tables(tables, promote_options="permissive")

    def column(self, name: str) -> np.ndarray:
        return self.metadata([name]).column(name).to_numpy(zero_copy_only=False)

    @cached_property
    def uids(self) -> np.ndarray:
        """All uids in file order as ``u8,u8``."""
        from datafilter.pool.uid import uids_from_arrow

        parts = []
        for p in self.parquets:
            try:
                parts.append(uids_from_arrow(pq.ParquetFile(p).read(columns=["uid"]).column("uid")))
            except (ValueError, KeyError, pa.ArrowInvalid) as exc:
                raise EmbeddingError(f"{p}: bad uid column ({exc})") from None
        return np.concatenate(parts)

    # --- embeddings ------------------------------------------------------------------------------------------------
    def npz_path(self, index: int) -> Path:
        return self.parquets[index].with_suffix(".npz")

    def unpacked_path(self, index: int, kind: str) -> Path:
        return self.arrays_dir / f"{self.parquets[index].stem}_{self.key(kind)}.npy"

    def _shape_error(self, where: Path, key: str, shape: tuple, index: int) -> EmbeddingError:
        return EmbeddingError(f"{where}: {key} has shape {shape} but {self.parquets[index].name} has "
                              f"{self.rows[index]} rows")

    def _check_shape(self, where: Path, key: str, shape: tuple, index: int) -> None:
        if len(shape) != 2 or shape[0] != self.rows[index]:
            raise self._shape_error(where, key, shape, index)

    def _unpacked(self, index: int, kind: str) -> np.ndarray | None:
        """The unpacked array of one shard, memory-mapped and checked, or None if there is none."""
        unpacked = self.unpacked_path(index, kind)
        if not unpacked.is_file():
            return None
        try:
            arr = np.load(unpacked, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise EmbeddingError(f"{unpacked}: unreadable ({exc}); delete it and unpack again") from None
        self._check_shape(unpacked, self.key(kind), arr.shape, index)
        return arr

    def header(self, index: int, kind: str) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of one shard's array (from the unpacked file if there is one), checked against the
        parquet's row count. Reads headers only."""
        arr = self._unpacked(index, kind)
        if arr is not None:
            return arr.shape, arr.dtype
        m = npz_member(self.npz_path(index), self.key(kind))
        self._check_shape(self.npz_path(index), self.key(kind), m.shape, index)
        return m.shape, m.dtype

    def shard_array(self, index: int, kind: str) -> np.ndarray:
        """``img`` or ``txt`` embeddings of one shard: a memory map where the file allows it (an unpacked array, or
        an uncompressed ``.npz`` member), else the member decompressed into memory."""
        key = self.key(kind)
        arr = self._unpacked(index, kind)
        if arr is not None:
            return arr
        npz = self.npz_path(index)
        m = npz_member(npz, key)
        self._check_shape(npz, key, m.shape, index)
        if m.offset is not None:
            if self.rows[index] == 0:
                return np.empty(m.shape, m.dtype)
            return np.memmap(npz, m.dtype, "r", offset=m.offset, shape=m.shape, order="F" if m.fortran else "C")
        if not self._warned_compressed:
            log.warning("%s: compressed .npz members are decompressed into memory a shard at a time; "
                        "`datafilter datacomp unpack %s` once makes them memory-mappable", self.path, self.path)
            self._warned_compressed = True
        try:
            with np.load(npz) as f:
                return np.asarray(f[key])
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise EmbeddingError(f"{npz}: unreadable npz ({exc})") from None

    def array(self, kind: str) -> ShardedArray:
        """The whole folder's ``img`` or ``txt`` embeddings as one read-only array over the per-shard files. Every
        shard's header is checked first (row count against its parquet, equal widths), so a bad file fails before
        any long work starts."""
        key = self.key(kind)
        dims, dtypes = set(), set()
        for i in range(len(self.parquets)):
            shape, dtype = self.header(i, kind)
            dims.add(shape[1])
            dtypes.add(np.dtype(dtype))
        if len(dims) > 1:
            raise EmbeddingError(f"{self.path}: {key} has different widths across shards: {sorted(dims)}")
        dtype = np.float16 if dtypes == {np.dtype(np.float16)} else np.float32
        return ShardedArray(self.rows, dims.pop(), lambda i: self.shard_array(i, kind), dtype=dtype,
                            name=f"{self.path} {key}")

    def all_image(self) -> ShardedArray:
        return self.array("img")

    def all_text(self) -> ShardedArray:
        return self.array("txt")

    def valid(self, kinds: Sequence[str] = KINDS) -> np.ndarray:
        """Rows with usable embeddings of the given kinds: finite and non-zero vectors. Reads those arrays shard by
        shard (DataComp marks a missing embedding with a zero vector)."""
        return usable_rows([self.array(k) for k in kinds])

    def scores(self) -> np.ndarray:
        """The released CLIP score column of the chosen model (float32)."""
        return self.column(self.score_column).astype(np.float32)

    def all_scores(self) -> pa.Table:
        """uid, valid and the score column for the whole folder, in file order (the ``EmbeddingStore`` shape)."""
        uids = self.metadata(["uid"]).column("uid")
        return pa.table({"uid": uids, "valid": pa.array(self.valid()),
                         self.score_column: pa.array(self.scores(), pa.float32())})

    # --- unpacking -------------------------------------------------------------------------------------------------
    def unpack(self, kinds: Sequence[str] = KINDS, progress: bool = True) -> list[Path]:
        """Write each shard's ``kinds`` arrays as ``.npy`` files into ``arrays_dir`` (memory-mappable), once.

        Files already there (complete: each is renamed into place only when written) are kept, so a killed run
        resumes; a disk without room for what is left fails before writing, naming the folder and the bytes
        needed. Returns the files written now."""
        from tqdm.auto import tqdm

        todo = []
        for i in range(len(self.parquets)):
            for kind in kinds:
                target = self.unpacked_path(i, kind)
                if target.is_file():
                    self.header(i, kind)  # an existing file must match its parquet
                    continue
                m = npz_member(self.npz_path(i), self.key(kind))
                self._check_shape(self.npz_path(i), self.key(kind), m.shape, i)
                todo.append((i, kind, target, int(np.prod(m.shape)) * m.dtype.itemsize + 128))
        self.arrays_dir.mkdir(parents=True, exist_ok=True)
        for _, _, target, _ in todo:  # temporary files of a killed run
            for stale in target.parent.glob(f".{target.name}.tmp-*"):
                stale.unlink()
        need = sum(t[3] for t in todo)
        free = shutil.disk_usage(self.arrays_dir).free
        if need > free:
            raise EmbeddingError(f"{self.arrays_dir}: unpacking {len(todo)} array(s) needs {need / 2**30:.1f} GiB, "
                                 f"the disk has {free / 2**30:.1f} GiB free; free space or unpack elsewhere "
                                 "(--out DIR)")
        written = []
        for i, kind, target, size in tqdm(todo, desc="unpack", unit="array", disable=not progress or not todo):
            name = f"{self.key(kind)}.npy"
            try:
                with atomic_path(target) as tmp:
                    with zipfile.ZipFile(self.npz_path(i)) as zf, zf.open(name) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 22)  # an npz member is an .npy file: copied, not decoded
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise EmbeddingError(f"{target}: disk full while unpacking ({size / 2**20:.0f} MiB needed); the "
                                         f"{len(written)} file(s) finished are kept, free space and run again") from None
                raise EmbeddingError(f"{self.npz_path(i)}: unpacking {name} failed ({exc})") from None
            except zipfile.BadZipFile as exc:
                raise EmbeddingError(f"{self.npz_path(i)}: unreadable npz ({exc})") from None
            self.header(i, kind)
            written.append(target)
        return written


# --- DataComp's released image-based assets ------------------------------------------------------------------------
_NUMPY_PICKLE = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                 ("numpy", "ndarray"), ("numpy", "dtype")}


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (no code runs from the file)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_PICKLE or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array type")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("holds torch tensors")


def _torch_pickle_payload(path: Path) -> bytes:
    """The pickle inside a ``torch.save`` file (a zip with ``*/data.pkl``), or the file itself if it is a plain
    pickle."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                raise EmbeddingError(f"{path}: a zip file but not one written by torch.save (no data.pkl)")
            return zf.read(names[0])
    return path.read_bytes()


def load_saved(path: str | Path) -> Any:
    """Load a file written by ``torch.save`` or ``np.save`` without running code from it.

    ``.npy`` files load with numpy. A ``torch.save`` of a numpy array (DataComp's centroids, saved with pickle
    protocol 4, which torch's own weights-only loader refuses) is unpickled allowing numpy types only; anything
    holding tensors (DataComp's ImageNet features) goes through ``torch.load(weights_only=True)``."""
    import io

    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"file not found: {path}")
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise EmbeddingError(f"{path}: unreadable .npy ({exc})") from None
    try:
        return _NumpyUnpickler(io.BytesIO(_torch_pickle_payload(path))).load()
    except (pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile, struct.error, TypeError):
        pass
    import torch

    try:  # tensors memory-mapped from the file rather than copied
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several kinds for a file it cannot read
        raise EmbeddingError(f"{path}: not a loadable torch.save or numpy file ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]})") from None


def _as_matrix(obj: Any, path: Path, what: str) -> np.ndarray:
    if hasattr(obj, "detach"):  # a torch tensor; numpy has no bfloat16
        obj = obj.detach().cpu()
        obj = (obj.float() if str(obj.dtype) == "torch.bfloat16" else obj).numpy()
    arr = np.asarray(obj)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating) or len(arr) == 0:
        raise EmbeddingError(f"{path}: expected {what} as a non-empty 2-D float array, got {arr.dtype} {arr.shape}")
    return arr


def load_centroids(path: str | Path, dim: int | None = None) -> np.ndarray:
    """k-means centroids ``[k, d]`` float32 from ``.npy`` or a ``torch.save`` file (DataComp's
    ``{scale}_centroids_l14.pt``); ``dim``, if given, must be their width."""
    path = Path(path)
    arr = np.ascontiguousarray(_as_matrix(load_saved(path), path, "centroids"), np.float32)
    if dim is not None and arr.shape[1] != dim:
        raise EmbeddingError(f"{path}: centroids of width {arr.shape[1]}, but the embeddings have width {dim} "
                             "(DataComp's centroids are for the L/14 image embeddings, 768 wide)")
    return arr


def expand_paths(spec: str | Path) -> list[Path]:
    """A path, a glob (``in1k_clip_vit_l14_*.pt``) or a comma-separated list of either, in sorted order per glob."""
    out: list[Path] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        if not matches:
            raise EmbeddingError(f"no files match {part}")
        out += [Path(m) for m in matches]
    return out


def load_features(spec: str | Path, key: str = "image_features") -> np.ndarray | ShardedArray:
    """Reference features from one or more files: ``.npy`` arrays, or ``torch.save`` dicts whose ``key`` holds the
    tensor (DataComp's ``in1k_clip_vit_l14_{0..4}.pt``: ``image_features``) or bare tensors/arrays. Several files
    are seen as one array (``ShardedArray``) over their memory maps, not joined: ImageNet's 1.28M L/14 features are
    2 GB of float16."""
    paths = expand_paths(spec)

    def part(path: Path) -> np.ndarray:
        obj = load_saved(path)
        if isinstance(obj, dict):
            if key not in obj:
                raise EmbeddingError(f"{path}: no {key!r} entry (has {', '.join(map(str, obj)) or 'nothing'})")
            obj = obj[key]
        return _as_matrix(obj, path, "features")

    if len(paths) == 1:
        return part(paths[0])
    parts = [part(p) for p in paths]  # memory-mapped where the files allow (torch.load(mmap=True), .npy)
    dims, dtypes = {p.shape[1] for p in parts}, {p.dtype for p in parts}
    if len(dims) > 1 or len(dtypes) > 1:
        raise EmbeddingError(f"{spec}: feature files have different widths or dtypes ({sorted(dims)}, "
                             f"{sorted(map(str, dtypes))})")
    return ShardedArray([len(p) for p in parts], dims.pop(), lambda i: parts[i], dtype=dtypes.pop(), name=str(spec))


def is_saved_file(spec: str) -> bool:
    """Whether a reference name is a file (or glob/list of files) in a format ``load_features`` reads."""
    first = str(spec).split(",")[0].strip()
    return first.endswith((".npy", ".pt", ".pth", ".bin"))

