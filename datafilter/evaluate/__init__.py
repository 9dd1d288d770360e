"""Zero-shot evaluation on a suite of tasks in CLIP_benchmark's layout, grouped as DataComp reports them.

Names are loaded on first use (PEP 562), so that registering the command line's commands does not import torch.
"""

import importlib

_EXPORTS = {
    "class_embeddings": "metrics", "classification_metrics": "metrics", "retrieval_metrics": "metrics",
    "GROUPS": "suite", "Suite": "suite", "SuiteError": "suite", "Task": "suite", "load_suite": "suite",
    "evaluate_suite": "zeroshot", "evaluate_task": "zeroshot", "format_results": "zeroshot",
    "group_averages": "zeroshot",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
