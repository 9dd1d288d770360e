"""What an ingest job is: the source, its kind, and every option that changes the output.

The fingerprint of this config (minus ``workers``, which never changes the output) is stored in the output directory,
so a rerun can tell "the same job, resume it" from "a different job, refuse to mix".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datafilter.pool.format import CaptionConfig
from datafilter.pool.images import ImageConfig

KINDS = ("folder", "table", "shards", "urls")
TABLE_FORMATS = ("csv", "tsv", "parquet", "jsonl")


class IngestError(ValueError):
    """A structurally unusable source or output (missing column, unreadable table, a different job in the output)."""


@dataclass(frozen=True)
class IngestConfig:
    """Options of one ingest. Defaults follow DataComp: 10,000 samples a shard, 512 px on the longer side, JPEG 95."""

    kind: str
    shard_size: int = 10_000
    workers: int = 1
    image: ImageConfig = field(default_factory=lambda: ImageConfig(resample="area"))
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    # tables (local paths or URLs)
    table_format: str | None = None  # default: from the file extension
    image_col: str = "image"
    caption_col: str = "caption"
    url_col: str = "url"
    # downloads (URL tables only)
    timeout: float = 10.0
    threads: int = 32
    # files larger than this are skipped unread: no caption-image pair is worth a gigabyte of memory
    max_file_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"source kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.shard_size < 1:
            raise ValueError("shard_size must be positive")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.table_format is not None and self.table_format not in TABLE_FORMATS:
            raise ValueError(f"table format must be one of {', '.join(TABLE_FORMATS)}, not {self.table_format!r}")

    def fingerprint_fields(self) -> dict[str, Any]:
        """Everything that decides the output; worker and thread counts only decide the speed."""
        d = dataclasses.asdict(self)
        for name in ("workers", "threads"):
            d.pop(name)
        return d


def detect_kind(source: Path, url_col_given: bool) -> str:
    """Guess the source kind: a folder of ``*.tar`` shards, a folder of images, or a table (of URLs with --url-col)."""
    if source.is_dir():
        return "shards" if any(source.glob("*.tar")) else "folder"
    if source.is_file():
        return "urls" if url_col_given else "table"
    raise IngestError(f"source not found: {source}")
