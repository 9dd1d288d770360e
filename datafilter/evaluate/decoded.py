"""Decoded tasks kept on disk: a task evaluated again (each run of a benchmark, each checkpoint of a training) reads
its images as the ``uint8`` model-input arrays that the decoding workers made the first time, from one memory-mapped
file, instead of decoding them again.

Decoding is an evaluation's only work besides the model. On a two-core machine the decoding worker takes CPU time
that the model needs; a cached task runs in the main process alone, close to the bare model's speed
(``benchmarks/bench_eval.py``). What is stored is exactly what the workers hand the model (the image after the
transform's PIL steps, before ``ToTensor`` and ``Normalize``; see ``datafilter.embed.decode``), so a cached
evaluation gives the same numbers bit for bit. A transform that cannot be split that way is not cached.

An entry's key hashes the task's data files (path, size, modification time) and everything that decides the pixels
and the fields: the PIL steps, the input size, the RGB rule, the task's type, format, split and dataset. A changed
file or another model input size is another entry. An entry is written during the task's first complete evaluation
(batches are appended to a file as they arrive; nothing is held in memory) and published by renaming its folder when
the pass ends without error, so a killed or failed pass leaves no entry. A task whose decoded images would exceed
``max_bytes`` is not cached.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import socket
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from datafilter.common.files import stable_hash
from datafilter.embed.decode import ImageDecoder

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when what an entry holds, or how a task's records are decoded, changes


def _describe(step: Any) -> str:
    """A transform step as text that changes when its settings do (``repr`` alone omits some, such as open_clip's
    ``MaybeConvertMode``'s mode)."""
    fields = vars(step) if hasattr(step, "__dict__") else {}
    settings = {k: repr(v) for k, v in sorted(fields.items()) if not k.startswith("_")}
    return f"{type(step).__module__}.{type(step).__qualname__} {step!r} {settings}"


class DecodedCache:
    """Entries under ``root``, one folder per (task files, decoding) key."""

    def __init__(self, root: str | os.PathLike, max_bytes: int = 10**9):
        self.root = Path(root)
        self.max_bytes = max_bytes

    def key(self, task, decoder: ImageDecoder) -> str | None:
        """The entry's key, or None where the task is not cached (a float transform, caching off)."""
        if decoder.split is None or self.max_bytes <= 0:
            return None
        files = [Path(f).resolve() for f in task.source().files()]
        stats = [(str(f), st.st_size, st.st_mtime_ns) for f, st in ((f, f.stat()) for f in files)]
        split = decoder.split
        return stable_hash({"version": CACHE_VERSION, "files": stats, "type": task.type, "format": task.format,
                            "split": task.split, "dataset": task.dataset, "rgb": task.decode_mode,
                            "size": split.size, "steps": [_describe(s) for s in split.pil_steps],
                            "skip_when_sized": split.skip_when_sized}, 24)

    def batches(self, task, key: str, block: int) -> Iterator[dict[str, Any]] | None:
        """The task's batches from its entry ``key`` (as ``datafilter.evaluate.stream`` yields them), or None if it
        has none yet. An unreadable entry is removed, so that this evaluation writes it again."""
        if not (self.root / key / "index.pkl").is_file():
            return None
        entry = self.root / key
        try:
            with open(entry / "index.pkl", "rb") as f:
                index = pickle.load(f)
            shape = tuple(index["shape"])
            expected = int(np.prod(shape))
            if index.get("version") != CACHE_VERSION or (entry / "images.u8").stat().st_size != expected:
                raise ValueError("its images file does not match its index")
            # (an empty file cannot be memory-mapped)
            images = np.memmap(entry / "images.u8", np.uint8, "r", shape=shape) if expected else np.empty(
                shape, np.uint8)
        except (OSError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
            log.warning("task %s: decoded copy %s unreadable (%s); decoding again", task.name, entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        log.info("task %s: reading its decoded images from %s", task.name, entry)
        return _read(index, images, block)

    def recorded(self, task, key: str, decoder: ImageDecoder, block: int,
                 batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """``batches`` passed through unchanged while they are written to a new entry ``key``, which is published
        only when the consumer has taken them all and none reported an error."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.tmp-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        written: list[tuple] = []
        offset, keep, image_shape = 0, True, (decoder.split.size, decoder.split.size, 3)
        per_image = int(np.prod(image_shape))
        try:
            with open(tmp / "images.u8", "wb") as f:
                for b in batches:
                    if keep and b.get("error"):
                        keep = False
                    if keep:
                        arr = b["images"].numpy()
                        if (offset + len(arr)) * per_image > self.max_bytes:
                            log.info("task %s: more than %.1f GB decoded; not cached", task.name, self.max_bytes / 1e9)
                            keep = False
                            f.truncate(0)
                        else:
                            f.write(np.ascontiguousarray(arr).tobytes())
                            written.append((b["order"], offset, len(arr), b["counts"], b["extras"], b["keys"]))
                            offset += len(arr)
                    yield b
            if keep:
                index = {"version": CACHE_VERSION, "task": task.name, "block": block,
                         "shape": (offset, *image_shape), "batches": sorted(written, key=lambda r: r[0])}
                with open(tmp / "index.pkl", "wb") as f:
                    pickle.dump(index, f, protocol=pickle.HIGHEST_PROTOCOL)
                try:
                    os.replace(tmp, self.root / key)
                except OSError:  # another process published the same entry first
                    pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _read(index: dict[str, Any], images: np.ndarray, block: int) -> Iterator[dict[str, Any]]:
    """The stored batches as they were made; regrouped in task order when the evaluation's block size differs."""
    if index["block"] == block:
        for order, offset, n, counts, extras, keys in index["batches"]:
            yield _batch(order, images[offset : offset + n], counts, extras, keys)
        return
    records = [(offset + start, count, extra, key)
               for _, offset, _, counts, extras, keys in index["batches"]
               for start, count, extra, key in zip(np.cumsum([0, *counts[:-1]]), counts, extras, keys)]
    for s in range(0, len(records), block):
        chunk = records[s : s + block]
        rows = np.concatenate([np.arange(o, o + c) for o, c, _, _ in chunk]).astype(np.int64)
        yield _batch((0, s), images[rows], [c for _, c, _, _ in chunk], [e for _, _, e, _ in chunk],
                     [k for _, _, _, k in chunk])


def _batch(order, images: np.ndarray, counts: list, extras: list, keys: list) -> dict[str, Any]:
    return {"order": order, "images": torch.from_numpy(np.array(images)), "counts": list(counts),
            "extras": list(extras), "keys": list(keys), "error": ""}
