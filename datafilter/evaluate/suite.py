"""Evaluation suites: a ``suite.json`` listing tasks, each a folder in CLIP_benchmark's webdataset layout.

``SUITE_DIR/suite.json``::

    {"name": "micro", "version": "1",
     "tasks": [{"name": "concepts", "type": "classification", "group": "imagenet", "metric": "acc1",
                "path": "concepts"}, ...],
     "reference_sets": {...}}

A task folder (``path`` is relative to the suite folder, or absolute, so DataComp's 38 tasks in local copies can be
listed the same way) holds::

    classnames.txt                               one class name per line (classification)
    zeroshot_classification_templates.txt        one prompt per line, ``{c}`` marks the class name (classification)
    test/nshards.txt, test/0.tar, test/1.tar...  samples KEY.{png,webp,jpg} + KEY.cls (class index) for
                                                 classification, or + KEY.txt (captions, one per line) for retrieval

``group`` places a task in one of DataComp's table columns (``imagenet``, ``imagenet_shift``, ``vtab``,
``retrieval``) or none (``null``: counted in the overall average only, as DataComp's other 18 tasks are).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from datafilter.common.files import read_json, sha256_file
from datafilter.pool.format import IMAGE_EXTS
from datafilter.pool.tario import TarError, image_of, tar_samples

SUITE_FILE = "suite.json"
TASK_TYPES = ("classification", "retrieval")
METRICS = {"classification": ("acc1", "mean_per_class_recall"), "retrieval": ("mean_recall@1",)}
# DataComp's table columns, in table order.
GROUPS = {"imagenet": "ImageNet", "imagenet_shift": "ImageNet dist. shift", "vtab": "VTAB", "retrieval": "Retrieval"}


class SuiteError(ValueError):
    """A suite or task folder that does not follow the layout; the message names the file."""


def webdataset_shards(folder: Path, what: str) -> list[Path]:
    """The shards ``0.tar``, ``1.tar``, ... that ``folder/nshards.txt`` announces (CLIP_benchmark's webdataset
    layout, used by tasks and reference sets alike), each checked to exist; ``what`` names the owner in errors."""
    n_file = folder / "nshards.txt"
    if not n_file.is_file():
        raise SuiteError(f"{what}: {n_file} missing (CLIP_benchmark layout: nshards.txt and 0.tar, 1.tar, ...)")
    try:
        n = int(n_file.read_text().strip())
    except ValueError:
        raise SuiteError(f"{n_file}: expected a shard count, found {n_file.read_text()[:40]!r}") from None
    shards = [folder / f"{i}.tar" for i in range(n)]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise SuiteError(f"{what}: {missing[0]} missing ({n_file} says {n} shards)")
    return shards


@dataclass(frozen=True)
class Task:
    name: str
    type: str
    metric: str
    path: Path
    group: str | None = None
    split: str = "test"

    @property
    def split_dir(self) -> Path:
        return self.path / self.split

    def classnames(self) -> list[str]:
        return _lines(self.path / "classnames.txt")

    def templates(self) -> list[str]:
        path = self.path / "zeroshot_classification_templates.txt"
        templates = _lines(path)
        bad = [t for t in templates if "{c}" not in t]
        if bad:
            raise SuiteError(f"{path}: template {bad[0]!r} has no '{{c}}' for the class name")
        return templates

    def shards(self) -> list[Path]:
        return webdataset_shards(self.split_dir, f"task {self.name}")

    def samples(self) -> Iterator[tuple[str, bytes, dict[str, bytes]]]:
        """(key, image bytes, other members by extension) for every sample, in shard order."""
        for shard in self.shards():
            try:
                for key, files in tar_samples(shard):
                    image = image_of(files)
                    if image is None:
                        raise SuiteError(f"{shard}: sample {key} has no image ({', '.join(IMAGE_EXTS)})")
                    yield key, image, files
            except TarError as exc:
                raise SuiteError(str(exc)) from None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "group": self.group, "metric": self.metric,
                "path": str(self.path), "split": self.split}


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    path: Path
    tasks: tuple[Task, ...]
    suite_id: str  # sha256 of suite.json: results say exactly which definition they come from
    reference_sets: dict[str, Any] = field(default_factory=dict)

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"suite {self.name} has no task {name!r}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "path": str(self.path), "id": self.suite_id,
                "tasks": len(self.tasks)}


def load_suite(path: str | Path) -> Suite:
    """Read and check ``SUITE_DIR/suite.json`` (or the file itself); task folders are checked when evaluated."""
    path = Path(path)
    file = path / SUITE_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"suite definition not found: {file}")
    try:
        d = read_json(file)
    except ValueError as exc:
        raise SuiteError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(d, dict) or not isinstance(d.get("tasks"), list) or not d.get("name"):
        raise SuiteError(f"{file}: expected an object with 'name' and a 'tasks' list")
    tasks = []
    for i, t in enumerate(d["tasks"]):
        where = f"{file}: task {i} ({t.get('name', '?') if isinstance(t, dict) else '?'})"
        if not isinstance(t, dict) or not all(k in t for k in ("name", "type", "metric", "path")):
            raise SuiteError(f"{where}: needs 'name', 'type', 'metric' and 'path'")
        if t["type"] not in TASK_TYPES:
            raise SuiteError(f"{where}: type must be one of {', '.join(TASK_TYPES)}, not {t['type']!r}")
        if t["metric"] not in METRICS[t["type"]]:
            raise SuiteError(f"{where}: metric for {t['type']} must be one of {', '.join(METRICS[t['type']])}, "
                             f"not {t['metric']!r}")
        group = t.get("group")
        if group is not None and group not in GROUPS:
            raise SuiteError(f"{where}: group must be one of {', '.join(GROUPS)} or null, not {group!r}")
        task_path = Path(t["path"])
        task_path = task_path if task_path.is_absolute() else file.parent / task_path
        tasks.append(Task(t["name"], t["type"], t["metric"], task_path, group, t.get("split", "test")))
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SuiteError(f"{file}: task names must be unique ({', '.join(dupes)} repeated)")
    return Suite(str(d["name"]), str(d.get("version", "")), file.parent, tuple(tasks), sha256_file(file),
                 dict(d.get("reference_sets") or {}))


def _lines(path: Path) -> list[str]:
    if not path.exists():
        raise SuiteError(f"{path} missing")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise SuiteError(f"{path} is empty")
    return lines
