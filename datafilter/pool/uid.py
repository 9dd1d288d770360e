"""128-bit sample ids: 32 hex characters on disk, numpy ``dtype("u8,u8")`` (high, low) in memory.

This is DataComp's convention: subset files are sorted arrays of this dtype, and a sorted array can be searched with
``np.searchsorted`` because numpy orders structured scalars field by field (high first, then low).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

UID_DTYPE = np.dtype("u8,u8")


def make_uid(*parts: str | bytes) -> str:
    """A stable uid for a sample from the parts that identify it (same parts, same uid, on any machine).

    Parts are length-prefixed before hashing so that ("ab", "c") and ("a", "bc") differ. Text is hashed as UTF-8; a
    file name that is not valid UTF-8 (which Python hands over with surrogate escapes) is hashed as its own bytes.
    """
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        b = part.encode("utf-8", "surrogateescape") if isinstance(part, str) else bytes(part)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


_NOT_HEX = str.maketrans("", "", "0123456789abcdefABCDEF")


def hex_to_uids(hexes: Iterable[str]) -> np.ndarray:
    """Convert 32-hex-character uids to a ``u8,u8`` array (same order); anything else is a ``ValueError``."""
    hexes = list(hexes)
    out = np.empty(len(hexes), dtype=UID_DTYPE)
    if not hexes:
        return out
    bad = next((h for h in hexes if not isinstance(h, str) or len(h) != 32), None)
    joined = "".join(hexes) if bad is None else ""
    if bad is None and joined.translate(_NOT_HEX):
        bad = next(h for h in hexes if h.translate(_NOT_HEX))
    if bad is not None:
        raise ValueError(f"uids must be 32 hex characters, got {bad!r}")
    words = np.frombuffer(bytes.fromhex(joined), dtype=">u8").reshape(-1, 2)
    out["f0"], out["f1"] = words[:, 0], words[:, 1]
    return out


def uids_from_arrow(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Parse 32-hex-character uid strings to ``u8,u8`` without a Python loop per uid.

    Parsing a million uids one by one takes over a second; when a chunk's strings are all 32 characters, its
    string buffer is one run of hex digits that ``bytes.fromhex`` turns into big-endian 64-bit words in
    milliseconds. Anything else goes through the per-string parser, which raises a clear error.
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        if chunk.type != pa.large_string():
            chunk = chunk.cast(pa.large_string())
        n = len(chunk)
        if n == 0:
            continue
        offsets = np.frombuffer(chunk.buffers()[1], np.int64, n + 1, chunk.offset * 8)
        if chunk.null_count or offsets[-1] - offsets[0] != 32 * n or not np.all(np.diff(offsets) == 32):
            parts.append(hex_to_uids(chunk.to_pylist()))
            continue
        text = memoryview(chunk.buffers()[2])[int(offsets[0]):int(offsets[-1])]
        try:
            raw = bytes.fromhex(bytes(text).decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raw = b""
        if len(raw) != 16 * n:  # not hex, or white space that fromhex skips: the strict parser names the culprit
            parts.append(hex_to_uids(chunk.to_pylist()))
            continue
        words = np.frombuffer(raw, ">u8").reshape(n, 2)
        out = np.empty(n, UID_DTYPE)
        out["f0"] = words[:, 0]
        out["f1"] = words[:, 1]
        parts.append(out)
    return np.concatenate(parts) if parts else np.empty(0, UID_DTYPE)


def uids_to_hex(uids: np.ndarray) -> list[str]:
    return [f"{int(hi):016x}{int(lo):016x}" for hi, lo in zip(uids["f0"], uids["f1"])]


def is_sorted(uids: np.ndarray) -> bool:
    if len(uids) < 2:
        return True
    hi, lo = uids["f0"], uids["f1"]
    return bool(np.all((hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] >= lo[:-1]))))


def sort_uids(uids: np.ndarray) -> np.ndarray:
    order = np.lexsort((uids["f1"], uids["f0"]))
    return uids[order]


def count_in_sorted(uids: np.ndarray, queries: np.ndarray, high: np.ndarray | None = None) -> np.ndarray:
    """How many times (int64) the sorted uid array ``uids`` (repeats adjacent) holds each of ``queries``.

    Binary search on the 64-bit first words is several times faster than on numpy's structured pairs; the second
    words then settle the (rare) runs that share a first word, and a uid's repeats. ``high``: ``uids["f0"]`` as a
    contiguous array, for a caller that searches the same array many times.
    """
    high = np.ascontiguousarray(uids["f0"]) if high is None else high
    order = np.argsort(queries["f0"], kind="stable")  # sorted keys search faster (each starts where the last ended)
    q_hi, q_lo = queries["f0"][order], queries["f1"][order]
    lo, hi = np.searchsorted(high, q_hi, "left"), np.searchsorted(high, q_hi, "right")
    counts = np.zeros(len(queries), np.int64)
    one = np.flatnonzero(hi - lo == 1)
    counts[one] = uids["f1"][lo[one]] == q_lo[one]
    for i in np.flatnonzero(hi - lo > 1):
        counts[i] = int(np.count_nonzero(uids["f1"][lo[i] : hi[i]] == q_lo[i]))
    out = np.empty_like(counts)
    out[order] = counts
    return out


def check_uid_array(uids: np.ndarray, where: object) -> np.ndarray:
    """``uids`` if it is a subset's array: 1-d, ``u8,u8``, sorted (repeats adjacent), checked a few million rows at a
    time so a memory-mapped file is never read whole; else a ``ValueError`` naming ``where``."""
    if uids.dtype != UID_DTYPE or uids.ndim != 1:
        raise ValueError(f"{where}: a subset is a 1-d array of {UID_DTYPE}, got {uids.dtype} {uids.shape}")
    chunk = 1 << 22
    for lo in range(0, max(0, len(uids) - 1), chunk):
        if not is_sorted(uids[lo : lo + chunk + 1]):
            raise ValueError(f"{where}: subset uids are not sorted (readers binary-search them, as DataComp's "
                             "resharder does)")
    return uids


def open_uid_file(path: str | Path, raw: bool = False) -> np.ndarray:
    """A subset file memory-mapped and checked (``check_uid_array``): an ``.npy`` of ``u8,u8`` or, with ``raw``, also
    a bare memmap of them as DataComp's resharder accepts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subset file not found: {path}")
    with open(path, "rb") as f:
        is_npy = f.read(6) == b"\x93NUMPY"
    try:
        if is_npy or not raw:
            uids = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            uids = np.memmap(path, UID_DTYPE, mode="r")
    except ValueError as exc:
        raise ValueError(f"{path}: not a subset file ({exc})") from None
    return check_uid_array(uids, path)
