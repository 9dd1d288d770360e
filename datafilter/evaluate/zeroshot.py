"""Run a suite against one model: embed each task's images and prompts, compute its metrics, average the groups.

Results name their model, checkpoint id and suite id, so a table built from them can always say what it compares.
With an output path, each finished task is kept in ``OUT.partial.json`` (for the same checkpoint and suite), so a
killed evaluation of a long suite resumes at the first unfinished task.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from datafilter import __version__
from datafilter.common.files import read_json, write_json
from datafilter.evaluate.metrics import class_embeddings, classification_metrics, retrieval_chance, retrieval_metrics
from datafilter.evaluate.suite import GROUPS, Suite, SuiteError, Task
from datafilter.pool.images import SkipSample, open_image, to_rgb

log = logging.getLogger(__name__)


def group_averages(tasks: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """DataComp's columns: the mean main metric of each group, and ``Average`` over every task (``None`` if empty)."""
    out: dict[str, float | None] = {}
    for key, label in GROUPS.items():
        values = [r["main"] for r in tasks.values() if r.get("group") == key]
        out[label] = float(np.mean(values)) if values else None
    values = [r["main"] for r in tasks.values()]
    out["Average"] = float(np.mean(values)) if values else None
    return out


def _batched(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _encode_texts(model, texts: list[str], batch_size: int) -> torch.Tensor:
    return torch.cat([model.encode_texts(list(chunk)).cpu() for chunk in _batched(texts, batch_size)])


def _encode_images(model, images: list[bytes], batch_size: int, where: str) -> torch.Tensor:
    out = []
    for chunk in _batched(images, batch_size):
        tensors = []
        for data in chunk:
            try:
                tensors.append(model.preprocess(to_rgb(open_image(data))))
            except SkipSample as exc:
                raise SuiteError(f"{where}: an evaluation image cannot be decoded ({exc})") from None
        out.append(model.encode_images(torch.stack(tensors)).cpu())
    return torch.cat(out) if out else torch.zeros((0, model.embed_dim))


def _require_samples(task: Task, images: list[bytes]) -> None:
    if not images:  # before any prompt is encoded: an empty task is a broken suite, not a zero score
        raise SuiteError(f"task {task.name}: no samples in {task.split_dir}")


def evaluate_task(model, task: Task, batch_size: int = 256) -> dict[str, Any]:
    """Metrics of one task for a ``datafilter.models.LoadedModel``-like model (encode_images, encode_texts)."""
    images: list[bytes] = []
    if task.type == "classification":
        classnames, templates = task.classnames(), task.templates()
        labels = []
        for key, image, files in task.samples():
            if "cls" not in files:
                raise SuiteError(f"task {task.name}: sample {key} has no .cls label")
            try:
                labels.append(int(files["cls"].decode().strip()))
            except ValueError:
                raise SuiteError(f"task {task.name}: sample {key} has label {files['cls'][:20]!r}, not an integer")
            images.append(image)
        _require_samples(task, images)
        if max(labels) >= len(classnames):
            raise SuiteError(f"task {task.name}: label {max(labels)} but classnames.txt has {len(classnames)} lines")
        prompts = [t.replace("{c}", c) for c in classnames for t in templates]
        text = _encode_texts(model, prompts, batch_size).view(len(classnames), len(templates), -1)
        image_emb = _encode_images(model, images, batch_size, f"task {task.name}")
        metrics = classification_metrics(image_emb, torch.tensor(labels), class_embeddings(text))
        extra = {"num_classes": len(classnames), "num_templates": len(templates), "chance": 1 / len(classnames)}
    else:
        captions: list[str] = []
        text_image: list[int] = []
        for key, image, files in task.samples():
            lines = [ln.strip() for ln in files.get("txt", b"").decode("utf-8").splitlines() if ln.strip()]
            if not lines:
                raise SuiteError(f"task {task.name}: sample {key} has no caption (.txt)")
            captions += lines
            text_image += [len(images)] * len(lines)
            images.append(image)
        _require_samples(task, images)
        image_emb = _encode_images(model, images, batch_size, f"task {task.name}")
        text_emb = _encode_texts(model, captions, batch_size)
        metrics = retrieval_metrics(image_emb, text_emb, torch.tensor(text_image))
        extra = {"num_captions": len(captions), "chance": retrieval_chance(len(images), np.array(text_image))}
    return {"type": task.type, "group": task.group, "metric": task.metric, "main": metrics[task.metric],
            "metrics": metrics, "num_samples": len(images), **extra}


def evaluate_suite(model, suite: Suite, *, batch_size: int = 256, out: str | Path | None = None,
                   tasks: Sequence[str] | None = None, checkpoint: str | Path | None = None,
                   on_task: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Evaluate every task (or the named ones) and return the results document; write it to ``out`` if given."""
    chosen = [suite.task(n) for n in tasks] if tasks else list(suite.tasks)
    identity = {"model": model.name, "checkpoint_id": model.checkpoint_id, "suite_id": suite.suite_id}
    partial_path = Path(f"{out}.partial.json") if out else None
    done: dict[str, dict[str, Any]] = {}
    if partial_path is not None and partial_path.exists():
        partial = read_json(partial_path)
        if partial.get("identity") == identity:
            done = partial["tasks"]
            log.info("resuming evaluation: %d of %d tasks already done", len(done), len(chosen))
    t0 = time.time()
    for task in tqdm(chosen, desc=f"evaluate {suite.name}", unit="task"):
        if task.name not in done:
            done[task.name] = evaluate_task(model, task, batch_size)
            if partial_path is not None:
                write_json(partial_path, {"identity": identity, "tasks": done})
        if on_task is not None:
            on_task(task.name, done[task.name])
    results = {
        "model": model.name, "checkpoint_id": model.checkpoint_id, "checkpoint": str(checkpoint) if checkpoint else None,
        "suite": suite.to_json(), "datafilter_version": __version__, "seconds": time.time() - t0,
        "tasks": {t.name: done[t.name] for t in chosen},
    }
    results["groups"] = group_averages(results["tasks"])
    if out is not None:
        write_json(out, results)
        if partial_path is not None and partial_path.exists():
            partial_path.unlink()
    return results


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table: each task's main metric against chance, then the group averages (percent)."""
    lines = [f"{'task':<28} {'group':<15} {'metric':<22} {'value':>7} {'chance':>7} {'x chance':>8}"]
    for name, r in results["tasks"].items():
        ratio = r["main"] / r["chance"] if r.get("chance") else math.nan
        lines.append(f"{name:<28} {r.get('group') or '-':<15} {r['metric']:<22} {100 * r['main']:>6.2f}% "
                     f"{100 * r['chance']:>6.2f}% {ratio:>8.1f}")
    lines.append("")
    for label, value in results["groups"].items():
        lines.append(f"{label:<28} {'-' if value is None else f'{100 * value:.2f}%'}")
    return "\n".join(lines)
