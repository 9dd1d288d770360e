"""Embed a pool: decode in workers, run both towers in batches, write each shard when its last row is in.

Data flow (one process per torchrun rank / Slurm task)::

    this rank's unfinished shards --split by shard--> DataLoader workers (or one thread): read tar, decode, tokenise
        --batches tagged (shard, rows)--> main process: normalise on device, image + text towers (autocast on GPU)
        --> per-shard buffers --> EmbeddingStore.write_shard (scores parquet last = completion marker)

Batches never mix shards, so every shard is cut into the same batches whatever the number of workers or ranks, and
the vectors come out identical. A shard whose tar disagrees with its parquet is reported by name and left unwritten;
the other shards still finish, and the run fails at the end listing what is missing.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from datafilter.common.launch import LaunchEnv, free_cores, launch_env
from datafilter.embed.decode import ImageDecoder
from datafilter.embed.shards import pool_shard_rows
from datafilter.embed.store import EmbeddingError, EmbeddingStore, SpaceInfo, space_name
from datafilter.models import LoadedModel, ModelSpec
from datafilter.pool.images import SkipSample
from datafilter.pool.pool import Pool, PoolError, Shard

log = logging.getLogger(__name__)

# DataComp's metadata names the score of OpenAI's CLIP models by architecture; other models get the generic name.
DATACOMP_SCORE_COLUMNS = {
    ("ViT-B-32", "openai"): "clip_b32_similarity_score",
    ("ViT-B-32-quickgelu", "openai"): "clip_b32_similarity_score",
    ("ViT-L-14", "openai"): "clip_l14_similarity_score",
    ("ViT-L-14-quickgelu", "openai"): "clip_l14_similarity_score",
}
GENERIC_SCORE_COLUMN = "clip_score"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def default_workers() -> int:
    """Half the free cores for decoding, at most 8: enough to feed a GPU, and on a small CPU machine the model keeps
    the rest."""
    return min(8, max(1, free_cores() // 2))


@dataclass(frozen=True)
class EmbedConfig:
    """How to run the towers (on the loaded model's device). ``workers`` decoding processes (0: a thread)."""

    batch_size: int = 256
    workers: int = field(default_factory=default_workers)
    precision: str = "auto"  # auto: fp16 autocast on GPU, fp32 on CPU
    threads: int | None = None  # the model's intra-op threads on CPU; default: free cores minus decoders (at least 1)
    prefetch: int = 4  # batches each worker prepares ahead
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be 0 or more, got {self.workers}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass(frozen=True)
class EmbedResult:
    space: str
    rank_shards: int  # shards this rank is responsible for
    written: tuple[str, ...]  # shards this run wrote
    already_done: int
    samples: int  # rows embedded by this run
    invalid: dict[str, int]  # rows that could not be decoded, by reason
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


# --- naming -----------------------------------------------------------------------------------------------------------
def pretrained_tag(checkpoint_id: str) -> str | None:
    return checkpoint_id.split(":", 1)[1] if checkpoint_id.startswith("pretrained:") else None


def score_column(model: str, checkpoint_id: str) -> str:
    """DataComp's column name where the model is one DataComp scored with, else ``clip_score``."""
    return DATACOMP_SCORE_COLUMNS.get((model, pretrained_tag(checkpoint_id) or ""), GENERIC_SCORE_COLUMN)


def default_space(model: str, checkpoint_id: str) -> str:
    """``ViT-B-32__openai``, ``datafilter-scorer-vit__<12 hex of the checkpoint>``, or ``NAME__random0``."""
    kind, _, rest = checkpoint_id.partition(":")
    if kind == "pretrained":
        return space_name(model, rest)
    if kind == "random":
        return space_name(model, f"random{rest}")
    return space_name(model, checkpoint_id[:12])


def space_info(model: LoadedModel) -> SpaceInfo:
    return SpaceInfo(model.name, model.checkpoint_id, model.embed_dim, score_column(model.name, model.checkpoint_id))


def resolve_spec(model: str | None, pretrained: str | None = None, checkpoint: str | None = None,
                 pool: Pool | None = None) -> ModelSpec:
    """The model the user asked for; with no name, the project's offline scorer (for ``pool``, when given: see
    ``datafilter.embed.choice``)."""
    if model:
        if not (pretrained or checkpoint):
            raise ValueError(f"--model {model} needs --pretrained TAG or --checkpoint PATH (random weights would "
                             f"give meaningless CLIP scores)")
        return ModelSpec(model, pretrained=pretrained, checkpoint=checkpoint)
    if pretrained or checkpoint:
        raise ValueError("--pretrained and --checkpoint need --model (the open_clip architecture they belong to)")
    if pool is not None:
        from datafilter.embed.choice import offline_scorer

        return offline_scorer(pool)
    from datafilter.train.scorer import default_scorer_spec

    return default_scorer_spec()


# --- batches ----------------------------------------------------------------------------------------------------------
Reader = Callable[[Any], Iterator[tuple[int, bytes, Any]]]


class BatchStream(IterableDataset):
    """Decoded batches from a list of parts (pool shards, reference tars), split over DataLoader workers by part.

    Each yielded dict has ``part`` (index into ``parts``), ``rows``, ``valid``, ``images`` (valid rows only),
    ``reasons`` (one per invalid row), ``payload`` (token tensor for captions, label tensor for classes), ``end``
    (last batch of the part) and ``error`` (a structural problem with the part; its earlier batches must be
    discarded).
    """

    def __init__(self, parts: Sequence[Any], read: Reader, decoder: ImageDecoder, batch_size: int,
                 tokenizer: Callable | None):
        self.parts = list(parts)
        self.read = read
        self.decoder = decoder
        self.batch_size = batch_size
        self.tokenizer = tokenizer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for index in range(wid, len(self.parts), nw):
            yield from self._part(index)

    def _part(self, index: int) -> Iterator[dict[str, Any]]:
        chunk: list[tuple[int, bytes, Any]] = []
        try:
            for item in self.read(self.parts[index]):
                chunk.append(item)
                if len(chunk) == self.batch_size:
                    yield self._batch(index, chunk)
                    chunk = []
        except (PoolError, OSError, ValueError) as exc:
            msg = str(exc) if isinstance(exc, PoolError) else f"{type(exc).__name__}: {exc}"
            yield {"part": index, "error": msg, "end": True}
            return
        out = self._batch(index, chunk)
        out["end"] = True
        yield out

    def _batch(self, index: int, chunk: list[tuple[int, bytes, Any]]) -> dict[str, Any]:
        images, valid, reasons = [], [], []
        for _, data, _ in chunk:
            try:
                images.append(self.decoder(data))
                valid.append(True)
            except SkipSample as exc:
                valid.append(False)
                reasons.append(exc.reason)
            except Exception as exc:  # web images break decoders in ways no list of exceptions covers
                valid.append(False)
                reasons.append(f"decode_error:{type(exc).__name__}")
        extras = [x for _, _, x in chunk]
        if self.tokenizer is not None:
            payload = self.tokenizer(extras) if extras else torch.empty((0, 0), dtype=torch.long)
        else:
            payload = torch.tensor(extras, dtype=torch.long)
        return {"part": index, "rows": torch.tensor([r for r, _, _ in chunk], dtype=torch.long),
                "valid": torch.tensor(valid, dtype=torch.bool), "images": self.decoder.stack(images),
                "reasons": reasons, "payload": payload, "end": False, "error": ""}


def _in_thread(stream: Iterable[dict[str, Any]], depth: int, pin: bool) -> Iterator[dict[str, Any]]:
    """Produce batches in a background thread: decoding (which releases the GIL in Pillow) overlaps the model's
    forward pass without a second process, the better choice when there is no core to spare for one."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in stream:
                if pin and not batch.get("error"):
                    batch["images"], batch["payload"] = batch["images"].pin_memory(), batch["payload"].pin_memory()
                if not put(batch):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    thread = threading.Thread(target=produce, name="embed-decode", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _worker_init(_: int) -> None:
    # Decoders are single-threaded; intra-op threads here would only compete with the model for cores.
    torch.set_num_threads(1)


# --- the model side ---------------------------------------------------------------------------------------------------
class Embedder:
    """Runs a loaded model's towers on batches from ``BatchStream``, on its device, in the configured precision."""

    def __init__(self, model: LoadedModel, cfg: EmbedConfig):
        self.model = model
        self.cfg = cfg
        self.device = model.device
        self.decoder = ImageDecoder(model.preprocess, model.image_size)
        self.normalise = self.decoder.normaliser(self.device)
        precision = cfg.precision
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def loader(self, parts: Sequence[Any], read: Reader, captions: bool) -> Iterable[dict[str, Any]]:
        """Batches of ``parts``: from worker processes, or with ``workers=0`` from a thread of this process."""
        stream = BatchStream(parts, read, self.decoder, self.cfg.batch_size, self.model.tokenizer if captions else None)
        workers = min(self.cfg.workers, len(parts))
        pin = self.device.type == "cuda"
        if workers == 0:
            return _in_thread(stream, self.cfg.prefetch, pin)
        return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin, worker_init_fn=_worker_init,
                          prefetch_factor=self.cfg.prefetch)

    def autocast(self):
        """The configured mixed precision (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings on the CPU."""
        if len(images) == 0:
            return torch.empty((0, self.model.embed_dim))
        with self.autocast():
            out = self.model.model.encode_image(self.normalise(images))
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu()

    @torch.inference_mode()
    def texts(self, tokens: torch.Tensor) -> torch.Tensor:
        if len(tokens) == 0:
            return torch.empty((0, self.model.embed_dim))
        with self.autocast():
            out = self.model.model.encode_text(tokens.to(self.device, non_blocking=True))
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu()


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int | None, workers: int) -> Iterator[None]:
    """Set the main process's intra-op threads for the run (CPU only) and restore them after.

    The default leaves a core to each decoding worker, or to the decoding thread when there are none: threads that
    compete for cores slow every operation down, far more than the one thread given up costs.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, free_cores() - max(1, workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- embedding a pool -------------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    """One shard being assembled in the main process."""

    shard: Shard
    image: np.ndarray
    text: np.ndarray
    valid: np.ndarray
    seen: np.ndarray
    invalid: Counter = field(default_factory=Counter)

    @classmethod
    def new(cls, shard: Shard, dim: int) -> "_Pending":
        n = shard.num_samples
        return cls(shard, np.full((n, dim), np.nan, np.float32), np.full((n, dim), np.nan, np.float32),
                   np.zeros(n, bool), np.zeros(n, bool))


def embed_pool(pool: Pool | str, model: LoadedModel, space: str | None = None, cfg: EmbedConfig = EmbedConfig(),
               env: LaunchEnv | None = None) -> EmbedResult:
    """Embed this rank's unfinished shards of ``pool`` with ``model`` into ``POOL/embeddings/SPACE``.

    Resumable: finished shards (scores parquet present) are skipped. Raises ``EmbeddingError`` after all other
    shards are written if any shard could not be read.
    """
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    env = env or launch_env()
    space = space or default_space(model.name, model.checkpoint_id)
    store = EmbeddingStore(pool, space)
    store.init(space_info(model))
    mine = env.take(list(pool.shards))
    todo = [s for s in mine if not store.done(s)]
    already_done = len(mine) - len(todo)
    if already_done:
        log.info("%s: %d of %d shards of rank %d already embedded", space, already_done, len(mine), env.rank)
    t0 = time.perf_counter()
    written: list[str] = []
    invalid: Counter = Counter()
    failures: dict[str, str] = {}
    samples = 0
    for shard in [s for s in todo if s.num_samples == 0]:
        _write(store, _Pending.new(shard, model.embed_dim))
        written.append(shard.name)
    todo = [s for s in todo if s.num_samples > 0]
    embedder = Embedder(model, cfg)
    with cpu_threads(embedder.device, cfg.threads, min(cfg.workers, len(todo))):
        pending: dict[int, _Pending] = {}
        bar = tqdm(total=sum(s.num_samples for s in todo), desc=f"embed {space}", unit="sample", unit_scale=True,
                   disable=not cfg.progress or not todo, smoothing=0.1)
        try:
            for batch in (embedder.loader(todo, pool_shard_rows, captions=True) if todo else ()):
                shard = todo[batch["part"]]
                if batch["error"]:
                    pending.pop(batch["part"], None)
                    failures[shard.name] = batch["error"]
                    log.error("shard %s not embedded: %s", shard.name, batch["error"])
                    continue
                p = pending.setdefault(batch["part"], _Pending.new(shard, model.embed_dim))
                rows, valid = batch["rows"].numpy(), batch["valid"].numpy()
                if len(rows):
                    p.text[rows] = embedder.texts(batch["payload"]).numpy()
                    p.image[rows[valid]] = embedder.images(batch["images"]).numpy()
                    p.valid[rows] = valid
                    p.seen[rows] = True
                    p.invalid.update(batch["reasons"])
                    bar.update(len(rows))
                if batch["end"]:
                    del pending[batch["part"]]
                    if not p.seen.all():
                        failures[shard.name] = (f"{shard.tar}: {int((~p.seen).sum())} of {shard.num_samples} rows "
                                                f"of {shard.parquet.name} not found in the tar")
                        log.error("shard %s not embedded: %s", shard.name, failures[shard.name])
                        continue
                    _write(store, p)
                    written.append(shard.name)
                    samples += shard.num_samples
                    invalid.update(p.invalid)
        finally:
            bar.close()
    seconds = time.perf_counter() - t0
    result = EmbedResult(space, len(mine), tuple(written), already_done, samples, dict(invalid), seconds)
    if failures:
        lines = "\n".join(f"  {name}: {msg}" for name, msg in sorted(failures.items()))
        raise EmbeddingError(f"{len(failures)} shard(s) of {pool.path} could not be embedded (the other "
                             f"{len(written)} were written and are kept):\n{lines}")
    log.info("%s: embedded %d samples in %d shards (%.0f samples/s); %d invalid %s", space, samples, len(written),
             result.samples_per_s, sum(invalid.values()), dict(invalid) or "")
    return result


def _write(store: EmbeddingStore, p: _Pending) -> None:
    n = p.shard.num_samples
    uids = pq.read_table(p.shard.parquet, columns=["uid"]).column("uid").to_pylist() if n else []
    stats = {"rows": n, "valid": int(p.valid.sum()), "invalid": dict(sorted(p.invalid.items()))}
    store.write_shard(p.shard, uids, p.image, p.text, p.valid, stats=stats)
