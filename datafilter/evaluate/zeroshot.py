"""Run a suite against one model: stream each task through the model, score it, aggregate as DataComp does.

Results name their model, checkpoint id and suite id, so a table built from them can always say what it compares.
Every task is checked before any is evaluated; a task that cannot be scored (missing, truncated, metadata lacking
a column its metric needs) is reported by name under ``failed`` and every other task still evaluates. With an
output path, each finished task is kept in ``OUT.partial.json`` (for the same checkpoint and suite), so a killed
evaluation of a long suite resumes at the first unfinished task.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from datafilter import __version__
from datafilter.common.files import read_json, write_json
from datafilter.evaluate.decoded import DecodedCache
from datafilter.evaluate.kinds import Encoder, get_kind
from datafilter.evaluate.scorers import MetadataError
from datafilter.evaluate.stream import task_batches
from datafilter.evaluate.suite import GROUPS, Suite, SuiteError, Task

log = logging.getLogger(__name__)

# What a task's data or definition can get wrong; anything else is a bug and is raised.
TASK_ERRORS = (SuiteError, MetadataError, OSError)


def group_averages(tasks: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """DataComp's columns: the mean main metric of each group, and ``Average`` over every task (not over groups),
    of the tasks scored (``None`` where none is)."""
    out: dict[str, float | None] = {}
    scored = {k: r for k, r in tasks.items() if r.get("main") is not None}
    for key, label in GROUPS.items():
        values = [r["main"] for r in scored.values() if r.get("group") == key]
        out[label] = float(np.mean(values)) if values else None
    out["Average"] = float(np.mean([r["main"] for r in scored.values()])) if scored else None
    return out


def coverage(chosen: Sequence[Task], tasks: dict[str, dict[str, Any]], expected: int | None = None) -> dict[str, Any]:
    """For each column and the Average: tasks scored of those the suite lists, their mean chance level and their
    test samples; ``complete`` is false when any task is missing, and ``note`` says so in words."""
    def entry(members: list[Task]) -> dict[str, Any]:
        done = [tasks[t.name] for t in members if t.name in tasks and tasks[t.name].get("main") is not None]
        chances = [r["chance"] for r in done if r.get("chance") is not None]
        return {"scored": len(done), "expected": len(members),
                "chance": float(np.mean(chances)) if chances and len(chances) == len(done) else None,
                "num_samples": int(sum(r.get("num_samples", 0) for r in done)),
                "not_scored": [t.name for t in members if t.name not in tasks or tasks[t.name].get("main") is None]}

    out = {label: entry([t for t in chosen if t.group == key]) for key, label in GROUPS.items()}
    out["Average"] = entry(list(chosen))
    avg = out["Average"]
    total = max(expected or 0, len(chosen))
    avg["expected"] = total
    complete = avg["scored"] == total
    note = f"Average over all {total} tasks" if complete else f"Average over the {avg['scored']} of {total} tasks present"
    return {"complete": complete, "note": note, "columns": out}


def evaluate_task(model, task: Task, batch_size: int = 256, workers: int = 0, precision: str = "auto",
                  encoder: Encoder | None = None, cache: DecodedCache | None = None) -> dict[str, Any]:
    """Metrics of one task for a ``datafilter.models.LoadedModel``-like model (preprocess, encode_images,
    encode_texts), its images from ``cache`` when it holds them decoded (and written there otherwise). Raises
    ``SuiteError``/``MetadataError`` naming what is wrong with the task's data."""
    encoder = encoder or Encoder(model, batch_size, precision)
    kind = get_kind(task.type)
    task.check()
    pin = encoder.device.type == "cuda"
    batches = _progress(task_batches(task, kind, encoder.decoder(task), batch_size, workers, pin=pin, cache=cache),
                        task)
    t0 = time.time()
    result = kind.evaluate(task, encoder, batches)
    metrics = result.pop("metrics")
    main = metrics.get(task.metric)
    if task.size is not None and result["num_samples"] != task.size:
        log.warning("task %s: %d samples, the reference copy has %d", task.name, result["num_samples"], task.size)
    text_p, image_p = encoder.precision(task.type)
    chance = task.chance if task.chance is not None else result.pop("chance")
    result.pop("chance", None)
    return {"type": task.type, "group": task.group, "metric": task.metric, "main": main, "metrics": metrics,
            "label": task.display, "key": task.key or task.name, "chance": chance, **result,
            "precision": {"text": text_p, "image": image_p}, "seconds": time.time() - t0}


def _progress(batches, task: Task):
    with tqdm(total=task.size, desc=task.display, unit="sample", leave=False, mininterval=2) as bar:
        for b in batches:
            bar.update(len(b.get("counts", ())))
            yield b


def _identity(model, suite: Suite, precision: str) -> dict[str, Any]:
    return {"model": model.name, "checkpoint_id": model.checkpoint_id, "suite_id": suite.suite_id,
            "precision": precision}


def evaluate_suite(model, suite: Suite, *, batch_size: int = 256, out: str | Path | None = None,
                   tasks: Sequence[str] | None = None, checkpoint: str | Path | None = None,
                   on_task: Callable[[str, dict[str, Any]], None] | None = None, workers: int | None = None,
                   precision: str = "auto", threads: int | None = None,
                   cache: DecodedCache | None = None) -> dict[str, Any]:
    """Evaluate every task (or the named ones) and return the results document; write it to ``out`` if given.

    ``workers`` decoding processes (default: half the free cores, at most 8; 0 decodes in this process);
    ``threads``: the model's intra-op threads on a CPU (default: the free cores the workers leave); ``cache``:
    where tasks are kept decoded between evaluations (``datafilter.evaluate.decoded``; None: decode every time).
    """
    from datafilter.embed.pipeline import cpu_threads, default_workers

    chosen = [suite.task(n) for n in tasks] if tasks else list(suite.tasks)
    workers = default_workers() if workers is None else workers
    encoder = Encoder(model, batch_size, precision)
    identity = _identity(model, suite, precision)
    partial_path = Path(f"{out}.partial.json") if out else None
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    if partial_path is not None and partial_path.exists():
        partial = read_json(partial_path)
        if partial.get("identity") == identity:
            done = partial["tasks"]
            log.info("resuming evaluation: %d of %d tasks already done", len(done), len(chosen))
    failed: dict[str, str] = {}
    for task in chosen:  # cheap checks first: say everything that is missing before hours of work
        if task.name not in done:
            try:
                task.check()
            except TASK_ERRORS as exc:
                failed[task.name] = f"task {task.name}: {exc}"
    if failed:
        log.error("%d of %d tasks cannot be evaluated (the others will be):\n  %s", len(failed), len(chosen),
                  "\n  ".join(failed.values()))
    t0 = time.time()
    with cpu_threads(encoder.device, threads, workers):
        for task in tqdm(chosen, desc=f"evaluate {suite.name}", unit="task"):
            if task.name not in done and task.name not in failed:
                try:
                    done[task.name] = evaluate_task(model, task, batch_size, workers, encoder=encoder, cache=cache)
                except TASK_ERRORS as exc:
                    failed[task.name] = f"task {task.name}: {exc}"
                    log.error("%s (the other tasks go on)", failed[task.name])
                    continue
                if partial_path is not None:
                    write_json(partial_path, {"identity": identity, "tasks": done})
            if on_task is not None and task.name in done:
                on_task(task.name, done[task.name])
    scored = {t.name: done[t.name] for t in chosen if t.name in done}
    results = {
        "model": model.name, "checkpoint_id": model.checkpoint_id, "checkpoint": str(checkpoint) if checkpoint else None,
        "suite": suite.to_json(), "datafilter_version": __version__, "seconds": time.time() - t0,
        "precision": precision, "tasks": scored, "failed": failed,
        "groups": group_averages(scored),
        "coverage": coverage(chosen, scored, None if tasks else suite.expected_tasks),
    }
    if out is not None:
        write_json(out, results)
        if partial_path is not None and partial_path.exists() and not failed:
            partial_path.unlink()
    return results


def datacomp_jsonl(results: dict[str, Any]) -> str:
    """The results as DataComp's ``eval_results.jsonl`` (one line per task: key, dataset, metrics with
    ``main_metric``), which DataComp's own ``aggregate_scores.py`` reads."""
    import json

    lines = []
    for name, r in results["tasks"].items():
        metrics = {**r["metrics"], "main_metric": r["main"]}
        lines.append(json.dumps({"key": r.get("key", name), "dataset": r.get("label", name), "metrics": metrics}))
    return "\n".join(lines) + "\n"


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table per group: each task's main metric against chance, then the columns and the Average."""
    from datafilter.evaluate.results import format_run

    return format_run(results)
