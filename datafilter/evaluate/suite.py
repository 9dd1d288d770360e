"""Evaluation suites: a ``suite.json`` listing tasks, each read from a storage format that a registry names.

``SUITE_DIR/suite.json``::

    {"name": "micro", "version": "1",
     "tasks": [{"name": "concepts", "type": "classification", "group": "imagenet", "metric": "acc1",
                "path": "concepts"}, ...],
     "reference_sets": {...}}

Each task has a ``type`` (``classification``, ``retrieval``, ``winogavil``: how it is scored, ``datafilter.evaluate
.kinds``), a ``format`` (where its samples come from, ``datafilter.evaluate.sources``) and a ``metric``, its main one.
``path`` is relative to the suite folder or absolute (DataComp's tasks in local copies are listed the same way).

- ``format: wds`` (default), CLIP_benchmark's webdataset layout: ``path`` is the task folder with
  ``classnames.txt`` and ``zeroshot_classification_templates.txt`` (classification), ``dataset_type.txt``
  (``retrieval`` for retrieval tasks, as CLIP_benchmark requires), and ``test/nshards.txt``, ``test/0.tar`` ...
  with samples ``KEY.{webp,png,jpg,jpeg}`` plus ``KEY.cls`` (class index; ``KEY.npy`` metadata for grouped metrics)
  or ``KEY.txt`` (captions, one per line).
- ``format: hf``: a Hugging Face dataset in a local ``datasets`` cache: ``path`` is the cache folder (DataComp's
  ``DATA_DIR/hf_cache``) and ``dataset`` the hub id (``nlphuji/flickr_1k_test_image_text_retrieval``).

Optional keys: ``group`` (one of DataComp's table columns ``imagenet``, ``imagenet_shift``, ``vtab``,
``retrieval``, or ``null``: counted in the overall Average only), ``split`` (``test``), ``scorer`` (a classification
task's metric set, ``datafilter.evaluate.scorers``), ``decode`` (``rgb``: PIL's RGB conversion before the model's
transform, as webdataset decodes; ``white``: transparency flattened onto white; ``transform``: left to the
transform, as a Hugging Face dataset feeds open_clip), ``label`` (the name tables show), ``chance`` (the score of a
random model, where known), ``key`` and ``size`` (DataComp's task key and test-set size).
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datafilter.common.files import read_json, sha256_file
from datafilter.common.hints import did_you_mean

log = logging.getLogger(__name__)

SUITE_FILE = "suite.json"
# DataComp's table columns, in table order.
GROUPS = {"imagenet": "ImageNet", "imagenet_shift": "ImageNet dist. shift", "vtab": "VTAB", "retrieval": "Retrieval"}
DECODE_MODES = ("rgb", "white", "transform")


class SuiteError(ValueError):
    """A suite or task that does not follow the layout; the message names the file."""


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


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a class-name or template file, stripped: what CLIP_benchmark 1.4 (the version DataComp
    evaluates with) reads, so class indices follow the file's non-blank lines."""
    if not path.is_file():
        raise SuiteError(f"{path} missing")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise SuiteError(f"{path} is empty")
    return lines


def check_template(template: str, where: str) -> None:
    """A template is filled with ``str.format(c=name)``, as CLIP_benchmark fills it (``{{``/``}}`` are braces)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise SuiteError(f"{where}: template {template!r} cannot be filled ({exc}; write '{{{{' for a brace)") from None
    bad = [f for f in fields if f != "c"]
    if bad:
        raise SuiteError(f"{where}: template {template!r} has {{{bad[0]}}}; only {{c}} (the class name) is filled in")
    if not fields:
        log.warning("%s: template %r has no {c}: every class gets the same prompt from it", where, template)


@dataclass(frozen=True)
class Task:
    name: str
    type: str
    metric: str
    path: Path
    group: str | None = None
    split: str = "test"
    format: str = "wds"
    dataset: str | None = None
    scorer: str = "zeroshot"
    decode: str | None = None
    label: str | None = None
    chance: float | None = None
    key: str | None = None
    size: int | None = None

    @property
    def split_dir(self) -> Path:
        return self.path / self.split

    @property
    def display(self) -> str:
        return self.label or self.name

    @property
    def decode_mode(self) -> str:
        from datafilter.evaluate.sources import get_format

        return self.decode or get_format(self.format).decode

    def source(self):
        """The reader of this task's samples (``datafilter.evaluate.sources``)."""
        from datafilter.evaluate.sources import get_format

        return get_format(self.format)(self)

    def classnames(self) -> list[str]:
        return read_lines(self.path / "classnames.txt")

    def templates(self) -> list[str]:
        path = self.path / "zeroshot_classification_templates.txt"
        templates = read_lines(path)
        for t in templates:
            check_template(t, str(path))
        return templates

    def prompts(self, classname: str, templates: list[str]) -> list[str]:
        return [t.format(c=classname) for t in templates]

    def check(self) -> None:
        """Cheap checks before any work: the files this task needs exist. Raises ``SuiteError`` naming what is not."""
        self.source().check()
        if self.type == "classification":
            self.classnames()
            self.templates()

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "type": self.type, "group": self.group, "metric": self.metric,
             "path": str(self.path), "split": self.split, "format": self.format}
        for k in ("dataset", "label", "chance", "key", "size"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.scorer != "zeroshot":
            d["scorer"] = self.scorer
        return d


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    path: Path
    tasks: tuple[Task, ...]
    suite_id: str  # sha256 of suite.json: results say exactly which definition they come from
    reference_sets: dict[str, Any] = field(default_factory=dict)
    expected_tasks: int | None = None  # a suite of a fixed benchmark (DataComp's 38) says how many it should have

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t

        hint = did_you_mean(name, [t.name for t in self.tasks], n=3)
        raise KeyError(f"suite {self.name} has no task {name!r}{hint}")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "path": str(self.path), "id": self.suite_id,
                "tasks": len(self.tasks), "expected_tasks": self.expected_tasks or len(self.tasks)}


def results_current(results: dict[str, Any] | None, checkpoint_id: str | None, suite_id: str) -> bool:
    """Whether stored evaluation results are of this checkpoint (its sha256) on this very suite definition, so
    that they need not be computed again."""
    return bool(results) and results.get("checkpoint_id") == checkpoint_id and \
        (results.get("suite") or {}).get("id") == suite_id


def _task(t: Any, where: str, base: Path) -> Task:
    from datafilter.evaluate.kinds import get_kind
    from datafilter.evaluate.scorers import get_scorer
    from datafilter.evaluate.sources import get_format

    if not isinstance(t, dict) or not all(k in t for k in ("name", "type", "metric", "path")):
        raise SuiteError(f"{where}: needs 'name', 'type', 'metric' and 'path'")
    try:
        kind = get_kind(t["type"])
        fmt = get_format(t.get("format", "wds"))
        scorer = get_scorer(t.get("scorer", "zeroshot"))
    except KeyError as exc:
        raise SuiteError(f"{where}: {exc.args[0]}") from None
    if t["metric"] not in kind.main_metrics(scorer):
        raise SuiteError(f"{where}: metric for {t['type']} must be one of {', '.join(kind.main_metrics(scorer))}, "
                         f"not {t['metric']!r}")
    if t["type"] not in fmt.types:
        raise SuiteError(f"{where}: format {fmt.name} holds {' and '.join(fmt.types)} tasks, not {t['type']}")
    group = t.get("group")
    if group is not None and group not in GROUPS:
        raise SuiteError(f"{where}: group must be one of {', '.join(GROUPS)} or null, not {group!r}")
    if t.get("decode") is not None and t["decode"] not in DECODE_MODES:
        raise SuiteError(f"{where}: decode must be one of {', '.join(DECODE_MODES)}, not {t['decode']!r}")
    if fmt.name == "hf" and not t.get("dataset"):
        raise SuiteError(f"{where}: format hf needs 'dataset' (the hub id, e.g. nlphuji/winogavil)")
    path = Path(t["path"]).expanduser()
    return Task(str(t["name"]), t["type"], t["metric"], path if path.is_absolute() else base / path, group,
                t.get("split", "test"), fmt.name, t.get("dataset"), scorer.name, t.get("decode"), t.get("label"),
                t.get("chance"), t.get("key"), t.get("size"))


def load_suite(path: str | Path) -> Suite:
    """Read and check ``SUITE_DIR/suite.json`` (or the file itself); task data is checked when evaluated."""
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
        tasks.append(_task(t, where, file.parent))
    names = [t.name for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SuiteError(f"{file}: task names must be unique ({', '.join(dupes)} repeated)")
    return Suite(str(d["name"]), str(d.get("version", "")), file.parent, tuple(tasks), sha256_file(file),
                 dict(d.get("reference_sets") or {}), d.get("expected_tasks"))
