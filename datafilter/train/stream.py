"""The streaming data path: DataComp's way of reading a pool (open_clip's resampled webdataset loader), resumable.

What open_clip's trainer does with ``--dataset-resampled`` (DataComp's setting): every DataLoader worker of every rank
draws shards with replacement (``ResampledShards``), reads each one sequentially, passes its samples through a
shuffle buffer and cuts batches of the per-GPU size; training stops after a fixed number of batches, so the samples
seen are exact whatever the subset size. This module does the same, and adds:

  * the subset is applied by uid as samples stream: a pool sample whose uid the subset lists ``k`` times enters the
    shuffle buffer ``k`` times (as DataComp's resharder writes it ``k`` times), so a subset trains without resharding
    the pool. Shards are drawn uniformly among those that hold subset samples, so every entry stays equally likely;
  * every random draw is keyed by counters (seed, stream, shard draw, step), and each batch carries its stream's
    position: shards drawn so far, the sample reached in the current shard, and which samples (shard, position)
    sit in the shuffle buffer. A checkpoint stores these positions; a resumed run re-reads the buffered samples and
    the current shard up to its position, and continues with exactly the batches an uninterrupted run would have had;
  * bounded resources: one tar open at a time per worker, memory bounded by the shuffle buffer's raw bytes and one
    shard's metadata (nothing grows with the pool or with the number of steps);
  * bad input is counted, never fatal mid-run: a truncated or unreadable shard is left at the point where it breaks,
    undecodable images and samples without caption are skipped, each counted per reason (a shard that
    breaks again each time it is drawn counts each time).

Stream layout: a rank runs ``streams`` streams (one per DataLoader worker, or one in the training process), and step
``t`` of rank ``r`` is cut from stream ``t mod streams`` of that rank. The order therefore depends on the number of
ranks and workers, as open_clip's does; the same launch gives the same order, and a checkpoint records its layout.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from datafilter.common.files import read_json, write_json
from datafilter.pool.images import SkipSample
from datafilter.pool.pool import Pool
from datafilter.pool.tario import TarError, image_of, tar_samples
from datafilter.pool.uid import count_in_sorted, open_uid_file, uids_from_arrow
from datafilter.train.data import Batch

log = logging.getLogger(__name__)

MAX_EMPTY_DRAWS = 64  # consecutive shard draws without a readable sample before the stream gives up
MAX_DECODE_FAILURES = 1000  # consecutive undecodable images before the stream gives up
MAX_REPEATS = np.iinfo(np.uint16).max


class StreamError(RuntimeError):
    """A stream that cannot produce samples at all (every shard unreadable, every image broken)."""


@dataclass(frozen=True)
class StreamSource:
    """What every stream reads: the pool's shards, which of them hold training samples, and the repeat counts."""

    tars: tuple[str, ...]
    parquets: tuple[str, ...]
    offsets: np.ndarray  # pool row of each shard's first sample, and the total (length shards + 1)
    candidates: np.ndarray  # indices of the shards that hold at least one training sample
    repeats: str | None = None  # .npy of uint16 per pool row: times the subset lists it (None: every row once)
    info: dict[str, Any] = field(default_factory=dict)  # subset entries found in and missing from the pool


# --- the subset, by uid ----------------------------------------------------------------------------------------------
def open_subset(path: str | Path, sha256: str) -> np.ndarray:
    """A subset file memory-mapped (its pages are shared and dropped by the OS; nothing is copied), with the checks
    ``datafilter.filters.subset.load_subset`` makes: the dtype, sorted uids, and a sidecar describing this file."""
    from datafilter.filters.subset import sidecar_path

    path = Path(path)
    uids = open_uid_file(path)
    if len(uids) == 0:
        raise ValueError(f"{path} is empty: nothing to train on")
    side = sidecar_path(path)
    if side.exists() and read_json(side).get("sha256") not in (None, sha256):
        raise ValueError(f"{side} describes another version of {path.name} (sha256 differs); rerun the filter")
    return uids


def prepare_source(pool: Pool, subset: str | Path | None, subset_sha256: str | None, work: Path) -> StreamSource:
    """The shards and, for a subset, each pool row's repeat count, written once to ``work`` (reused on resume).

    Reads the ``uid`` column of each shard's parquet in turn, so memory stays at one shard's whatever the pool size.
    Subset uids that no shard holds are counted; a subset of which no uid is found is an error.
    """
    from tqdm.auto import tqdm

    tars = tuple(str(s.tar) for s in pool.shards)
    parquets = tuple(str(s.parquet) for s in pool.shards)
    sizes = np.array([s.num_samples for s in pool.shards], np.int64)
    if subset is None:
        return StreamSource(tars, parquets, pool.offsets, np.flatnonzero(sizes > 0),
                            info={"subset_entries": int(sizes.sum()), "found": int(sizes.sum()), "missing": 0})
    assert subset_sha256 is not None
    path = work / f"repeats-{subset_sha256[:16]}.npy"
    summary = path.with_suffix(".json")  # written last: the index is complete
    if not summary.exists():
        uids = open_subset(subset, subset_sha256)
        high = np.ascontiguousarray(uids["f0"])  # 8 bytes an entry, for this pass only
        work.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        repeats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(pool.num_samples,))
        per_shard = np.zeros(len(pool.shards), np.int64)
        for i, s in enumerate(tqdm(pool.shards, desc="index subset", unit="shard")):
            if s.num_samples == 0:
                continue
            with pq.ParquetFile(s.parquet) as pf:
                shard_uids = uids_from_arrow(pf.read(columns=["uid"]).column("uid"))
            count = count_in_sorted(uids, shard_uids, high)
            if count.max(initial=0) > MAX_REPEATS:
                raise ValueError(f"{subset}: a uid is listed {int(count.max()):,} times (at most {MAX_REPEATS:,})")
            repeats[pool.offsets[i] : pool.offsets[i + 1]] = count
            per_shard[i] = count.sum()
        repeats.flush()
        del repeats
        found = int(per_shard.sum())
        if found == 0:
            tmp.unlink()
            raise ValueError(f"{subset}: none of its {len(uids):,} uids is in the shards of {pool.path} (a subset of "
                             f"another pool?)")
        os.replace(tmp, path)
        write_json(summary, {"subset_entries": len(uids), "found": found, "missing": max(0, len(uids) - found),
                             "per_shard": per_shard.tolist()})
    meta = read_json(summary)
    if meta["missing"]:
        log.warning("%s: %d of %d entries are not in the pool's shards %s; training on the %d found", subset,
                    meta["missing"], meta["subset_entries"], pool.path, meta["found"])
    per_shard = np.asarray(meta.pop("per_shard"), np.int64)
    return StreamSource(tars, parquets, pool.offsets, np.flatnonzero(per_shard > 0), str(path), meta)


# --- one stream ------------------------------------------------------------------------------------------------------
def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


class ShardStream:
    """One stream: shards drawn with replacement, read in order, samples mixed in a shuffle buffer.

    Buffer entries are ``(shard, position, image bytes, caption)``; images are decoded when they leave the buffer.
    """

    def __init__(self, source: StreamSource, decode: Callable[[bytes], Any], *, seed: int, origin: int, gid: int,
                 buffer: int, initial: int, state: dict[str, Any] | None = None):
        self.source, self.decode = source, decode
        self.key = (seed, origin, gid)
        self.size, self.initial = max(1, buffer), max(1, min(initial, buffer))
        state = state or {}
        self.draws = int(state.get("draws", 0))
        self.shard = int(state.get("shard", -1))
        self.position = int(state.get("position", 0))
        self.stats: Counter[str] = Counter(state.get("stats", {}))
        self._reader: Iterator[tuple[int, int, bytes, str]] | None = None
        self._repeats = np.load(source.repeats, mmap_mode="r") if source.repeats else None
        self.buffer: list[tuple[int, int, bytes, str]] = self._replay(np.asarray(state.get("buffer", []),
                                                                                 np.int64).reshape(-1, 2))

    # reading
    def _read_shard(self, shard: int, start: int, count_errors: bool = True) -> Iterator[tuple[int, int, bytes, str]]:
        """``(position, repeats, image, caption)`` of the shard's training samples from ``start`` on, in tar order.

        Advances ``self.position`` as samples are read (only when ``count_errors``: replays leave the state alone).
        """
        tar, parquet = self.source.tars[shard], self.source.parquets[shard]
        with pq.ParquetFile(parquet) as pf:  # a quarter of read_table's cost, which counts on tiny shards
            keys = pf.read(columns=["key"]).column("key").to_pylist()
        lo = int(self.source.offsets[shard])
        counts = (np.asarray(self._repeats[lo : lo + len(keys)]) if self._repeats is not None
                  else np.ones(len(keys), np.int64))
        read = 0
        try:
            for pos, (key, files) in enumerate(tar_samples(Path(tar))):
                read = pos + 1
                if pos < start:
                    continue
                if count_errors:
                    self.position = pos + 1
                if pos >= len(keys) or keys[pos] != key:
                    if count_errors:
                        self.stats["mismatched_shard_reads"] += 1
                        log.warning("%s: sample %d is %r but its parquet says %r; leaving the rest of the shard", tar,
                                    pos, key, keys[pos] if pos < len(keys) else None)
                    return
                if counts[pos] == 0:
                    continue
                image, text = image_of(files), files.get("txt")
                if image is None or text is None:
                    if count_errors:
                        self.stats["no_image" if image is None else "no_caption"] += 1
                    continue
                yield pos, int(counts[pos]), image, text.decode("utf-8", "replace")
            if read < len(keys):  # cut at a member boundary: the tar reads as complete but is short
                raise TarError(f"{tar}: truncated tar (ends after {read} of the {len(keys)} samples its parquet lists)")
        except TarError as exc:
            if count_errors:
                self.stats["truncated_shard_reads"] += 1
                log.warning("%s; skipping the rest of this shard (counted in truncated_shard_reads)", exc)

    def _draw(self) -> None:
        candidates = self.source.candidates
        self.shard = int(candidates[_rng(*self.key, self.draws, 0).integers(len(candidates))])
        self.draws += 1
        self.position = 0
        self._reader = None

    def _pull(self) -> None:
        """Append the stream's next training sample to the buffer (``k`` copies for a uid listed ``k`` times)."""
        for _ in range(MAX_EMPTY_DRAWS):
            if self._reader is None:
                self._reader = self._read_shard(self.shard, self.position) if self.shard >= 0 else iter(())
            entry = next(self._reader, None)
            if entry is not None:
                pos, count, image, text = entry
                self.buffer.extend([(self.shard, pos, image, text)] * count)
                return
            self._draw()
        raise StreamError(f"no readable training sample in {MAX_EMPTY_DRAWS} shard draws in a row (shards broken or "
                          f"missing?); stream statistics: {dict(self.stats)}")

    def _replay(self, refs: np.ndarray) -> list[tuple[int, int, bytes, str]]:
        """Re-read the samples a checkpoint's buffer held, shard by shard (one file open at a time)."""
        found: dict[tuple[int, int], tuple[int, int, bytes, str]] = {}
        for shard in np.unique(refs[:, 0]):
            wanted = set(refs[refs[:, 0] == shard, 1].tolist())
            last = max(wanted)
            for pos, _, image, text in self._read_shard(int(shard), min(wanted), count_errors=False):
                if pos in wanted:
                    found[(int(shard), pos)] = (int(shard), pos, image, text)
                if pos >= last:
                    break
        lost = sum(1 for s, p in refs.tolist() if (s, p) not in found)
        if lost:
            self.stats["lost_on_resume"] += lost
            log.warning("%d buffered samples could not be read again on resume (their shards changed?)", lost)
        return [found[(s, p)] for s, p in refs.tolist() if (s, p) in found]

    # batches
    def batch(self, step: int, n: int) -> tuple[list[Any], list[str], list[tuple[int, int]]]:
        """``n`` decoded images, their captions and their (shard, position): step ``step``'s share of this stream."""
        rng = _rng(*self.key, step, 1)
        decoded: list[Any] = []
        captions: list[str] = []
        refs: list[tuple[int, int]] = []
        failures = 0
        while len(decoded) < n:
            # webdataset's shuffle: fill to ``initial`` first, then grow by one per sample out up to ``size``.
            while len(self.buffer) < self.initial:
                self._pull()
            if len(self.buffer) < self.size:
                self._pull()
            self._pull()
            k = int(rng.integers(len(self.buffer)))
            shard, pos, image, text = self.buffer[k]
            self.buffer[k] = self.buffer[-1]
            self.buffer.pop()
            try:
                decoded.append(self.decode(image))
            except Exception as exc:  # SkipSample, or a decoder's own error on a broken web image
                self.stats[exc.reason if isinstance(exc, SkipSample) else f"decode_error:{type(exc).__name__}"] += 1
                failures += 1
                if failures >= MAX_DECODE_FAILURES:
                    raise StreamError(f"{failures} undecodable images in a row; stream statistics: "
                                      f"{dict(self.stats)}") from exc
                continue
            failures = 0
            captions.append(text)
            refs.append((shard, pos))
        return decoded, captions, refs

    def state(self) -> dict[str, Any]:
        """Where the stream is: enough to rebuild it exactly (JSON-serialisable)."""
        return {"draws": self.draws, "shard": self.shard, "position": self.position,
                "buffer": [[s, p] for s, p, _, _ in self.buffer], "stats": dict(self.stats)}


# --- batches for the training loop -----------------------------------------------------------------------------------
@dataclass
class StreamBatch(Batch):
    stream: int = 0  # which of the rank's streams cut it
    state: dict[str, Any] = field(default_factory=dict)  # that stream's position after it


class StreamBatches(torch.utils.data.IterableDataset):
    """This rank's batches from step ``start`` on, each cut from stream ``step % streams`` of the rank.

    Run it with ``num_workers == streams`` (or in the training process when ``streams == 1``): the DataLoader takes
    batches from its workers in turn, so worker ``w`` carries stream ``(start + w) % streams`` and the loop receives
    the steps in order.
    """

    def __init__(self, source: StreamSource, *, augment: Any, tokenizer: Callable[[list[str]], torch.Tensor],
                 seed: int, origin: int, rank: int, world_size: int, streams: int, start: int, steps: int,
                 batch_size_at: Callable[[int], int], buffer: int, initial: int,
                 states: dict[int, dict[str, Any]] | None = None):
        self.source, self.augment, self.tokenizer = source, augment, tokenizer
        self.seed, self.origin, self.rank, self.world_size, self.streams = seed, origin, rank, world_size, streams
        self.start, self.steps, self.batch_size_at = start, steps, batch_size_at
        self.buffer, self.initial = buffer, initial
        self.states = states or {}

    def stream(self, s: int) -> ShardStream:
        return ShardStream(self.source, self.augment.decode, seed=self.seed, origin=self.origin,
                           gid=self.rank * self.streams + s, buffer=self.buffer, initial=self.initial,
                           state=self.states.get(s))

    def __iter__(self) -> Iterator[StreamBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.streams:
            raise RuntimeError(f"{workers} loader workers for {self.streams} streams; they must be equal")
        s = (self.start + worker) % self.streams
        stream = self.stream(s)
        for step in range(self.start + worker, self.steps, self.streams):
            decoded, captions, refs = stream.batch(step, self.batch_size_at(step) // self.world_size)
            aug_seed = int(_rng(*stream.key, step, 2).integers(1 << 62))
            images, captions = self.augment.batch(decoded, captions, aug_seed)
            rows = np.array([self.source.offsets[sh] + p for sh, p in refs], np.int64)
            yield StreamBatch(images, self.tokenizer(captions), rows, step, s, stream.state())


# --- checkpointed positions ------------------------------------------------------------------------------------------
def stream_file(ckpt_dir: Path, step: int, rank: int) -> Path:
    return ckpt_dir / f"stream-{step:08d}-r{rank:05d}.json"


def layout_of(ckpt_dir: Path) -> dict[str, int] | None:
    """The stream layout (ranks, streams per rank) of the newest saved stream positions, if any."""
    files = sorted(ckpt_dir.glob("stream-*-r00000.json"))
    return read_json(files[-1])["layout"] if files else None
