"""``datafilter reshard POOL SUBSET --out DIR``: a subset's samples written as new WebDataset shards, as DataComp's
``resharder.py`` writes them, so the subset can feed DataComp's own training scripts (and this project's).

DataComp's semantics: every sample of the pool whose uid is in the subset is written once per time the uid is
listed (a uid listed k times is written k times, under the keys ``UID-0`` ... ``UID-{k-1}``), with all of its
files; output shards hold at most ``shard_size`` (10,000) samples and 3 GB, are named ``00000000.tar``,
``00000001.tar``, ... with ``00000000_stats.json`` (``{"successes": N}``) beside each; the subset file is copied to
``sample_ids.npy`` and ``meta.json`` records the run. Subset uids missing from the pool are counted and reported.

Beyond DataComp's: the output shards follow the pool's order in one stream, so every shard but the last is full and
a rerun writes the same bytes; each shard also gets a parquet (the pool's rows, keys renamed), which makes the
output a pool this project reads directly; and a killed run resumes after the last finished shard.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datafilter.common.files import atomic_path, read_json, sha256_file, write_json
from datafilter.pool.format import tar_member
from datafilter.pool.pool import Pool, PoolError
from datafilter.pool.uid import count_in_sorted, open_uid_file, uids_from_arrow

log = logging.getLogger(__name__)

SHARD_SIZE = 10_000  # DataComp's --shard-size default
MAX_SHARD_BYTES = 3e9  # DataComp's ShardWriter maxsize
PROGRESS = "reshard_progress.json"


def load_subset_ids(path: str | Path) -> np.ndarray:
    """A subset as DataComp's resharder reads it: an ``.npy`` of ``u8,u8``, or a raw memmap of them; sorted."""
    return np.asarray(open_uid_file(path, raw=True))


@dataclass
class _Out:
    """The output shard being written."""

    index: int
    tar: tarfile.TarFile
    tmp: Path
    rows: list[dict[str, Any]]
    bytes: int = 0


class Resharder:
    """One resharding run: ``run()`` writes the output shards, resuming after the last finished one."""

    def __init__(self, pool_dir: str | Path, subset: str | Path, out: str | Path, *, shard_size: int = SHARD_SIZE,
                 max_bytes: float = MAX_SHARD_BYTES, overwrite: bool = False, progress: bool = True):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.pool = Pool(pool_dir)
        self.subset_path = Path(subset)
        self.subset = load_subset_ids(subset)
        self._high = np.ascontiguousarray(self.subset["f0"])
        self.out = Path(out)
        self.shard_size, self.max_bytes, self.progress = shard_size, max_bytes, progress
        self.plan = {"pool": str(self.pool.path.resolve()), "pool_id": self.pool.pool_id,
                     "subset_sha256": sha256_file(self.subset_path), "shard_size": shard_size,
                     "max_bytes": max_bytes}
        self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        progress = self.out / PROGRESS
        if self.out.exists() and any(self.out.iterdir()):
            same = progress.exists() and read_json(progress).get("plan") == self.plan
            if not same and not overwrite:
                raise ValueError(f"{self.out} is not empty and holds no unfinished resharding of this pool and subset; "
                                 "pass --overwrite to replace its contents")
            if not same:
                for p in self.out.iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        if not progress.exists():
            write_json(progress, {"plan": self.plan, "shards": []})

    def _counts(self, uids: np.ndarray) -> np.ndarray:
        return count_in_sorted(self.subset, uids, self._high)

    def _stream(self, start: tuple[int, int, int]) -> Iterator[tuple[tuple[int, int, int], str, dict, dict]]:
        """``(position, key, files, row)`` for every output sample from ``start`` on; the position is
        ``(input shard, row, copy)`` of the sample after this one, where a resumed run starts."""
        from datafilter.pool.tario import TarError, tar_samples

        s0, r0, j0 = start
        for si in range(s0, len(self.pool.shards)):
            shard = self.pool.shards[si]
            table = pq.ParquetFile(shard.parquet).read()
            counts = self._counts(uids_from_arrow(table.column("uid")))
            if not counts[(r0 if si == s0 else 0):].any():
                continue  # nothing of this shard is in the subset: its tar is not read
            rows = table.to_pylist()
            row_i = -1
            try:
                for row_i, (key, files) in enumerate(tar_samples(shard.tar)):
                    if row_i >= len(rows) or rows[row_i]["key"] != key:
                        want = rows[row_i]["key"] if row_i < len(rows) else "nothing"
                        raise PoolError(f"{shard.tar}: sample {row_i} is {key!r} but {shard.parquet.name} has "
                                        f"{want!r} there; the tar and its parquet disagree")
                    if si == s0 and row_i < r0:
                        continue
                    first = j0 if (si == s0 and row_i == r0) else 0
                    for j in range(first, int(counts[row_i])):
                        nxt = (si, row_i, j + 1) if j + 1 < counts[row_i] else (si, row_i + 1, 0)
                        yield nxt, f"{rows[row_i]['uid']}-{j}", files, rows[row_i]
            except TarError as exc:
                raise PoolError(str(exc)) from None
            if row_i + 1 != len(rows):
                raise PoolError(f"{shard.tar}: {row_i + 1} samples but {len(rows)} rows in {shard.parquet.name}")

    def _open(self, index: int) -> _Out:
        tmp = self.out / f".{index:08d}.tar.partial"
        return _Out(index, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT), tmp, [])

    def _close(self, cur: _Out, position: tuple[int, int, int], state: dict) -> None:
        """Finish one output shard: tar, parquet, stats, then the progress record (a resumed run starts after)."""
        cur.tar.close()
        name = f"{cur.index:08d}"
        cur.tmp.replace(self.out / f"{name}.tar")
        with atomic_path(self.out / f"{name}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(cur.rows), tmp, compression="zstd")
        write_json(self.out / f"{name}_stats.json", {"successes": len(cur.rows), "count": len(cur.rows)})
        state["shards"].append({"name": name, "count": len(cur.rows), "bytes": cur.bytes, "next": list(position)})
        write_json(self.out / PROGRESS, state)

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        state = read_json(self.out / PROGRESS)
        done = state["shards"]
        start = tuple(done[-1]["next"]) if done else (0, 0, 0)
        for stale in self.out.glob(".*.tar.partial"):  # a shard a killed run did not finish
            stale.unlink()
        present = self._counts(self.pool.uids)
        total = int(present.sum())
        written_before = sum(d["count"] for d in done)
        cur: _Out | None = None
        position = start
        with tqdm(total=total, initial=written_before, desc="reshard", unit="sample",
                  disable=not self.progress) as bar:
            for position, key, files, row in self._stream(start):
                if cur is None:
                    cur = self._open(len(done))
                for ext, data in files.items():
                    cur.tar.addfile(tar_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
                    cur.bytes += len(data) + 1024
                cur.rows.append({**row, "key": key})
                bar.update()
                if len(cur.rows) >= self.shard_size or cur.bytes >= self.max_bytes:
                    self._close(cur, position, state)
                    cur = None
            if cur is not None and cur.rows:
                self._close(cur, position, state)
        output = sum(d["count"] for d in state["shards"])
        missing = len(self.subset) - output
        if missing > 0:
            log.warning("%d uid(s) of the subset were not found in %s", missing, self.pool.path)
        shutil.copyfile(self.subset_path, self.out / "sample_ids.npy")
        meta = {**self.plan, "subset": str(self.subset_path), "output_dir": str(self.out),
                "input_samples": self.pool.num_samples, "subset_size": int(len(self.subset)),
                "output_count": output, "missing_from_pool": int(missing),
                "output_shard_count": len(state["shards"]), "elapsed_s": round(time.perf_counter() - t0, 2)}
        write_json(self.out / "meta.json", meta)
        (self.out / PROGRESS).unlink()
        return meta


def reshard(pool_dir: str | Path, subset: str | Path, out: str | Path, **kw: Any) -> dict[str, Any]:
    """Write ``subset``'s samples of ``pool_dir`` as new shards in ``out`` (see the module docstring)."""
    return Resharder(pool_dir, subset, out, **kw).run()


# --- command line ----------------------------------------------------------------------------------------------------
DESCRIPTION = """\
Write the samples of a subset (a sorted .npy of u8,u8 uids, as `datafilter filter` writes) as new WebDataset
shards, with DataComp's resharder semantics: a uid listed k times is written k times (keys UID-0 ... UID-{k-1}),
at most --shard-size samples (and 3 GB) per shard, named 00000000.tar ... with NNNNNNNN_stats.json, plus
sample_ids.npy and meta.json. The output also has a parquet per shard, so it is a pool too. A killed run resumes.

example:
  datafilter reshard work/pools/mypool work/subsets/clip30.npy --out work/resharded/clip30
"""


def register(commands) -> None:
    p = commands.command("reshard", "write a subset's samples as new shards (DataComp's resharder semantics)",
                         DESCRIPTION)
    p.add_argument("pool_dir", help="pool directory")
    p.add_argument("subset", help="subset file (.npy of u8,u8 uids, sorted; repeats allowed)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="samples per output shard (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace what the output directory holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    meta = reshard(args.pool_dir, args.subset, args.out, shard_size=args.shard_size, overwrite=args.overwrite,
                   progress=not args.no_progress)
    print(json.dumps({k: meta[k] for k in ("output_count", "output_shard_count", "missing_from_pool",
                                           "elapsed_s")}))
    print(f"wrote {meta['output_shard_count']} shard(s) to {args.out}")
    return 0
