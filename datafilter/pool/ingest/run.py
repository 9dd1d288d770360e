"""The ingest orchestrator: read the source, plan shards, check the output holds this job (or nothing), run jobs.

Layout of the output's bookkeeping folder ``_ingest/``:
  - ``job.json``: source kind, options and a hash of the planned items; a rerun with anything different refuses.
  - ``plan.parquet``: every input item with the shard it belongs to (what a shard job will read, for inspection).
  - ``download/`` (URL sources): img2dataset's staging output, removed once every shard is indexed.
Shards whose ``_stats.json`` exists are finished and never redone, so a killed ingest resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datafilter.common.executor import ShardJob, run_shard_jobs
from datafilter.common.files import atomic_path, read_json, sha256_file, stable_hash, write_json
from datafilter.common.launch import launch_env
from datafilter.pool.format import CORE_COLUMNS, printable_name, shard_name, shard_paths
from datafilter.pool.ingest.config import IngestConfig, IngestError
from datafilter.pool.ingest.jobs import FilesShard, TarShard, backup_tar, index_tar_shard, ingest_files_shard
from datafilter.pool.ingest.readers import read_folder, read_image_table, read_url_table

log = logging.getLogger(__name__)

STATE_DIR = "_ingest"


def default_out(source: Path) -> Path:
    """Where a pool goes when no ``--out`` is given: ``./work/pools/<source name>``."""
    return Path("work") / "pools" / (source.stem if source.is_file() else source.resolve().name)


def _items_hash(items: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps(it, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


class JobState:
    """``_ingest/job.json``: claims an output directory for one job, so reruns resume it and other jobs are refused."""

    def __init__(self, out: Path, source: Path, cfg: IngestConfig, content_hash: str, extra: dict[str, Any]):
        self.dir = out / STATE_DIR
        self.path = self.dir / "job.json"
        self.record = {
            "kind": cfg.kind,
            "source": str(source.resolve()),
            "options": cfg.fingerprint_fields(),
            "content": content_hash,
            **extra,
        }
        self.record["fingerprint"] = stable_hash({k: self.record[k] for k in ("kind", "options", "content")})

    def claim(self, out: Path, in_place: bool = False) -> bool:
        """Record the job, or check the recorded one is this one. Returns whether it was already complete."""
        if self.path.exists():
            old = read_json(self.path)
            if old.get("fingerprint") != self.record["fingerprint"]:
                raise IngestError(self._difference(old))
            return bool(old.get("complete"))
        if not in_place and out.exists() and any(p.suffix in (".tar", ".parquet") for p in out.iterdir()):
            raise IngestError(f"{out} already holds shards that are not from this ingest; choose an empty --out")
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {**self.record, "complete": False})
        return False

    def _difference(self, old: dict[str, Any]) -> str:
        what = []
        if old.get("kind") != self.record["kind"]:
            what.append(f"source kind {old.get('kind')} -> {self.record['kind']}")
        old_opts = old.get("options", {})
        for k, v in self.record["options"].items():
            if old_opts.get(k) != json.loads(json.dumps(v, default=str)):
                what.append(f"{k} {old_opts.get(k)!r} -> {v!r}")
        if old.get("content") != self.record["content"]:
            what.append("the source's contents changed")
        return (f"{self.path.parent.parent} holds a different ingest ({'; '.join(what) or 'fingerprint differs'}); "
                f"rerun with the original source and options to resume it, or choose another --out")

    def complete(self) -> None:
        write_json(self.path, {**self.record, "complete": True})


def _save_plan(state: JobState, items: list[dict[str, Any]], shard_of: list[str]) -> None:
    path = state.dir / "plan.parquet"
    if path.exists():
        return
    cols: dict[str, list[Any]] = {"shard": shard_of}
    for name in ("path", "caption", "skip"):
        cols[name] = [None if it.get(name) is None else printable_name(str(it.get(name))) for it in items]
    if any("fields" in it for it in items):
        cols["fields"] = [json.dumps(it.get("fields") or {}, default=str) for it in items]
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(cols), tmp, compression="zstd")


def _ingest_files(source: Path, out: Path, cfg: IngestConfig) -> None:
    if cfg.kind == "folder":
        if not source.is_dir():
            raise IngestError(f"{source}: not a folder (folder sources are directories of images)")
        items, root = read_folder(source), source
    else:
        items, root = read_image_table(source, cfg), source.parent
    n_shards = (len(items) + cfg.shard_size - 1) // cfg.shard_size
    state = JobState(out, source, cfg, _items_hash(items), {"items": len(items), "shards": n_shards})
    if state.claim(out):
        log.info("%s: ingest already complete", out)
        return
    shard_of = [shard_name(i // cfg.shard_size) for i in range(len(items))]
    _save_plan(state, items, shard_of)
    jobs = []
    for i in range(n_shards):
        name = shard_name(i)
        payload = FilesShard(cfg.kind, root.resolve(), out, i, items[i * cfg.shard_size:(i + 1) * cfg.shard_size],
                             cfg.image, cfg.caption, cfg.max_file_bytes)
        jobs.append(ShardJob(name, shard_paths(out, name)[2], payload))
    run_shard_jobs(jobs, ingest_files_shard, workers=cfg.workers, desc=f"ingest {cfg.kind}")
    if all(j.done for j in jobs):  # other launch ranks may still be writing theirs
        state.complete()


# --- existing shards --------------------------------------------------------------------------------------------------
def _is_ours_stats(path: Path) -> bool:
    try:
        return "format_version" in read_json(path)
    except (OSError, ValueError):
        return False


def _is_ours_parquet(path: Path) -> bool:
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowException):
        return False
    return tuple(names[:len(CORE_COLUMNS)]) == CORE_COLUMNS


def _move_aside_producer_files(source: Path, stem: str) -> None:
    """In place, the producer's ``NAME.parquet`` and ``NAME_stats.json`` would be clobbered by ours (and its stats
    would look like our completion marker): keep them as ``NAME.source.parquet`` and ``NAME.source_stats.json``.
    Parquet goes first, stats last, so a kill in between is finished by the next run.
    """
    _, parquet, stats = shard_paths(source, stem)
    if parquet.exists() and not _is_ours_parquet(parquet) and not (source / f"{stem}.source.parquet").exists():
        parquet.rename(source / f"{stem}.source.parquet")
    if stats.exists() and not _is_ours_stats(stats):
        stats.rename(source / f"{stem}.source_stats.json")


def _tar_jobs(source: Path, out: Path, cfg: IngestConfig, duplicate_rows: frozenset[int] = frozenset()
              ) -> list[ShardJob]:
    tars = sorted(p for p in source.glob("*.tar") if not p.name.endswith(".source.tar"))
    if not tars:
        raise IngestError(f"{source}: no *.tar shards found")
    in_place = source.resolve() == out.resolve()
    if in_place:
        bad = [t.name for t in tars if not t.stem.isdigit()]
        if bad:
            raise IngestError(f"{source}: in-place indexing needs numbered shards (NNNNNNNN.tar), found {bad[0]}; "
                              f"index into another folder with --out instead")
    all_digits = all(t.stem.isdigit() for t in tars)
    jobs = []
    for i, tar in enumerate(tars):
        name = tar.stem if all_digits else shard_name(i)
        if in_place:
            _move_aside_producer_files(source, tar.stem)
            own = source / f"{tar.stem}.source.parquet"
        else:
            own = source / f"{tar.stem}.parquet"
        payload = TarShard(tar, own if own.exists() else None, out, name, cfg.image, cfg.caption,
                           cfg.max_file_bytes, duplicate_rows)
        jobs.append(ShardJob(name, shard_paths(out, name)[2], payload))
    return jobs


def _ingest_shards(source: Path, out: Path, cfg: IngestConfig) -> None:
    if not source.is_dir():
        raise IngestError(f"{source}: not a folder (shard sources are directories of *.tar)")
    # names only: an in-place rewrite changes sizes, and the rerun must still recognise its own job
    listing = sorted(p.name for p in source.glob("*.tar") if not p.name.endswith(".source.tar"))
    state = JobState(out, source, cfg, stable_hash(listing), {"shards": len(listing)})
    if state.claim(out, in_place=source.resolve() == out.resolve()):
        log.info("%s: indexing already complete", out)
        return
    out.mkdir(parents=True, exist_ok=True)
    jobs = _tar_jobs(source, out, cfg)
    run_shard_jobs(jobs, index_tar_shard, workers=cfg.workers, desc="index shards")
    _drop_backups(jobs)
    if all(j.done for j in jobs):  # other launch ranks may still be writing theirs
        state.complete()


def _drop_backups(jobs: list[ShardJob]) -> None:
    """Originals kept during in-place rewrites are no longer needed once their shard is complete."""
    for job in jobs:
        backup = backup_tar(job.payload.source_tar)
        if job.done and backup.exists():
            backup.unlink()


# --- URL tables -------------------------------------------------------------------------------------------------------
_RESERVED = {"url", "caption", "key", "status", "error_message", "width", "height", "original_width",
             "original_height", "exif", "sha256", "datafilter_row"}


def _ingest_urls(source: Path, out: Path, cfg: IngestConfig) -> None:
    if launch_env().distributed:
        raise IngestError("URL ingest runs img2dataset, which spreads the downloads over processes itself; "
                          "start it as a single process (no torchrun/srun), with --workers processes")
    table, duplicates = read_url_table(source, cfg)
    state = JobState(out, source, cfg, sha256_file(source)[:16], {"items": table.num_rows})
    if state.claim(out):
        log.info("%s: ingest already complete", out)
        return
    staging = state.dir / "download"
    shards_dir = staging / "shards"
    input_path = staging / "input.parquet"
    staging.mkdir(parents=True, exist_ok=True)
    extra = [c for c in table.column_names if c not in (cfg.url_col, cfg.caption_col) and c not in _RESERVED]
    if not input_path.exists():
        urls = pa.array([None if u is None else str(u) for u in table.column(cfg.url_col).to_pylist()], pa.string())
        dl = pa.table({"url": urls, "caption": table.column(cfg.caption_col),
                       "datafilter_row": pa.array(range(table.num_rows), pa.int64()),
                       **{c: table.column(c) for c in extra}})
        with atomic_path(input_path) as tmp:
            pq.write_table(dl, tmp)
    _download(input_path, shards_dir, cfg, ["datafilter_row", *extra])
    jobs = _tar_jobs(shards_dir, out, cfg, frozenset(duplicates))
    run_shard_jobs(jobs, index_tar_shard, workers=cfg.workers, desc="index downloads")
    if all(j.done for j in jobs):
        state.complete()  # first: a kill before the clean-up must not cost a second download
        shutil.rmtree(staging, ignore_errors=True)


def _download(input_path: Path, shards_dir: Path, cfg: IngestConfig, keep_columns: list[str]) -> None:
    """Delegate fetching to img2dataset: it resizes to our maximum side (never up) and encodes as we store images.

    Its incremental mode skips shards it finished before, so a killed download resumes too.
    """
    # albumentations (imported by img2dataset) otherwise asks the network for a newer version of itself
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    shards_dir.mkdir(parents=True, exist_ok=True)
    img2dataset.download(
        url_list=str(input_path),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=keep_columns,
        output_folder=str(shards_dir),
        output_format="webdataset",
        image_size=cfg.image.max_side,
        resize_mode="keep_ratio_largest",
        resize_only_if_bigger=True,
        downscale_interpolation="area",
        encode_format=cfg.image.encode_format,
        encode_quality=cfg.image.quality,
        processes_count=cfg.workers,
        thread_count=cfg.threads,
        number_sample_per_shard=cfg.shard_size,
        oom_shard_count=8,
        timeout=cfg.timeout,
        retries=0,
        extract_exif=False,
        compute_hash="sha256",
        enable_wandb=False,
        incremental_mode="incremental",
    )


def ingest(source: str | Path, out: str | Path | None, cfg: IngestConfig) -> Path:
    """Ingest ``source`` into the pool directory ``out`` (shards: default in place); returns the pool directory."""
    source = Path(source)
    if out is None:
        out = source if cfg.kind == "shards" else default_out(source)
    out = Path(out)
    if cfg.kind == "shards":
        _ingest_shards(source, out, cfg)
    elif cfg.kind == "urls":
        _ingest_urls(source, out, cfg)
    else:
        _ingest_files(source, out, cfg)
    if read_json(out / STATE_DIR / "job.json").get("complete"):
        _warn_duplicate_uids(out)
    return out


def _warn_duplicate_uids(out: Path) -> None:
    """Shard jobs skip uids repeated within a shard; repeats across shards (a producer's uid in two shards, or a
    table's uid column) can only be seen once the pool is complete. They are reported, not removed."""
    from datafilter.pool.pool import Pool
    from datafilter.pool.uid import sort_uids

    uids = sort_uids(Pool(out).uids)
    repeats = int(np.count_nonzero(uids[1:] == uids[:-1])) if len(uids) > 1 else 0
    if repeats:
        log.warning("%s: %d sample(s) repeat the uid of an earlier sample in another shard; subsets select by uid, "
                    "so deduplicate the source or drop its uids", out, repeats)

