"""The in-memory data path: a small pool decoded once into memory, each global batch drawn with replacement.

DataComp's rule is that every entry trains for the same number of samples seen whatever its subset size, so a small
subset is seen many times and a large one maybe less than once. Here every optimiser step draws its global batch
uniformly with replacement from the subset's rows, from a generator seeded by ``(seed, step)``: the stream is the same
whatever the number of ranks or workers, and a resumed run continues it exactly without saving any sampler state.
A uid that appears ``k`` times in the subset file is ``k`` times as likely to be drawn (up-sampling filters).

The pool's images are decoded once into a ``uint8`` array at the model's input size (cached on disk per pool, per
shard, so the decode itself resumes and is shared by every run on the pool); for the tiny images of the offline pools
this is far faster than any per-step decoding. The CPU scales' ``jitter`` augmentation runs on the batch tensor, its
random draws made for the whole global batch from ``(seed, step)``, so any number of ranks trains on the same batches
as one process. Pools too large for memory, and DataComp's scales, stream from their shards instead
(``datafilter.train.stream``).

Captions are tokenized once per pool too (``tokenized_pool``, cached beside the decoded images) when the recipe has
no caption templates: open_clip's tokenizer costs about a quarter of a millisecond a caption, which at the micro
scale was a fifth of a small model's step, and the tokens of a caption do not depend on the step that draws it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from datafilter.common.executor import ShardJob, run_shard_jobs
from datafilter.common.files import atomic_path, cache_root
from datafilter.common.launch import LaunchEnv
from datafilter.pool.images import SkipSample
from datafilter.pool.pool import Pool, PoolError, iter_shard
from datafilter.pool.uid import UID_DTYPE
from datafilter.train.transforms import JitterAugment, decode_image

log = logging.getLogger(__name__)

DECODE_VERSION = 1  # bump when decode_image changes, so cached decodes are rebuilt
TOKENS_VERSION = 1  # bump when the tokenized form changes, so cached tokens are rebuilt


# --- which rows ------------------------------------------------------------------------------------------------------
def subset_rows(pool: Pool, uids: np.ndarray | None, source: str = "subset") -> tuple[np.ndarray, int]:
    """Pool rows to sample from (every row, or one per subset entry, repeats kept) and how many subset entries the
    pool lacks. Some missing uids are normal (DataComp's subsets list samples that failed to download); none found
    is an error."""
    if uids is None:
        return np.arange(pool.num_samples, dtype=np.int64), 0
    uids = np.asarray(uids)
    if uids.dtype != UID_DTYPE or uids.ndim != 1:
        raise ValueError(f"{source}: expected a 1-d array of {UID_DTYPE}, got {uids.dtype} {uids.shape}")
    if len(uids) == 0:
        raise ValueError(f"{source} is empty: nothing to train on")
    rows = pool.rows_of(uids)
    found = rows >= 0
    if not found.any():
        raise ValueError(f"{source}: none of its {len(uids):,} uids is in the pool {pool.path} (a subset of another "
                         f"pool?)")
    missing = int((~found).sum())
    if missing:
        log.warning("%s: %d of %d uids are not in the pool %s; training on the %d found", source, missing, len(uids),
                    pool.path, len(uids) - missing)
    return rows[found].astype(np.int64), missing


def draw_rows(rows: np.ndarray, seed: int, step: int, count: int) -> np.ndarray:
    """The pool rows of step ``step``'s global batch: ``count`` uniform draws with replacement from ``rows``."""
    rng = np.random.default_rng([seed, step])
    return rows[rng.integers(0, len(rows), size=count)]


# --- decoding the pool into memory -----------------------------------------------------------------------------------
def _decode_shard(job: ShardJob) -> None:
    """Decode one shard into ``{images: uint8 [n, S, S, 3], valid: bool [n]}``; the file is the completion marker."""
    shard, size = job.payload
    images = np.zeros((shard.num_samples, size, size, 3), np.uint8)
    valid = np.zeros(shard.num_samples, bool)
    skipped: dict[str, int] = {}
    for row, sample in enumerate(iter_shard(shard)):
        try:
            images[row] = decode_image(sample.image, size)
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


def _decode_jobs(pool: Pool, size: int) -> list[ShardJob]:
    # The pool id hashes the parquets (uids and image sha256s): a pool rebuilt with other images gets other pixels.
    cache = cache_root() / "decoded" / f"{pool.pool_id}-{size}px-v{DECODE_VERSION}"
    cache.mkdir(parents=True, exist_ok=True)
    return [ShardJob(s.name, cache / f"{s.name}.npz", (s, size)) for s in pool.shards]


def decoded_pool(pool: Pool, size: int, workers: int = 1, env: LaunchEnv | None = None,
                 sync: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The whole pool decoded at ``size`` (``uint8 [N, S, S, 3]``) and which rows decoded, from the decode cache.

    Under several ranks each decodes its share of the shards; ``sync`` (a barrier) then waits for all of them.
    """
    jobs = _decode_jobs(pool, size)
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


# --- tokenizing the pool's captions ----------------------------------------------------------------------------------
def _tokenize_shard(job: ShardJob) -> None:
    """Tokenize one shard's captions with the model's open_clip tokenizer into ``int32 [n, context]``; the file is
    the completion marker."""
    import pyarrow.parquet as pq

    from datafilter.models.loading import tokenizer_for

    shard, model = job.payload
    tokenizer = tokenizer_for(model)
    # str() as the per-step path applies it to the caption column (a missing caption is the text "None")
    texts = [str(t) for t in pq.read_table(shard.parquet, columns=["text"]).column("text").to_pylist()] \
        if shard.num_samples else []
    tokens = tokenizer(texts) if texts else torch.zeros((0, tokenizer.context_length), dtype=torch.long)
    with atomic_path(job.marker) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, tokens.numpy().astype(np.int32))


def _token_jobs(pool: Pool, model: str) -> list[ShardJob]:
    import open_clip

    cache = cache_root() / "tokens" / f"{pool.pool_id}-{model}-oc{open_clip.__version__}-v{TOKENS_VERSION}"
    cache.mkdir(parents=True, exist_ok=True)
    return [ShardJob(s.name, cache / f"{s.name}.npy", (s, model)) for s in pool.shards]


def fill_caches(pool: Pool, size: int, model: str | None, workers: int) -> None:
    """Make the decoded images (and, given ``model``, the tokenized captions) of every shard not yet cached,
    without loading them."""
    run_shard_jobs(_decode_jobs(pool, size), _decode_shard, workers=workers, desc="decode pool")
    if model is not None:
        run_shard_jobs(_token_jobs(pool, model), _tokenize_shard, workers=workers, desc="tokenize pool")


def tokenized_pool(pool: Pool, model: str, workers: int = 1, env: LaunchEnv | None = None,
                   sync: Callable[[], None] | None = None) -> np.ndarray:
    """Every caption of the pool as ``model``'s tokenizer encodes it (``int32 [N, context]``), from the token cache.

    The cache is keyed by the pool id (which hashes the parquets, captions included), the model name (which decides
    the tokenizer and its context length) and the open_clip version."""
    jobs = _token_jobs(pool, model)
    run_shard_jobs(jobs, _tokenize_shard, workers=workers, desc="tokenize pool", env=env)
    if sync is not None:
        sync()
    parts = [np.load(job.marker) for job in jobs]
    for part, shard, job in zip(parts, pool.shards, jobs):
        if len(part) != shard.num_samples:
            raise PoolError(f"{job.marker}: {len(part)} tokenized captions but shard has {shard.num_samples}; "
                            f"delete it to tokenize again")
    return np.concatenate(parts)


# --- batches ---------------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    images: torch.Tensor  # float [n, 3, S, S], normalised for the model
    tokens: torch.Tensor  # long [n, context]
    rows: np.ndarray  # pool rows, for inspection and tests
    step: int = -1

    def pin_memory(self) -> "Batch":
        """Page-locked tensors, for faster copies to the GPU (the DataLoader calls this with ``pin_memory``)."""
        self.images, self.tokens = self.images.pin_memory(), self.tokens.pin_memory()
        return self


class StepBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``step`` is this rank's share of that step's global batch."""

    def __init__(self, *, rows: np.ndarray, texts: np.ndarray, images: np.ndarray, valid: np.ndarray,
                 tokenizer: Callable[[list[str]], torch.Tensor], augment: JitterAugment, seed: int,
                 batch_size_at: Callable[[int], int], steps: int, rank: int, world_size: int,
                 tokens: np.ndarray | None = None):
        """``tokens``: every pool row's caption already tokenized (``tokenized_pool``); only without templates,
        which change the caption per draw."""
        if tokens is not None and augment.templates:
            raise ValueError("pre-tokenized captions cannot be used with caption templates")
        self.rows, self.texts, self.images, self.valid, self.tokens = rows, texts, images, valid, tokens
        self.tokenizer, self.augment, self.seed = tokenizer, augment, seed
        self.batch_size_at, self.steps = batch_size_at, steps
        self.rank, self.world_size = rank, world_size

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
        pixels, ok = self.images[rows], self.valid[rows]
        if not ok.all():
            # Replace each undecodable row by a decodable row of the same batch so the batch keeps its size.
            good = np.flatnonzero(ok)
            if len(good) == 0:
                raise PoolError(f"step {step}: no decodable image among {len(rows)} drawn samples")
            bad = np.flatnonzero(~ok)
            rows[bad] = rows[good[bad % len(good)]]
            pixels[bad] = pixels[good[bad % len(good)]]
        # The draws are made for the whole global batch, then sliced: every split across ranks sees the same ones.
        jitter = self.augment.draw(int(np.random.default_rng([self.seed, step, 1]).integers(1 << 62)), count)[local]
        if self.tokens is not None:
            x, _ = self.augment.apply(pixels, jitter, [])
            return Batch(x, torch.from_numpy(self.tokens[rows].astype(np.int64)), rows, step)
        x, captions = self.augment.apply(pixels, jitter, [str(self.texts[r]) for r in rows])
        return Batch(x, self.tokenizer(captions), rows, step)
