"""The on-disk Pool format (DataComp / img2dataset layout) and the one writer that produces it.

A pool directory holds, per shard ``NNNNNNNN``:
  - ``NNNNNNNN.tar``: WebDataset samples ``KEY.{jpg,png,webp}``, ``KEY.txt`` (caption), ``KEY.json`` (per-sample fields)
  - ``NNNNNNNN.parquet``: one row per sample, in tar order: ``uid``, ``key``, ``text``, sizes, ``sha256``, source fields
  - ``NNNNNNNN_skipped.jsonl``: one line per input that was skipped (its position among the shard's inputs, what it
    was, the reason and detail); only when something was skipped, written just before the stats.
  - ``NNNNNNNN_stats.json``: counts for the shard, written last; its presence marks the shard complete.
Everything any later stage needs is in these files; the writer here is the only code that writes them.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from datafilter.common.files import atomic_path, write_json
from datafilter.pool.images import ImageConfig, SkipSample, process_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
STATS_SUFFIX = "_stats.json"
SKIPPED_SUFFIX = "_skipped.jsonl"
# What a synthetic pool's builder knows and no filter may read (which samples are noise, of what kind): beside the
# shards, read only by the filter report.
GROUND_TRUTH = "ground_truth.parquet"
FORMAT_VERSION = 1

# Columns every pool parquet has, in this order; source-specific columns follow.
CORE_COLUMNS = ("uid", "key", "text", "original_width", "original_height", "width", "height", "sha256")


def shard_name(index: int) -> str:
    return f"{index:08d}"


def shard_paths(pool_dir: Path, name: str) -> tuple[Path, Path, Path]:
    """(tar, parquet, stats) paths of shard ``name``."""
    return pool_dir / f"{name}.tar", pool_dir / f"{name}.parquet", pool_dir / f"{name}{STATS_SUFFIX}"


def skipped_path(pool_dir: Path, name: str) -> Path:
    """The list of shard ``name``'s skipped inputs (absent when nothing was skipped)."""
    return pool_dir / f"{name}{SKIPPED_SUFFIX}"


def printable_name(name: str) -> str:
    """A file or member name as valid UTF-8 text: bytes that are not UTF-8 (which Python's file system functions hand
    over as surrogate escapes) are written ``\\xNN``. ``caf\\xe9.jpg`` names a Latin-1 ``café.jpg`` in parquet, JSON
    and logs, which all need valid UTF-8; valid names are unchanged."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class CaptionConfig:
    """What counts as a usable caption. Absurdly long captions are almost always scraped page text."""

    max_chars: int = 10_000
    min_chars: int = 1


def check_caption(text: str | bytes | None, cfg: CaptionConfig = CaptionConfig()) -> str:
    """Return the caption stripped of surrounding white space and of a byte-order mark (Windows editors start UTF-8
    files with one), or raise ``SkipSample`` with the reason."""
    if text is None:
        raise SkipSample("missing_caption")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise SkipSample("non_utf8_caption") from None
    if not isinstance(text, str):
        if text != text:  # NaN from a table
            raise SkipSample("missing_caption")
        text = str(text)
    text = text.strip().removeprefix("\ufeff").strip()
    if len(text) < cfg.min_chars:
        raise SkipSample("empty_caption")
    if len(text) > cfg.max_chars:
        raise SkipSample("caption_too_long", f"{len(text)} characters")
    if "\x00" in text:
        raise SkipSample("bad_caption", "contains NUL")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from a JSON "\\udce9" escape
        raise SkipSample("non_utf8_caption", "not encodable as UTF-8") from None
    return text


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so that the same samples always give byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uname = info.gname = ""
    return info


@dataclass
class ShardWriter:
    """Collects one shard's samples in order and writes tar, parquet, the skip list and stats (stats last, all
    atomically).

    ``add`` processes the image and caption and returns the uid, or counts the ``SkipSample`` reason and returns None.
    A uid the shard already holds is skipped as ``duplicate_uid``: subsets select by uid, so a second sample under
    the same uid could never be told apart from the first. Records are buffered because a shard is small
    (DataComp: 10k samples, a few hundred MB at most).
    """

    pool_dir: Path
    index: int
    image_cfg: ImageConfig = field(default_factory=ImageConfig)
    caption_cfg: CaptionConfig = field(default_factory=CaptionConfig)
    key_digits: int = 4
    reprocess: bool = True
    name: str | None = None  # default ``shard_name(index)``; indexing keeps an existing shard's own name
    # Indexing an existing tar whose samples are all kept, under their own keys: ``add`` records rows only and
    # ``close`` keeps that tar's bytes (copied here if it lives elsewhere), so nothing is buffered or rewritten.
    keep_tar: Path | None = None

    def __post_init__(self) -> None:
        self.pool_dir = Path(self.pool_dir)
        self.name = self.name or shard_name(self.index)
        self._tar = io.BytesIO()
        self._tf = tarfile.open(fileobj=self._tar, mode="w", format=tarfile.USTAR_FORMAT)
        self._rows: list[dict[str, Any]] = []
        self._uids: set[str] = set()
        self.skipped: dict[str, int] = {}
        self.skip_list: list[dict[str, Any]] = []
        self.seen = 0
        self._t0 = time.perf_counter()

    def skip(self, reason: str, origin: str | None = None, detail: str = "") -> None:
        """Count one input that is not kept. ``origin`` says which input it was (a path, a tar key, a URL)."""
        self.skip_list.append({"index": self.seen, "input": None if origin is None else printable_name(origin),
                               "reason": reason, "detail": printable_name(detail)})
        self.seen += 1
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add(self, image: bytes, caption: str | bytes | None, uid: str, source: dict[str, Any] | None = None,
            ext: str | None = None, key: str | None = None, origin: str | None = None) -> str | None:
        """Add one sample. ``uid`` is computed by the source (see ``uid.make_uid``) so it stays stable.

        With ``reprocess=False`` the image bytes are stored as they are (``ext`` required): used when indexing shards
        that were already resized by their producer, which also pass their own ``key`` so rows match their tar.
        ``origin`` names the input in the skip list (default: its ``source_path``, else its key).
        """
        origin = origin or (source or {}).get("source_path") or key
        if uid in self._uids:
            self.skip("duplicate_uid", origin, f"uid {uid} is already in this shard")
            return None
        try:
            text = check_caption(caption, self.caption_cfg)
            if self.reprocess:
                enc = process_image(image, self.image_cfg)
                data, ext, w, h, ow, oh = enc.data, enc.ext, enc.width, enc.height, enc.original_width, enc.original_height
            else:
                from datafilter.pool.images import open_image

                img = open_image(image, self.image_cfg.max_pixels)
                data, w, h = image, img.width, img.height
                ow = int((source or {}).get("original_width") or w)
                oh = int((source or {}).get("original_height") or h)
        except SkipSample as exc:
            self.skip(exc.reason, origin, exc.detail)
            return None
        self.seen += 1
        self._uids.add(uid)
        key = key or f"{self.name}{len(self._rows):0{self.key_digits}d}"
        source = dict(source or {})
        # An indexed shard keeps its producer's hash of the original download (DataComp joins and dedups on it).
        sha256 = (not self.reprocess and source.get("sha256")) or hashlib.sha256(image).hexdigest()
        for name in CORE_COLUMNS:
            source.pop(name, None)
        row = {
            "uid": uid,
            "key": key,
            "text": text,
            "original_width": ow,
            "original_height": oh,
            "width": w,
            "height": h,
            "sha256": sha256,
            **source,
        }
        if self.keep_tar is None:
            sample_json = json.dumps(row, ensure_ascii=False, sort_keys=False, default=str).encode()
            for suffix, payload in ((ext, data), ("txt", text.encode("utf-8")), ("json", sample_json)):
                self._tf.addfile(tar_member(f"{key}.{suffix}", len(payload)), io.BytesIO(payload))
        self._rows.append(row)
        return uid

    @property
    def written(self) -> int:
        return len(self._rows)

    def close(self, extra_stats: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write the shard's three files; the stats file goes last, so it marks completion."""
        self._tf.close()
        tar_path, parquet_path, stats_path = shard_paths(self.pool_dir, self.name)
        if self.keep_tar is None:
            with atomic_path(tar_path) as tmp:
                tmp.write_bytes(self._tar.getbuffer())  # no second copy of the shard
        elif Path(self.keep_tar).resolve() != tar_path.resolve():
            with atomic_path(tar_path) as tmp:
                shutil.copyfile(self.keep_tar, tmp)
        table = rows_to_table(self._rows)
        with atomic_path(parquet_path) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        skip_path = skipped_path(self.pool_dir, self.name)
        if self.skip_list:
            with atomic_path(skip_path) as tmp:
                tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.skip_list))
        else:
            skip_path.unlink(missing_ok=True)  # a list from an earlier, killed attempt at this shard
        stats = {
            "shard": self.name,
            "format_version": FORMAT_VERSION,
            "input": self.seen,
            "written": self.written,
            "skipped": dict(sorted(self.skipped.items())),
            "bytes": tar_path.stat().st_size,
            **(extra_stats or {}),
        }
        assert stats["input"] == stats["written"] + sum(self.skipped.values())
        write_json(stats_path, stats)
        return stats


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows to a table with the core columns first and stable types even when the shard is empty."""
    core_types = {"uid": pa.string(), "key": pa.string(), "text": pa.string(), "sha256": pa.string(),
                  "original_width": pa.int32(), "original_height": pa.int32(),
                  "width": pa.int32(), "height": pa.int32()}
    extra: list[str] = []
    for row in rows:
        for k in row:
            if k not in core_types and k not in extra:
                extra.append(k)
    cols = {name: pa.array([r.get(name) for r in rows], type=core_types[name]) for name in CORE_COLUMNS}
    for name in extra:
        values = [r.get(name) for r in rows]
        if any(isinstance(v, (dict, list)) for v in values):
            values = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values]
        cols[name] = pa.array(values)
    return pa.table(cols)
