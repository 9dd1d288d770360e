"""Embed an evaluation suite's reference sets (e.g. ImageNet train) into a pool's embedding space.

The image-based filter keeps pool clusters that a reference set's images fall into, so the reference images must be
embedded by the same model as the pool. A suite lists its reference sets in ``suite.json``::

    {"reference_sets": {"imagenet_train": "imagenet/train"}}

Each entry is a folder in CLIP_benchmark's webdataset layout: ``nshards.txt`` and ``0.tar``, ``1.tar``, ... with
samples ``KEY.png|webp|jpg`` + ``KEY.cls`` (the class index). The result is
``POOL/embeddings/SPACE/reference/NAME.npy`` (float16, L2-normalised) and ``NAME_labels.npy`` (int64), row-aligned;
images that cannot be decoded are left out and counted in ``NAME.json``, with the content hash of the shards it was
made from: a set already embedded from the same images is not redone, one embedded from other images is.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from datafilter.common.files import read_json, sha256_file, stable_hash
from datafilter.embed.pipeline import EmbedConfig, Embedder, cpu_threads, default_space, space_info
from datafilter.embed.shards import reference_rows
from datafilter.embed.store import EmbeddingError, EmbeddingStore
from datafilter.evaluate.suite import SUITE_FILE, webdataset_shards
from datafilter.models import LoadedModel
from datafilter.pool.pool import Pool

log = logging.getLogger(__name__)


def suite_reference_sets(suite_dir: str | Path) -> dict[str, Path]:
    """Name -> folder of each reference set a suite declares (empty when it declares none)."""
    suite_dir = Path(suite_dir)
    path = suite_dir / SUITE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an evaluation suite folder")
    sets = read_json(path).get("reference_sets") or {}
    if not isinstance(sets, dict):
        raise ValueError(f"{path}: 'reference_sets' must map names to folders, got {type(sets).__name__}")
    return {str(name): suite_dir / rel for name, rel in sets.items()}


def reference_source_id(tars: list[Path]) -> str:
    """The content hash of a reference set's shards: an embedded set is reused only for the same images."""
    return stable_hash([sha256_file(t) for t in tars])


def embed_reference_set(store: EmbeddingStore, name: str, folder: Path, embedder: Embedder) -> Path:
    """Embed one reference set into ``store`` (skipped when the same images are already there); returns the
    embeddings file."""
    out, _, stats_path = store.reference_paths(name)
    tars = webdataset_shards(folder, f"reference set {name}")
    source_id = reference_source_id(tars)
    if store.has_reference(name):
        if stats_path.exists() and read_json(stats_path).get("source_id") == source_id:
            log.info("reference set %s already embedded in %s", name, store.space)
            return out
        log.info("reference set %s in %s was embedded from other images; embedding %s again", name, store.space,
                 folder)
    parts: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {i: [] for i in range(len(tars))}
    invalid: Counter = Counter()
    with tqdm(desc=f"reference {name}", unit="image", unit_scale=True, disable=not embedder.cfg.progress) as bar:
        for batch in embedder.loader(tars, reference_rows, captions=False):
            if batch["error"]:
                raise EmbeddingError(f"reference set {name}: {batch['error']}")
            valid = batch["valid"].numpy()
            vectors = embedder.images(batch["images"]).numpy()
            parts[batch["part"]].append((batch["rows"].numpy()[valid], vectors, batch["payload"].numpy()[valid]))
            invalid.update(batch["reasons"])
            bar.update(len(valid))
    chunks = [c for i in range(len(tars)) for c in parts[i]]  # tar order, then row order within each tar
    dim = embedder.model.embed_dim
    image = np.concatenate([c[1] for c in chunks]) if chunks else np.empty((0, dim), np.float32)
    labels = np.concatenate([c[2] for c in chunks]) if chunks else np.empty(0, np.int64)
    stats = {"source": str(folder), "source_id": source_id, "images": int(len(labels)),
             "invalid": dict(sorted(invalid.items()))}
    store.write_reference(name, image, labels, stats)
    log.info("reference set %s: %d images embedded, %d skipped %s", name, len(labels), sum(invalid.values()),
             dict(invalid) or "")
    return out


def embed_reference_sets(pool: Pool | str, model: LoadedModel, suite_dir: str | Path, space: str | None = None,
                         cfg: EmbedConfig = EmbedConfig()) -> dict[str, Path]:
    """Embed every reference set of an evaluation suite with ``model`` into the pool's space ``space``.

    The space is created, or checked to belong to the same model, exactly as for the pool's own embeddings.
    """
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    store = EmbeddingStore(pool, space or default_space(model.name, model.checkpoint_id))
    store.init(space_info(model))
    sets = suite_reference_sets(suite_dir)
    if not sets:
        log.warning("%s declares no reference sets", Path(suite_dir) / SUITE_FILE)
    embedder = Embedder(model, cfg)
    out = {}
    with cpu_threads(embedder.device, cfg.threads, cfg.workers):
        for name, folder in sets.items():
            out[name] = embed_reference_set(store, name, folder, embedder)
    return out
