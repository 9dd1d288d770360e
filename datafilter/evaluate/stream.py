"""Streaming a task through the model: samples are read and decoded in worker processes and arrive in batches, so
a task is never held in memory whole (ImageNet's 50,000 validation images are about 6 GB of JPEGs).

Each batch is a dict: ``order`` (sorting batches by it restores the task's sample order, whatever the number of
workers), ``images`` (the decoded images of its records, in order; ``uint8`` NHWC when the model's transform could
be split, see ``datafilter.embed.decode``), ``counts`` (images per record), ``extras`` (the task kind's fields of each
record), ``keys``, and ``error`` (a problem with the task's data: the task cannot be scored). Memory is bounded by
the batches in flight: ``workers x prefetch`` plus the one being scored. A task evaluated before can come from its
decoded copy instead (``datafilter.evaluate.decoded``), read in this process.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datafilter.embed.decode import ImageDecoder
from datafilter.evaluate.decoded import DecodedCache
from datafilter.pool.images import SkipSample


class TaskStream(IterableDataset):
    """A task's records in batches of ``block`` records, split over DataLoader workers by part."""

    def __init__(self, task, kind, decoder: ImageDecoder, block: int, parts: list[Any]):
        self.task = task
        self.kind = kind
        self.decoder = decoder
        self.block = block
        self.parts = parts

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        source = self.task.source()
        for index in range(wid, len(self.parts), nw):
            yield from self._part(source, self.parts[index])

    def _part(self, source, part) -> Iterator[dict[str, Any]]:
        current, items = None, []
        try:
            for i, record in source.read(part, self.block):
                if current is not None and i // self.block != current:
                    yield self._batch(part, items)
                    items = []
                current = i // self.block
                items.append((i, record))
            if items:
                yield self._batch(part, items)
        except Exception as exc:  # noqa: BLE001 - reported as the task's error; the other tasks go on
            yield {"order": (part[0], -1), "error": str(exc) if isinstance(exc, ValueError) else
                   f"{type(exc).__name__}: {exc}"}

    def _batch(self, part, items: list) -> dict[str, Any]:
        images, counts, extras, keys = [], [], [], []
        for _, record in items:
            for data in record.images:
                try:
                    images.append(self.decoder(data))
                except SkipSample as exc:
                    raise ValueError(f"sample {record.key}: image cannot be decoded ({exc})") from None
            counts.append(len(record.images))
            extras.append(self.kind.parse(record, self.task))
            keys.append(record.key)
        return {"order": (part[0], items[0][0]), "images": self.decoder.stack(images), "counts": counts,
                "extras": extras, "keys": keys, "error": ""}


def _worker_init(_: int) -> None:
    # Decoders are single-threaded; intra-op threads here would only compete with the model for cores.
    torch.set_num_threads(1)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    # DataLoader's default would turn tuples into lists and numpy arrays into tensors
    return batch


def task_batches(task, kind, decoder: ImageDecoder, batch_size: int, workers: int, pin: bool = False,
                 prefetch: int = 2, cache: DecodedCache | None = None) -> Iterable[dict[str, Any]]:
    """The task's batches: from its decoded copy in ``cache`` if it has one, else from ``workers`` decoding processes
    (or read in this process with ``workers=0``), written to ``cache`` on the way."""
    block = kind.block(batch_size)
    key = cache.key(task, decoder) if cache is not None else None
    cached = cache.batches(task, key, block) if key is not None else None
    if cached is not None:
        return cached
    parts = task.source().parts(max(1, workers))
    stream = TaskStream(task, kind, decoder, block, parts)
    workers = min(workers, len(parts))
    batches = iter(stream) if workers == 0 else DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=pin, worker_init_fn=_worker_init,
        prefetch_factor=prefetch, collate_fn=_as_is)
    return cache.recorded(task, key, decoder, block, batches) if key is not None else batches
