"""DataComp's evaluation suite from the folder DataComp's ``download_evalsets.py`` fills.

That folder holds one webdataset folder per classification task, ``DATA_DIR/wds_<task>_test`` (``<task>`` is the
task key with ``/`` as ``-`` and without the ``fairness/`` prefix), and the Hugging Face ``datasets`` cache
``DATA_DIR/hf_cache`` for Flickr, MSCOCO and WinoGAViL (hub datasets ``nlphuji/<task>``). ``build_datacomp_suite``
writes a ``suite.json`` listing all 38 tasks (``datacomp.yaml``: names, groups and main metrics as DataComp's
``tasklist.yml`` and ``aggregate_scores.py`` define them, chance levels) and says which are missing or incomplete;
evaluating it scores the tasks present and says over how many of the 38 the Average is.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from datafilter.common.files import read_yaml, write_json
from datafilter.evaluate.sources import cached_roots
from datafilter.evaluate.suite import SUITE_FILE, SuiteError, load_suite

log = logging.getLogger(__name__)

TABLE = Path(__file__).with_name("datacomp.yaml")
HF_CACHE = "hf_cache"
HF_OWNER = "nlphuji"
WDS_OWNER = "djghosh"  # the hub account DataComp's downloader fetches the webdataset folders from
SUITE_VERSION = "1"


@lru_cache(maxsize=1)
def _table() -> tuple[dict[str, Any], ...]:
    rows = read_yaml(TABLE, "DataComp task table")
    out = []
    for r in rows:
        out.append({"type": "classification", "format": "wds", "scorer": "zeroshot", "group": None, "chance": None,
                    "classes": None, **r})
    return tuple(out)


def datacomp_tasks() -> list[dict[str, Any]]:
    """DataComp's 38 tasks: key, name, group, type, format, scorer, metric, classes, chance, size."""
    return [dict(r) for r in _table()]


def wds_folder(key: str) -> str:
    task = key.split("/", 1)[1] if key.startswith("fairness/") else key
    return f"wds_{task.replace('/', '-')}_test"


def hf_dataset(key: str) -> str:
    return f"{HF_OWNER}/{key.split('/', 1)[1]}"


def _entry(t: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    e = {"name": t["key"], "label": t["name"], "key": t["key"], "type": t["type"], "group": t["group"],
         "metric": t["metric"], "format": t["format"], "size": t["size"]}
    if t["format"] == "hf":
        e.update(path=str(data_dir / HF_CACHE), dataset=hf_dataset(t["key"]))
    else:
        e["path"] = str(data_dir / wds_folder(t["key"]))
    if t["scorer"] != "zeroshot":
        e["scorer"] = t["scorer"]
    if t["chance"] is not None:
        e["chance"] = t["chance"]
    return e


def _status(task) -> tuple[str, str]:
    """``ok``, ``missing`` (nothing of the task is there) or ``incomplete`` (something is, but not all)."""
    absent = not (task.path.is_dir() if task.format == "wds" else cached_roots(task.path, task.dataset))
    try:
        task.check()
    except (SuiteError, OSError) as exc:
        return ("missing" if absent else "incomplete"), str(exc)
    return "ok", ""


def build_datacomp_suite(data_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write ``OUT/suite.json`` (default ``DATA_DIR/suite.json``) for DataComp's 38 tasks in ``data_dir`` and
    return it, with ``status``: per task ``ok``, ``missing`` or ``incomplete`` and why."""
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"DataComp evaluation folder not found: {data_dir}")
    out = Path(out).expanduser() if out else data_dir
    out.mkdir(parents=True, exist_ok=True)
    suite = {"name": "datacomp", "version": SUITE_VERSION, "expected_tasks": len(_table()),
             "data_dir": str(data_dir), "tasks": [_entry(t, data_dir) for t in _table()]}
    write_json(out / SUITE_FILE, suite)
    status = {}
    for task in load_suite(out).tasks:
        state, reason = _status(task)
        status[task.name] = {"status": state, "label": task.display, "reason": reason}
    suite["status"] = status
    write_json(out / SUITE_FILE, suite)
    return suite


def format_status(suite: dict[str, Any]) -> str:
    status = suite["status"]
    ok = [n for n, s in status.items() if s["status"] == "ok"]
    lines = [f"{len(ok)} of {len(status)} DataComp tasks present in {suite['data_dir']}"]
    for state in ("missing", "incomplete"):
        names = [n for n, s in status.items() if s["status"] == state]
        if names:
            lines.append(f"{state} ({len(names)}):")
            lines += [f"  {status[n]['label']:<24} {status[n]['reason']}" for n in names]
    if len(ok) < len(status):
        lines.append(f"evaluating this suite scores the {len(ok)} tasks present; its Average says it is over "
                     f"{len(ok)} of {len(status)}")
    return "\n".join(lines)


def download(data_dir: str | Path, keys: list[str] | None = None) -> dict[str, str]:
    """Fetch DataComp's evaluation sets into ``data_dir`` as DataComp's ``download_evalsets.py`` lays them out (needs
    a network): webdataset folders from the hub with ``huggingface_hub``, the Hugging Face datasets with
    ``datasets.load_dataset`` into ``DATA_DIR/hf_cache``. Returns the tasks that failed, with the reason; a task
    already complete is left alone."""
    data_dir = Path(data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    failed = {}
    for t in _table():
        if keys and t["key"] not in keys:
            continue
        try:
            if t["format"] == "hf":
                import datasets

                datasets.load_dataset(hf_dataset(t["key"]), split="test", cache_dir=str(data_dir / HF_CACHE))
            else:
                from huggingface_hub import snapshot_download

                folder = wds_folder(t["key"])
                snapshot_download(repo_id=f"{WDS_OWNER}/{folder}", repo_type="dataset", local_dir=data_dir / folder,
                                  allow_patterns=["*.txt", "test/*"])
        except Exception as exc:  # noqa: BLE001 - network and hub errors of every kind; the other tasks go on
            failed[t["key"]] = f"{type(exc).__name__}: {exc}"
            log.error("download of %s failed: %s", t["name"], failed[t["key"]])
    return failed
