"""Zero-shot evaluation on a suite of tasks in CLIP_benchmark's layout, grouped as DataComp reports them."""

from datafilter.evaluate.metrics import class_embeddings, classification_metrics, retrieval_metrics
from datafilter.evaluate.suite import GROUPS, Suite, SuiteError, Task, load_suite
from datafilter.evaluate.zeroshot import evaluate_suite, evaluate_task, format_results, group_averages

__all__ = ["GROUPS", "Suite", "SuiteError", "Task", "class_embeddings", "classification_metrics", "evaluate_suite",
           "evaluate_task", "format_results", "group_averages", "load_suite", "retrieval_metrics"]
