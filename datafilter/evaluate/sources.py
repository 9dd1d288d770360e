"""Where a task's samples come from: one class per storage format, found through ``FORMATS``.

A source lists its task's data ``files`` (what a decoded copy of the task is keyed by), cuts its task into ``parts``
(picklable, so decoding workers can each read their own) and reads a part as ``Record``s: the sample's image bytes
(several for WinoGAViL) and its other fields, raw. What the fields mean is the task kind's business
(``datafilter.evaluate.kinds``). Nothing is read whole into memory: tars stream from disk, Hugging Face arrow files
are memory-mapped and read a block of rows at a time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from datafilter.evaluate.suite import SuiteError, webdataset_shards
from datafilter.pool.format import IMAGE_EXTS
from datafilter.pool.tario import TarError, tar_samples

# CLIP_benchmark's image extensions, in the order its webdataset reader picks one.
WDS_IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")


@dataclass
class Record:
    key: str
    images: list[bytes]
    fields: dict[str, Any]


# --- CLIP_benchmark's webdataset layout --------------------------------------------------------------------------------
class WdsSource:
    """Tars ``0.tar ... N-1.tar`` of ``TASK/test``; one part per (tar, slot), so that a task stored in fewer tars
    than there are workers is still decoded by all of them (each reads the tar and decodes every ``slots``-th
    block)."""

    name = "wds"
    types = ("classification", "retrieval")
    decode = "rgb"  # webdataset's ImageHandler("pil") converts every image to RGB before the model's transform

    def __init__(self, task):
        self.task = task

    def files(self) -> list[Path]:
        return webdataset_shards(self.task.split_dir, f"task {self.task.name}")

    def check(self) -> None:
        if not self.task.path.is_dir():
            raise SuiteError(f"task folder {self.task.path} not found")
        for tar in self.files():
            size = tar.stat().st_size
            if size == 0 or size % 512:
                raise SuiteError(f"{tar}: truncated tar ({size:,} bytes, not a whole number of 512-byte blocks)")
        if self.task.type == "retrieval":
            kind = self.dataset_type()
            if kind not in (None, "retrieval"):
                raise SuiteError(f"{self.task.path / 'dataset_type.txt'} says {kind!r}, but the task is retrieval")

    def dataset_type(self) -> str | None:
        f = self.task.path / "dataset_type.txt"
        return f.read_text().strip().lower() if f.is_file() else None

    def parts(self, workers: int) -> list[tuple[int, int, int]]:
        shards = self.files()
        slots = max(1, workers // len(shards)) if shards else 1
        return [(i, s, slots) for i in range(len(shards)) for s in range(slots)]

    def read(self, part: tuple[int, int, int], block: int) -> Iterator[tuple[int, Record]]:
        """(index within the tar, record) of this part's samples: blocks of ``block`` samples, every ``slots``-th."""
        shard, slot, slots = part
        tar = self.task.split_dir / f"{shard}.tar"
        try:
            for i, (key, files) in enumerate(tar_samples(tar)):
                if (i // block) % slots != slot:
                    continue
                ext = next((e for e in WDS_IMAGE_EXTS if e in files), None)
                if ext is None:
                    other = next((e for e in IMAGE_EXTS if e in files), None)
                    hint = f" (.{other} is not one CLIP_benchmark reads)" if other else ""
                    raise SuiteError(f"{tar}: sample {key} has no image ({', '.join(WDS_IMAGE_EXTS)}){hint}")
                yield i, Record(key, [files.pop(ext)], files)
        except TarError as exc:
            raise SuiteError(str(exc)) from None


# --- a Hugging Face datasets cache -------------------------------------------------------------------------------------
_SPLIT_FILE = r"^(?P<builder>.+)-{split}(?:-(?P<i>\d{{5}})-of-(?P<n>\d{{5}}))?\.arrow$"


def cached_roots(cache: Path, dataset: str) -> list[Path]:
    """The folders of ``cache`` that hold preparations of hub dataset ``dataset`` (see ``find_cached_split``)."""
    owner, _, name = dataset.partition("/")
    roots = [cache / f"{owner}___{name}"] + sorted(cache.glob(f"*/{owner}--{name}*"))
    return [r for r in roots if r.is_dir()]


def find_cached_split(cache: Path, dataset: str, split: str) -> list[Path]:
    """The arrow files of ``split`` of hub dataset ``dataset`` (``owner/name``) prepared in the ``datasets`` cache
    ``cache``, in shard order; the newest complete preparation where there are several. Raises ``SuiteError``
    saying what is there instead.

    ``datasets`` keeps a prepared dataset under ``CACHE/OWNER___NAME/CONFIG/VERSION/HASH/`` (older releases, for
    hub datasets without a loading script, under ``CACHE/parquet/OWNER--NAME-HASH/...``), one ``BUILDER-SPLIT.arrow``
    per split or ``BUILDER-SPLIT-00000-of-00004.arrow`` shards.
    """
    owner, _, name = dataset.partition("/")
    roots = cached_roots(cache, dataset)
    if not roots:
        raise SuiteError(f"Hugging Face dataset {dataset} not found in {cache} (expected {owner}___{name}/; "
                         f"`datafilter suite datacomp DATA_DIR --download` or DataComp's download_evalsets.py "
                         f"fetches it)")
    pattern = re.compile(_SPLIT_FILE.format(split=re.escape(split)))
    versions: dict[Path, list[tuple[int, int, Path]]] = {}
    other_splits: set[str] = set()
    for root in roots:
        for f in root.rglob("*.arrow"):
            m = pattern.match(f.name)
            if m:
                versions.setdefault(f.parent, []).append((int(m["i"] or 0), int(m["n"] or 1), f))
            elif "-" in f.stem:
                other_splits.add(re.sub(r"-\d{5}-of-\d{5}$", "", f.stem).rsplit("-", 1)[-1])
    complete = {d: sorted(fs) for d, fs in versions.items() if sorted(i for i, _, _ in fs) == list(range(fs[0][1]))}
    if not complete:
        found = f"; it has {', '.join(sorted(other_splits))}" if other_splits else ""
        if versions:
            found = f"; its {split!r} arrow shards are incomplete in {', '.join(map(str, versions))}"
        raise SuiteError(f"Hugging Face dataset {dataset} in {cache} has no complete {split!r} split{found}")
    newest = max(complete, key=lambda d: max(f.stat().st_mtime for _, _, f in complete[d]))
    return [f for _, _, f in complete[newest]]


def _expected_rows(files: list[Path], split: str) -> int | None:
    info = files[0].parent / "dataset_info.json"
    try:
        return int(json.loads(info.read_text())["splits"][split]["num_examples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


_OPEN: dict[tuple[str, ...], Any] = {}  # per process: datasets opened (memory-mapped) once, then sliced


def open_cached(files: list[Path]):
    """The arrow files as one ``datasets.Dataset`` (memory-mapped, rows returned as raw arrow values)."""
    key = tuple(map(str, files))
    if key not in _OPEN:
        import datasets

        parts = [datasets.Dataset.from_file(str(f)) for f in files]
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        _OPEN[key] = ds.with_format("arrow")
    return _OPEN[key]


class HFSource:
    """A split of a Hugging Face dataset in a local ``datasets`` cache, read offline with the ``datasets`` library.
    Parts are blocks of rows."""

    name = "hf"
    types = ("retrieval", "winogavil")
    decode = "transform"  # datasets hands open_clip the decoded image as it is; the transform converts it
    image_columns = {"retrieval": "image", "winogavil": "candidate_images"}

    def __init__(self, task):
        self.task = task

    def files(self) -> list[Path]:
        return find_cached_split(self.task.path, self.task.dataset, self.task.split)

    def check(self) -> None:
        files = self.files()
        ds = open_cached(files)
        column = self.image_columns[self.task.type]
        if column not in ds.column_names:
            raise SuiteError(f"{files[0]}: no {column!r} column (columns: {', '.join(ds.column_names)})")
        expected = _expected_rows(files, self.task.split)
        if expected is not None and expected != len(ds):
            raise SuiteError(f"{files[0].parent}: {len(ds):,} rows, but its dataset_info.json says {expected:,}")

    def parts(self, workers: int) -> list[tuple[int, int]]:
        n = len(open_cached(self.files()))
        step = 256
        return [(s, min(n, s + step)) for s in range(0, n, step)]

    def read(self, part: tuple[int, int], block: int) -> Iterator[tuple[int, Record]]:
        start, stop = part
        ds = open_cached(self.files())
        column = self.image_columns[self.task.type]
        for s in range(start, stop, block):
            rows = ds[s : min(stop, s + block)].to_pylist()
            for j, row in enumerate(rows):
                value = row.pop(column)
                images = value if isinstance(value, list) else [value]
                yield s + j, Record(str(s + j), [self._bytes(v, s + j) for v in images], row)

    def _bytes(self, value: Any, row: int) -> bytes:
        """An ``Image`` feature's stored value: its bytes, or the file it points at (``datasets`` keeps a path to
        the extracted download when a loading script yielded one)."""
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            path = value.get("path")
            if path:
                for candidate in self._candidates(path):
                    if candidate.is_file():
                        return candidate.read_bytes()
            raise SuiteError(f"{self.task.dataset} row {row}: image {path!r} neither stored nor found on disk")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        raise SuiteError(f"{self.task.dataset} row {row}: expected an image, found {type(value).__name__}")

    def _candidates(self, path: str) -> Iterator[Path]:
        p = Path(path)
        yield p if p.is_absolute() else self.task.path / p
        # a cache moved from the machine that prepared it: find the file under this cache's extracted downloads
        parts = p.parts
        if "extracted" in parts:
            tail = parts[parts.index("extracted") + 1 :]
            yield Path(self.task.path, "downloads", "extracted", *tail)


FORMATS = {s.name: s for s in (WdsSource, HFSource)}


def get_format(name: str):
    if name not in FORMATS:
        raise KeyError(f"unknown format {name!r} (one of {', '.join(FORMATS)})")
    return FORMATS[name]

