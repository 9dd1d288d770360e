"""Training data: a pool (optionally restricted to a subset) resampled with replacement to a fixed number of samples.

DataComp's rule is that every entry trains for the same number of samples seen whatever its subset size, so a small
subset is seen many times and a large one maybe less than once. Here every optimiser step draws its global batch
uniformly with replacement from the subset's rows, from a generator seeded by ``(seed, step)``: the stream is the same
whatever the number of ranks or workers, and a resumed run continues it exactly without saving any sampler state.
A uid that appears ``k`` times in the subset file is ``k`` times as likely to be drawn (up-sampling filters).

Images reach the model in one of two ways, with identical results:
  * in memory: the pool's images are decoded once into a ``uint8`` array at the model's input size (cached on disk
    per pool, per shard, so the decode itself resumes and is shared by every run on the pool). For the tiny images of
    the offline pools this is far faster than any per-step decoding;
  * streamed: when the decoded pool would not fit in ``in_memory_max_bytes``, each drawn sample is read from its tar
    by offset and decoded in DataLoader workers.
Augmentation (pad-and-crop jitter, brightness / contrast jitter, caption templates) runs on the batch tensor; its
random draws are made for the whole global batch from ``(seed, step)``, so any number of ranks trains on the same
batches as one process.
"""

from __future__ import annotations

import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from datafilter.common.executor import ShardJob, run_shard_jobs
from datafilter.common.files import atomic_path
from datafilter.common.launch import LaunchEnv
from datafilter.pool.format import IMAGE_EXTS
from datafilter.pool.images import SkipSample, open_image, to_rgb
from datafilter.pool.pool import Pool, PoolError, Shard
from datafilter.pool.uid import UID_DTYPE

log = logging.getLogger(__name__)

DECODE_VERSION = 1  # bump when decode_image changes, so cached decodes are rebuilt


def cache_root() -> Path:
    """``$DATAFILTER_CACHE`` or ``~/.cache/datafilter``."""
    return Path(os.environ.get("DATAFILTER_CACHE") or Path.home() / ".cache" / "datafilter").expanduser()


# --- which rows ------------------------------------------------------------------------------------------------------
def subset_rows(pool: Pool, uids: np.ndarray | None, source: str = "subset") -> np.ndarray:
    """Pool rows to sample from: every row, or one row per subset entry (repeats kept). Unknown uids are an error."""
    if uids is None:
        return np.arange(pool.num_samples, dtype=np.int64)
    uids = np.asarray(uids)
    if uids.dtype != UID_DTYPE or uids.ndim != 1:
        raise ValueError(f"{source}: expected a 1-d array of {UID_DTYPE}, got {uids.dtype} {uids.shape}")
    if len(uids) == 0:
        raise ValueError(f"{source} is empty: nothing to train on")
    rows = pool.rows_of(uids)
    missing = int((rows < 0).sum())
    if missing:
        raise ValueError(f"{source}: {missing} of {len(uids)} uids are not in the pool {pool.path}")
    return rows.astype(np.int64)


def draw_rows(rows: np.ndarray, seed: int, step: int, count: int) -> np.ndarray:
    """The pool rows of step ``step``'s global batch: ``count`` uniform draws with replacement from ``rows``."""
    rng = np.random.default_rng([seed, step])
    return rows[rng.integers(0, len(rows), size=count)]


# --- decoding --------------------------------------------------------------------------------------------------------
def decode_image(data: bytes, size: int) -> np.ndarray:
    """Bytes -> ``uint8 [size, size, 3]``: short side to ``size`` (bicubic), centre crop, as open_clip evaluates."""
    img = to_rgb(open_image(data))
    w, h = img.size
    if (w, h) != (size, size):
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        img = img.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def _decode_shard(job: ShardJob) -> None:
    """Decode one shard into ``{images: uint8 [n, S, S, 3], valid: bool [n]}``; the file is the completion marker."""
    shard, size = job.payload
    images = np.zeros((shard.num_samples, size, size, 3), np.uint8)
    valid = np.zeros(shard.num_samples, bool)
    reader = TarIndex(shard)
    skipped: dict[str, int] = {}
    for row in range(shard.num_samples):
        try:
            images[row] = decode_image(reader.read(row), size)
            valid[row] = True
        except SkipSample as exc:
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
        except Exception as exc:  # web images break decoders in ways no list covers; embed skips them too
            reason = f"decode_error:{type(exc).__name__}"
            skipped[reason] = skipped.get(reason, 0) + 1
    if skipped:
        log.warning("%s: %d images not decodable, left out of training: %s", shard.tar, sum(skipped.values()),
                    ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    with atomic_path(job.marker) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, valid=valid)


def decoded_pool(pool: Pool, size: int, workers: int = 1, env: LaunchEnv | None = None,
                 sync: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The whole pool decoded at ``size`` (``uint8 [N, S, S, 3]``) and which rows decoded, from the decode cache.

    Under several ranks each decodes its share of the shards; ``sync`` (a barrier) then waits for all of them.
    """
    # The pool id hashes the parquets (uids and image sha256s): a pool rebuilt with other images gets other pixels.
    cache = cache_root() / "decoded" / f"{pool.pool_id}-{size}px-v{DECODE_VERSION}"
    cache.mkdir(parents=True, exist_ok=True)
    jobs = [ShardJob(s.name, cache / f"{s.name}.npz", (s, size)) for s in pool.shards]
    run_shard_jobs(jobs, _decode_shard, workers=workers, desc="decode pool", env=env)
    if sync is not None:
        sync()
    images = np.empty((pool.num_samples, size, size, 3), np.uint8)
    valid = np.empty(pool.num_samples, bool)
    for job, lo, shard in zip(jobs, pool.offsets[:-1], pool.shards):
        with np.load(job.marker) as z:
            if len(z["valid"]) != shard.num_samples:
                raise PoolError(f"{job.marker}: decoded {len(z['valid'])} rows but shard has {shard.num_samples}; "
                                f"delete it to decode again")
            images[lo : lo + shard.num_samples] = z["images"]
            valid[lo : lo + shard.num_samples] = z["valid"]
    return images, valid


class TarIndex:
    """Random access to one shard's images by parquet row: tar member offsets, read once from the headers."""

    def __init__(self, shard: Shard):
        self.path = shard.tar
        keys = pq.read_table(shard.parquet, columns=["key"]).column("key").to_pylist()
        found: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(self.path, "r") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.rsplit("/", 1)[-1].partition(".")
                    if ext.lower() in IMAGE_EXTS:
                        found[key] = (m.offset_data, m.size)
        except (tarfile.TarError, EOFError) as exc:
            raise PoolError(f"{self.path}: unreadable tar ({exc})") from None
        missing = [k for k in keys if k not in found]
        if missing:
            raise PoolError(f"{self.path}: {len(missing)} samples of {shard.parquet.name} have no image "
                            f"(e.g. {missing[0]})")
        self.spans = [found[k] for k in keys]
        self._file = None

    def read(self, row: int) -> bytes:
        if self._file is None:
            self._file = open(self.path, "rb")
        offset, size = self.spans[row]
        self._file.seek(offset)
        return self._file.read(size)


class StreamedImages:
    """Decode drawn rows from their tars on demand (pools too large to hold decoded in memory)."""

    def __init__(self, pool: Pool, size: int):
        self.pool = pool
        self.size = size
        self._index: dict[int, TarIndex] = {}

    def _reader(self, si: int) -> TarIndex:
        if si not in self._index:
            self._index[si] = TarIndex(self.pool.shards[si])
        return self._index[si]

    def get(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``uint8 [n, S, S, 3]`` and a validity mask for pool rows ``rows``."""
        out = np.zeros((len(rows), self.size, self.size, 3), np.uint8)
        ok = np.zeros(len(rows), bool)
        shard_of = np.searchsorted(self.pool.offsets, rows, side="right") - 1
        for i, (row, si) in enumerate(zip(rows, shard_of)):
            try:
                out[i] = decode_image(self._reader(int(si)).read(int(row - self.pool.offsets[si])), self.size)
                ok[i] = True
            except Exception:  # SkipSample or a decoder's own error: the batch replaces the row either way
                pass
        return out, ok


# --- augmentation ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Jitter:
    """Per-sample augmentation draws for a whole global batch (so any split across ranks sees the same ones)."""

    oy: torch.Tensor  # [n] crop offsets in 0..2*pad
    ox: torch.Tensor
    contrast: torch.Tensor  # [n] factors in [1 - colour, 1 + colour]
    bright: torch.Tensor
    template: torch.Tensor  # [n] caption template index
    grey: torch.Tensor  # [n] bool: convert to greyscale
    low_res: torch.Tensor  # [n] side to shrink to and blow up from; 0: keep the resolution

    @classmethod
    def draw(cls, gen: torch.Generator, n: int, pad: int, colour: float, templates: int, greyscale: float = 0.0,
             low_res: float = 0.0, low_res_min: int = 8, size: int = 32) -> "Jitter":
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        contrast = 1 + (torch.rand(n, generator=gen) * 2 - 1) * colour
        bright = 1 + (torch.rand(n, generator=gen) * 2 - 1) * colour
        template = torch.randint(0, max(templates, 1), (n,), generator=gen)
        # Drawn after the others, so recipes without these augmentations keep their exact random stream.
        grey = torch.rand(n, generator=gen) < greyscale if greyscale > 0 else torch.zeros(n, dtype=torch.bool)
        if low_res > 0:
            sides = torch.randint(low_res_min, max(low_res_min, size // 2) + 1, (n,), generator=gen)
            low = torch.where(torch.rand(n, generator=gen) < low_res, sides, torch.zeros_like(sides))
        else:
            low = torch.zeros(n, dtype=torch.long)
        return cls(oy, ox, contrast, bright, template, grey, low)

    def __getitem__(self, sl: slice) -> "Jitter":
        return Jitter(self.oy[sl], self.ox[sl], self.contrast[sl], self.bright[sl], self.template[sl],
                      self.grey[sl], self.low_res[sl])


def augment(images: torch.Tensor, jitter: Jitter, pad: int) -> torch.Tensor:
    """``uint8 [n, S, S, 3]`` -> float ``[n, 3, S, S]`` in [0, 1], shifted and colour-jittered per sample.

    Pad-and-crop shifts each image by up to ``pad`` pixels (edge pixels repeated, so a white icon background stays
    white); the chosen images are shrunk and blown up again (low resolution) or turned grey; contrast and brightness
    are scaled by the drawn factors.
    """
    x = images.permute(0, 3, 1, 2).float().div_(255)
    n, _, s, _ = x.shape
    if n == 0:
        return x
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
        ar = torch.arange(s)
        iy = (jitter.oy[:, None] + ar)[:, None, :, None]
        ix = (jitter.ox[:, None] + ar)[:, None, None, :]
        x = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], iy, ix]
    for side in torch.unique(jitter.low_res[jitter.low_res > 0]).tolist():
        idx = torch.nonzero(jitter.low_res == side).flatten()
        small = torch.nn.functional.interpolate(x[idx], size=(side, side), mode="area")
        x[idx] = torch.nn.functional.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)
    if jitter.grey.any():
        luma = (x[jitter.grey] * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        x[jitter.grey] = luma.expand(-1, 3, -1, -1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast, bright = jitter.contrast.view(n, 1, 1, 1), jitter.bright.view(n, 1, 1, 1)
    return (((x - mean) * contrast + mean) * bright).clamp_(0, 1)


# --- batches ---------------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    images: torch.Tensor  # float [n, 3, S, S], normalised for the model
    tokens: torch.Tensor  # long [n, context]
    rows: np.ndarray  # pool rows, for inspection and tests


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``step`` is this rank's share of that step's global batch.

    Works the same in the training process (in-memory images) and in DataLoader workers (streamed images).
    """

    def __init__(self, *, rows: np.ndarray, texts: np.ndarray, images: np.ndarray | StreamedImages,
                 valid: np.ndarray | None, tokenizer: Callable[[list[str]], torch.Tensor], seed: int,
                 batch_size_at: Callable[[int], int], steps: int, rank: int, world_size: int,
                 templates: Sequence[str], jitter_pad: int, colour_jitter: float,
                 mean: Sequence[float], std: Sequence[float], greyscale: float = 0.0, low_res: float = 0.0):
        self.rows, self.texts, self.images, self.valid = rows, texts, images, valid
        self.tokenizer, self.seed, self.batch_size_at, self.steps = tokenizer, seed, batch_size_at, steps
        self.rank, self.world_size = rank, world_size
        self.templates = tuple(templates)
        self.jitter_pad, self.colour_jitter = jitter_pad, colour_jitter
        self.greyscale, self.low_res = greyscale, low_res
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return self.steps

    def local_slice(self, count: int) -> slice:
        """This rank's contiguous share of a global batch of ``count`` (equal shares; DDP gathers need them)."""
        per = count // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def __getitem__(self, step: int) -> Batch:
        count = self.batch_size_at(step)
        local = self.local_slice(count)
        rows = draw_rows(self.rows, self.seed, step, count)[local]
        if isinstance(self.images, StreamedImages):
            pixels, ok = self.images.get(rows)
        else:
            pixels, ok = self.images[rows], self.valid[rows]
        if not ok.all():
            # Replace each undecodable row by a decodable row of the same batch so the batch keeps its size (the same
            # rule for in-memory and streamed images, so both give identical batches).
            good = np.flatnonzero(ok)
            if len(good) == 0:
                raise PoolError(f"step {step}: no decodable image among {len(rows)} drawn samples")
            bad = np.flatnonzero(~ok)
            rows[bad] = rows[good[bad % len(good)]]
            pixels[bad] = pixels[good[bad % len(good)]]
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, step, 1]).integers(1 << 62)))
        jitter = Jitter.draw(gen, count, self.jitter_pad, self.colour_jitter, len(self.templates), self.greyscale,
                             self.low_res, size=pixels.shape[1])[local]
        x = augment(torch.from_numpy(np.ascontiguousarray(pixels)), jitter, self.jitter_pad)
        x = (x - self.mean) / self.std
        captions = [str(self.texts[r]) for r in rows]
        if self.templates:
            captions = [self.templates[p].replace("{c}", c) for p, c in zip(jitter.template.tolist(), captions)]
        return Batch(x, self.tokenizer(captions), rows)
