"""Zero-shot evaluation on suites of tasks (CLIP_benchmark's webdataset layout, Hugging Face dataset caches), scored
and grouped as DataComp scores them; DataComp's 38-task suite; reading and comparing results.

- ``suite``: suite.json and its tasks; ``sources``: storage formats; ``kinds``: task kinds (how a task is scored);
  ``scorers``: classification metric sets (DataComp's WILDS and fairness evaluators); ``metrics``: the metrics;
  ``stream``: decoding workers feeding batches; ``zeroshot``: evaluating a suite; ``datacomp``: DataComp's suite;
  ``results``: printing and comparing results.

Names are loaded on first use (PEP 562), so that registering the command line's commands does not import torch.
"""

import importlib

_EXPORTS = {
    "class_embeddings": "metrics", "classification_metrics": "metrics", "retrieval_metrics": "metrics",
    "GROUPS": "suite", "Suite": "suite", "SuiteError": "suite", "Task": "suite", "load_suite": "suite",
    "evaluate_suite": "zeroshot", "evaluate_task": "zeroshot", "format_results": "zeroshot",
    "group_averages": "zeroshot", "coverage": "zeroshot", "datacomp_jsonl": "zeroshot",
    "build_datacomp_suite": "datacomp", "datacomp_tasks": "datacomp",
    "load_results": "results", "format_compare": "results",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
