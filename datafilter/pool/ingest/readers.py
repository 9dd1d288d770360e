"""Readers: turn a source into a deterministic, ordered list of input items, one per would-be sample.

An item is a small dict the shard jobs understand. Problems visible from the listing alone (a symlink leading out of
the folder, a second image with the same name, a duplicate table row) become items with a ``skip`` reason, so that
they are counted in the stats of the shard they fall in and every shard reconciles: input = written + skipped.
Readers touch names, sizes and table cells only; image bytes are read by the shard jobs, in parallel.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from datafilter.pool.ingest.config import IngestConfig, IngestError

log = logging.getLogger(__name__)

# Files a folder source treats as images (decoding decides whether they really are).
FOLDER_IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})
# Sidecar caption files, in order of preference: plain text, then a JSON object with a "caption" or "text" field.
CAPTION_EXTS = ("txt", "caption", "json")


def _split_ext(name: str) -> tuple[str, str]:
    stem, dot, ext = name.rpartition(".")
    return (stem, ext.lower()) if dot and stem else (name, "")


def _inside(path: str, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real + os.sep)


def _leaves(dirpath: str, name: str, root_real: str) -> bool:
    """Whether a file is a symlink that resolves outside the source (directories on the way are never links)."""
    full = os.path.join(dirpath, name)
    return os.path.islink(full) and not _inside(full, root_real)


def read_folder(root: Path) -> list[dict[str, Any]]:
    """Images under ``root`` (recursively, sorted by relative path) with their sidecar captions.

    Directory symlinks are not followed (their targets are either inside the folder, and listed once under their
    real path, or outside it, and counted as skipped); file symlinks are kept only when they resolve inside.
    """
    root_real = os.path.realpath(root)
    items: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        dirnames.sort()
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if os.path.islink(full) and not _inside(full, root_real):
                items.append({"path": rel_dir + d, "caption": None, "skip": "symlink_outside_source"})
        captions: dict[str, dict[str, str]] = {}
        images: dict[str, list[str]] = {}
        for name in sorted(filenames):
            stem, ext = _split_ext(name)
            if ext in FOLDER_IMAGE_EXTS:
                images.setdefault(stem, []).append(name)
            elif ext in CAPTION_EXTS:
                captions.setdefault(stem, {})[ext] = name
        for stem in sorted(images):
            sidecars = captions.get(stem, {})
            caption = next((sidecars[e] for e in CAPTION_EXTS if e in sidecars), None)
            for i, name in enumerate(images[stem]):
                item = {"path": rel_dir + name, "caption": None if caption is None else rel_dir + caption,
                        "skip": None}
                if i > 0:
                    item["skip"] = "duplicate_name"
                elif _leaves(dirpath, name, root_real) or (
                        caption is not None and _leaves(dirpath, caption, root_real)):
                    item["skip"] = "symlink_outside_source"
                items.append(item)
    items.sort(key=lambda it: it["path"])
    if not items:
        raise IngestError(f"{root}: no images found (looked for {', '.join(sorted(FOLDER_IMAGE_EXTS))})")
    return items


def table_format(path: Path, override: str | None) -> str:
    if override:
        return override
    name = path.name.lower()
    for suffix, fmt in ((".csv", "csv"), (".tsv", "tsv"), (".parquet", "parquet"), (".jsonl", "jsonl"),
                        (".json", "jsonl"), (".ndjson", "jsonl")):
        if name.endswith(suffix) or name.endswith(suffix + ".gz"):
            return fmt
    raise IngestError(f"{path}: cannot tell the table format from the extension; pass --format csv|tsv|parquet|jsonl")


def read_table_file(path: Path, fmt: str | None, text_col: str | None = None,
                    string_cols: tuple[str, ...] = (), path_col: str | None = None) -> pa.Table:
    """Load a CSV/TSV/Parquet/JSONL table whole (captions and paths are small next to the images they name).

    A CSV's ``text_col`` and ``path_col`` are read as bytes, so that one caption or file name that is not UTF-8 is
    handled per row (the caption skipped as ``non_utf8_caption``, the file found by its own bytes) instead of making
    the whole table unreadable; ``string_cols`` (urls, uids) stay text even when they look like numbers ("0001.jpg" is
    fine, but "0001" would otherwise become 1; paths are never numbers either).
    """
    fmt = table_format(path, fmt)
    if not path.is_file():
        raise IngestError(f"table not found: {path}")
    try:
        if fmt in ("csv", "tsv"):
            import pyarrow.csv as pcsv

            types = {c: pa.string() for c in (*string_cols, "uid")}
            for col in (text_col, path_col):
                if col:
                    types[col] = pa.binary()
            return pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
                                 convert_options=pcsv.ConvertOptions(strings_can_be_null=True, column_types=types))
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        import pyarrow.json as pjson

        return pjson.read_json(path)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        raise IngestError(f"{path}: unreadable as {fmt}: {exc}") from None


def require_columns(table: pa.Table, path: Path, wanted: dict[str, str]) -> None:
    """Fail at once, naming the file, the missing column, the option that chooses it, and what columns exist."""
    for option, col in wanted.items():
        if col not in table.column_names:
            raise IngestError(f"{path}: no column {col!r} (choose another with {option}); "
                              f"columns: {', '.join(table.column_names)}")


def _source_fields(table: pa.Table, exclude: set[str]) -> list[dict[str, Any]]:
    extra = [c for c in table.column_names if c not in exclude]
    if not extra:
        return [{} for _ in range(table.num_rows)]
    return table.select(extra).to_pylist()


def read_image_table(path: Path, cfg: IngestConfig) -> list[dict[str, Any]]:
    """Rows of a table naming local images (relative to the table's folder) and their captions."""
    table = read_table_file(path, cfg.table_format, cfg.caption_col, path_col=cfg.image_col)
    require_columns(table, path, {"--image-col": cfg.image_col, "--caption-col": cfg.caption_col})
    # bytes from a CSV: decoded as the file system decodes names, so a name that is not UTF-8 still opens its file
    paths = [os.fsdecode(p) if isinstance(p, bytes) else p for p in table.column(cfg.image_col).to_pylist()]
    captions = table.column(cfg.caption_col).to_pylist()
    fields = _source_fields(table, {cfg.image_col, cfg.caption_col})
    seen: set[tuple[str, Any]] = set()
    items = []
    for row, (p, c, f) in enumerate(zip(paths, captions, fields)):
        item = {"path": None if p is None else str(p), "caption": c, "row": row, "fields": f, "skip": None}
        if not item["path"] or not item["path"].strip():
            item["skip"] = "missing_image_path"
        elif (item["path"], c) in seen:
            item["skip"] = "duplicate_row"
        else:
            seen.add((item["path"], c))
        items.append(item)
    if not items:
        raise IngestError(f"{path}: the table has no rows")
    return items


def read_url_table(path: Path, cfg: IngestConfig) -> tuple[pa.Table, set[int]]:
    """A table of URLs and captions, and the rows that repeat an earlier (url, caption) pair (skipped later)."""
    table = read_table_file(path, cfg.table_format, string_cols=(cfg.url_col,))
    require_columns(table, path, {"--url-col": cfg.url_col, "--caption-col": cfg.caption_col})
    if table.num_rows == 0:
        raise IngestError(f"{path}: the table has no rows")
    seen: set[tuple[Any, Any]] = set()
    duplicates = set()
    for row, pair in enumerate(zip(table.column(cfg.url_col).to_pylist(), table.column(cfg.caption_col).to_pylist())):
        if pair in seen:
            duplicates.add(row)
        seen.add(pair)
    return table, duplicates


def read_caption_file(data: bytes, ext: str) -> str | bytes | None:
    """A sidecar's caption: the text itself, or the "caption"/"text" field of a JSON sidecar.

    Undecodable text is returned as bytes so that the caption check counts it as ``non_utf8_caption``.
    """
    if ext != "json":
        return data
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return data
    except json.JSONDecodeError:
        return None
    if isinstance(obj, dict):
        value = obj.get("caption", obj.get("text"))
        return value if isinstance(value, str) else None
    return None
