"""Pool shards and reference sets as rows for the embedding pipeline (tars read with ``datafilter.pool.tario``)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from datafilter.pool.pool import PoolError, Shard
from datafilter.pool.tario import TarError, image_of, tar_samples


def _samples(tar: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    try:
        yield from tar_samples(tar)
    except TarError as exc:
        raise PoolError(str(exc)) from None


def pool_shard_rows(shard: Shard) -> Iterator[tuple[int, bytes, str]]:
    """(parquet row, image bytes, caption) for each sample of a pool shard.

    Samples are matched to parquet rows by key; a tar and parquet that disagree (samples missing, extra or
    duplicated) raise ``PoolError`` naming the tar once the whole tar has been read.
    """
    try:
        names = pq.read_schema(shard.parquet).names
        if "key" not in names:
            raise PoolError(f"{shard.parquet}: no 'key' column, so its rows cannot be matched to the tar's samples")
        table = pq.read_table(shard.parquet, columns=["key"] + (["text"] if "text" in names else []))
    except (OSError, ValueError) as exc:  # pyarrow's errors for unreadable files are ValueError/OSError subclasses
        raise PoolError(f"{shard.parquet}: unreadable parquet ({exc})") from None
    keys = table.column("key").to_pylist()
    captions = table.column("text").to_pylist() if "text" in names else [None] * len(keys)
    row_of = {k: i for i, k in enumerate(keys)}
    if len(row_of) != len(keys):
        raise PoolError(f"{shard.parquet}: duplicate keys")
    seen = bytearray(len(keys))
    emitted = extra = 0
    for key, files in _samples(shard.tar):
        row = row_of.get(key)
        if row is None:
            extra += 1
            continue
        if seen[row]:
            raise PoolError(f"{shard.tar}: sample {key} occurs twice")
        image = image_of(files)
        if image is None:
            raise PoolError(f"{shard.tar}: sample {key} has no image")
        seen[row] = 1
        emitted += 1
        # the parquet's caption is the pool's (stripped of white space and a byte-order mark at ingest), the one
        # filters read and training uses; an indexed shard's own .txt keeps its producer's bytes
        text = captions[row]
        if text is None:
            text = files["txt"].decode("utf-8", "replace") if "txt" in files else ""
        yield row, image, text
    if emitted != len(keys) or extra:
        detail = f" ({extra} of them not in the parquet)" if extra else ""
        raise PoolError(f"{shard.tar}: {emitted + extra} samples in the tar{detail} but {len(keys)} rows in "
                        f"{shard.parquet.name}")


def reference_rows(tar: Path) -> Iterator[tuple[int, bytes, int]]:
    """(position, image bytes, class index) for each sample of a reference-set tar (``KEY.png|jpg|webp`` + ``.cls``)."""
    for i, (key, files) in enumerate(_samples(tar)):
        image = image_of(files)
        if image is None or "cls" not in files:
            raise PoolError(f"{tar}: sample {key} lacks an image or a .cls label (has {', '.join(sorted(files))})")
        try:
            label = int(files["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise PoolError(f"{tar}: sample {key} has a non-integer label {files['cls'][:20]!r}") from None
        yield i, image, label
