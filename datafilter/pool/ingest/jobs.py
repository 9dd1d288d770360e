"""Shard jobs: each turns one planned shard into pool files through ``ShardWriter``, skipping bad samples by reason.

Jobs run in worker processes, so they take one picklable payload and return the shard's stats. Nothing a single
sample does (a broken image, a bad caption, an unsafe tar member) can make a job fail; only the output directory
being unwritable can.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

from datafilter.common.executor import ShardJob
from datafilter.pool.format import (IMAGE_EXTS, CaptionConfig, ShardWriter, check_caption, printable_name,
                                    shard_paths)
from datafilter.pool.images import ImageConfig, SkipSample
from datafilter.pool.ingest.readers import read_caption_file
from datafilter.pool.uid import make_uid

# Columns of an img2dataset parquet that describe the download, not the sample; dropped from kept rows.
_DOWNLOAD_COLUMNS = ("status", "error_message", "caption")
_HEX32 = re.compile(r"[0-9a-f]{32}")


def _remove_stale_temporaries(out_dir: Path, name: str) -> None:
    """Temporary files a killed run left for this shard (atomic writes are named ``.NAME.ext.tmp-HOST-PID``)."""
    for tmp in out_dir.glob(f".{name}[._]*.tmp*"):
        tmp.unlink(missing_ok=True)


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SkipSample("missing_image", str(path)) from None
    except OSError as exc:
        raise SkipSample("unreadable_file", str(exc)) from None
    if not path.is_file():
        raise SkipSample("missing_image", f"{path} is not a regular file")
    if st.st_size > max_bytes:
        raise SkipSample("file_too_large", f"{st.st_size} bytes")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SkipSample("unreadable_file", str(exc)) from None


# --- folders and tables of local files --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FilesShard:
    """One shard of a folder or table source: the items planned for it and how to store them."""

    kind: str  # "folder" | "table": part of every uid, so the two never collide
    root: Path  # paths in items are relative to this
    out_dir: Path
    index: int
    items: list[dict[str, Any]]
    image: ImageConfig
    caption: CaptionConfig
    max_file_bytes: int


def ingest_files_shard(job: ShardJob) -> dict[str, Any]:
    s: FilesShard = job.payload
    _remove_stale_temporaries(s.out_dir, job.shard_id)
    w = ShardWriter(s.out_dir, s.index, s.image, s.caption)
    for item in s.items:
        if item["skip"]:
            w.skip(item["skip"], item["path"] or (f"table row {item['row']}" if "row" in item else None))
            continue
        try:
            image = _read_file(s.root / item["path"], s.max_file_bytes)
            if s.kind == "folder":
                caption = None
                if item["caption"] is not None:
                    raw = _read_file(s.root / item["caption"], s.max_file_bytes)
                    caption = read_caption_file(raw, item["caption"].rpartition(".")[2].lower())
            else:
                caption = item["caption"]
            text = check_caption(caption, s.caption)
        except SkipSample as exc:
            w.skip(exc.reason, item["path"], exc.detail)
            continue
        fields = item.get("fields") or {}
        uid = fields.get("uid")  # a table that already has uids (DataComp's metadata) keeps them
        if not (isinstance(uid, str) and _HEX32.fullmatch(uid.lower())):
            # the name's own bytes are hashed, so a name that is not UTF-8 still gets a stable uid
            uid = make_uid(s.kind, item["path"], text, hashlib.sha256(image).digest())
        w.add(image, text, uid.lower(), {"source_path": printable_name(item["path"]), **fields})
    return w.close()


# --- existing tar shards (DataComp, img2dataset, or a pool) -----------------------------------------------------------
@dataclass(frozen=True)
class TarShard:
    """One existing tar to index: validate each sample, keep its bytes, add uids and write our parquet and stats."""

    source_tar: Path
    source_parquet: Path | None  # the producer's own parquet (img2dataset: also rows of failed downloads)
    out_dir: Path
    name: str
    image: ImageConfig
    caption: CaptionConfig
    max_file_bytes: int
    duplicate_rows: frozenset[int] = frozenset()  # URL ingest: table rows that repeat an earlier (url, caption)


def backup_tar(tar: Path) -> Path:
    """Where an in-place rewrite keeps the original tar until the new shard is complete."""
    return tar.with_name(f"{tar.stem}.source.tar")


def _safe_member(name: str) -> bool:
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return False
    return ".." not in re.split(r"[/\\]", name)


def _split_member(name: str) -> tuple[str, str, str]:
    """(group, key, ext): the group is the path without extensions (WebDataset's grouping), the key its base name."""
    directory, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{directory}/{key}" if directory else key), key, ext.lower()


def read_tar_groups(path: Path, max_bytes: int) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """Yield ``(key, {ext: bytes}, skip_reason)`` per sample, never extracting anything to disk.

    Members with absolute or ``..`` names, links and devices mark their sample unsafe; a tar that ends early marks the
    sample it was reading as truncated and ends the shard there.
    """
    group = key = None
    files: dict[str, bytes] = {}
    bad: str | None = None
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                if m.isdir():
                    continue
                g, k, ext = _split_member(m.name)
                if g != group and group is not None:
                    yield key, files, bad
                    files, bad = {}, None
                group, key = g, k
                if not _safe_member(m.name):
                    bad = "unsafe_member_name"
                elif not m.isfile():
                    bad = bad or "unsupported_member_type"
                elif m.size > max_bytes:
                    bad = bad or "file_too_large"
                else:
                    f = tf.extractfile(m)
                    files[ext] = f.read() if f else b""
                    if len(files[ext]) != m.size:
                        raise EOFError("member shorter than its header says")
    except (tarfile.TarError, EOFError, OSError) as exc:
        if group is None and not files:
            # nothing could be read at all: one unreadable input
            yield "", {}, "unreadable_tar" if not isinstance(exc, EOFError) else "truncated_tar"
            return
        yield key, files, "truncated_tar"
        return
    if group is not None:
        yield key, files, bad


def download_reason(status: str | None, error: str | None) -> str:
    """Map img2dataset's status and error message to a snake_case skip reason."""
    if status == "failed_to_resize":
        return "undecodable_image"
    msg = (error or "").lower()
    m = re.search(r"http error (\d{3})", msg)
    if m:
        return f"download_http_{m.group(1)}"
    if "timed out" in msg or "timeout" in msg:
        return "download_timeout"
    if "connection refused" in msg:
        return "download_connection_refused"
    if "name or service not known" in msg or "nodename nor servname" in msg or "getaddrinfo" in msg:
        return "download_dns_error"
    if "unknown url type" in msg or "no host given" in msg:
        return "invalid_url"
    if "x-robots-tag" in msg:
        return "download_disallowed"
    if "hash mismatch" in msg:
        return "download_hash_mismatch"
    return "download_error"


def _parse_json(data: bytes | None) -> dict[str, Any]:
    if not data:
        return {}
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _clean_fields(fields: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in fields.items() if k not in _DOWNLOAD_COLUMNS and k != "uid"}
    if "datafilter_row" in out:
        out["source_row"] = out.pop("datafilter_row")
    return out


def _sample_uid(fields: dict[str, Any], text: str, image: bytes, tar_name: str, key: str) -> str:
    """Keep a producer's uid (DataComp); else hash url or tar-relative name, caption and the image's sha256."""
    uid = fields.get("uid")
    if isinstance(uid, str) and _HEX32.fullmatch(uid.lower()):
        return uid.lower()
    sha = fields.get("sha256") if isinstance(fields.get("sha256"), str) else hashlib.sha256(image).hexdigest()
    if isinstance(fields.get("url"), str) and fields["url"]:
        return make_uid("url", fields["url"], text, sha)
    return make_uid("tar", f"{tar_name}/{key}", text, sha)


def _index_into(w: ShardWriter, s: TarShard, src: Path, rows: dict[str, dict[str, Any]]) -> int:
    """Validate ``src``'s samples into ``w``; return how many of the tar's samples were dropped or renamed (either
    way the tar must be rewritten).

    A member whose key is not valid UTF-8 is kept under its printable name (``caf\\xe9``): pool parquets and the
    WebDataset readers of every later stage need text keys. Its uid hashes the key's own bytes and the original tar
    name (not the ``.source.tar`` a resumed in-place rewrite reads), so a resumed index gives the same uids.
    """
    seen_keys: set[str] = set()
    changed = 0
    for raw_key, files, bad in read_tar_groups(src, s.max_file_bytes):
        key = printable_name(raw_key)
        reason, detail = bad, ""
        fields = {**rows.get(key, {}), **_parse_json(files.get("json"))}
        ext = next((e for e in IMAGE_EXTS if e in files), None)
        if reason is None and key in seen_keys:
            reason = "duplicate_key"
        if reason is None and ext is None:
            reason = "missing_image"
        if reason is None and fields.get("datafilter_row") in s.duplicate_rows:
            reason = "duplicate_row"
        seen_keys.add(key)
        if reason is None:
            caption = files["txt"] if "txt" in files else fields.get("text", fields.get("caption"))
            try:
                text = check_caption(caption, s.caption)
            except SkipSample as exc:
                reason, detail = exc.reason, exc.detail
        if reason is not None:
            w.skip(reason, raw_key or src.name, detail)
            changed += 1
            continue
        uid = _sample_uid(fields, text, files[ext], s.source_tar.name, raw_key)
        if w.add(files[ext], text, uid, _clean_fields(fields), ext=ext, key=key, origin=raw_key) is None or \
                key != raw_key:
            changed += 1
    # rows of the producer's parquet with no sample in the tar: failed downloads, or samples the tar lost
    for key, row in rows.items():
        if key in seen_keys:
            continue
        status = row.get("status")
        origin = row.get("url") or key
        if status in (None, "success"):
            w.skip("missing_in_tar", origin)
        elif "url" in row and not row["url"]:
            w.skip("missing_url", key)
        else:
            w.skip(download_reason(status, row.get("error_message")), origin, row.get("error_message") or "")
    return changed


def index_tar_shard(job: ShardJob) -> dict[str, Any]:
    """Index one tar. Most tars keep every sample and are indexed in one pass that buffers nothing; a tar with samples
    to drop gets a second pass that writes a new tar (in place, the original waits as ``NAME.source.tar``).
    """
    s: TarShard = job.payload
    _remove_stale_temporaries(s.out_dir, s.name)
    out_tar = shard_paths(s.out_dir, s.name)[0]
    in_place = s.source_tar.resolve() == out_tar.resolve()
    backup = backup_tar(s.source_tar)
    src = backup if in_place and backup.exists() else s.source_tar  # a killed rewrite left the original here
    rows: dict[str, dict[str, Any]] = {}
    if s.source_parquet is not None:
        for r in pq.read_table(s.source_parquet).to_pylist():
            rows.setdefault(str(r.get("key")), r)
    w = ShardWriter(s.out_dir, 0, s.image, s.caption, reprocess=False, name=s.name, keep_tar=src)
    changed = _index_into(w, s, src, rows)
    if changed:
        if in_place and not backup.exists():
            try:
                os.link(s.source_tar, backup)
            except OSError:
                shutil.copy2(s.source_tar, backup)
        w = ShardWriter(s.out_dir, 0, s.image, s.caption, reprocess=False, name=s.name)
        _index_into(w, s, src, rows)
    return w.close({"source_tar": s.source_tar.name, "rewritten": bool(changed)})
