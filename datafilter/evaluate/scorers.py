"""Metric sets of classification tasks: plain zero-shot accuracy, and DataComp's WILDS and fairness evaluators.

A task's ``scorer`` (suite.json) names one of ``SCORERS``. Each gets every sample's top-5 predictions, its label and,
where it groups samples, its metadata row (the ``.npy`` member of a DataComp task's samples, whose columns are the
evaluator's ``fields`` in DataComp's order), and returns DataComp's metric names and values: ``acc1``, ``acc5`` and
``mean_per_class_recall`` always (as ``wds_eval`` does), plus the evaluator's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from datafilter.common.hints import did_you_mean
from datafilter.evaluate.metrics import accuracy_metrics, group_metric, macro_f1_recall


class MetadataError(ValueError):
    """Metadata that a grouped metric cannot use (missing, too few columns)."""


@dataclass(frozen=True)
class Scorer:
    name: str
    description: str
    main_metrics: tuple[str, ...]  # the metrics a task may name as its main one
    fields: tuple[str, ...] = ()  # metadata columns, in the order of the samples' .npy rows
    extra: Callable[["Scorer", np.ndarray, np.ndarray, np.ndarray | None], dict[str, float]] | None = None

    @property
    def needs_metadata(self) -> bool:
        return bool(self.fields)

    def column(self, metadata: np.ndarray | None, field: str, what: str) -> np.ndarray:
        """One metadata column as integers; a clear error when the metadata lacks it."""
        i = self.fields.index(field)
        cols = 0 if metadata is None or metadata.ndim != 2 else metadata.shape[1]
        if cols <= i:
            raise MetadataError(f"{what} needs metadata column {field!r} (column {i} of {', '.join(self.fields)}), "
                                f"but the samples' .npy metadata has {cols} column(s)")
        values = metadata[:, i]
        if not np.all(values == np.round(values)):
            raise MetadataError(f"metadata column {field!r} must hold integer group ids")
        return values.astype(np.int64)

    def __call__(self, top: np.ndarray, labels: np.ndarray, metadata: np.ndarray | None,
                 num_classes: int) -> dict[str, float | None]:
        out: dict[str, float | None] = dict(accuracy_metrics(top, labels, num_classes))
        if self.extra is not None:
            out.update(self.extra(self, np.asarray(top), np.asarray(labels), metadata))
        return out


def _correct(top: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return top[:, 0] == labels


def _iwildcam(s: Scorer, top, labels, metadata) -> dict[str, float]:
    return {"acc_avg": float(_correct(top, labels).mean()), **macro_f1_recall(top[:, 0], labels)}


def _grouped(name: str, field: str, worst_key: str, correct: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    """A WILDS ``standard_group_eval``: the mean over all samples, per group of ``field``, and the worst group."""
    def extra(s: Scorer, top, labels, metadata) -> dict[str, float]:
        ok = correct(top, labels)
        groups = group_metric(ok, s.column(metadata, field, f"{worst_key}"), name, field)
        return {f"{name}_avg": float(ok.mean()), **{k: v for k, v in groups.items() if k != "worst"},
                worst_key: groups["worst"]}
    return extra


def _top5_correct(top: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return (top[:, :5] == labels[:, None]).any(axis=1)


def _fmow(s: Scorer, top, labels, metadata) -> dict[str, float]:
    """Overall and per-year accuracy (worst year), then per-region accuracy (worst region over regions with samples;
    DataComp's evaluator names regions by number, so its test for an "Other" region never excludes one)."""
    out = _grouped("acc", "year", "acc_worst_year", _correct)(s, top, labels, metadata)
    regions = group_metric(_correct(top, labels), s.column(metadata, "region", "acc_worst_region"), "acc", "region")
    out.update({k: v for k, v in regions.items() if k != "worst"})
    out["acc_worst_region"] = regions["worst"]
    return out


SCORERS: dict[str, Scorer] = {s.name: s for s in (
    Scorer("zeroshot", "top-1 and top-5 accuracy, mean per-class recall", ("acc1", "acc5", "mean_per_class_recall")),
    Scorer("iwildcam", "adds accuracy, macro recall and macro F1 over the classes present (WILDS iWildCam)",
           ("acc1", "mean_per_class_recall", "F1-macro_all", "recall-macro_all"), (), _iwildcam),
    Scorer("camelyon17", "adds accuracy per slide and the worst slide (WILDS Camelyon17)",
           ("acc1", "acc_wg"), ("hospital", "slide", "y"), _grouped("acc", "slide", "acc_wg", _correct)),
    Scorer("fmow", "adds accuracy per year and per region, and the worst of each (WILDS FMoW)",
           ("acc1", "acc_worst_region", "acc_worst_year"), ("region", "year", "y"), _fmow),
    Scorer("dollar_street", "adds top-5 accuracy per income group and the worst group (Dollar Street)",
           ("acc1", "acc_top5_wg", "acc_top5_avg"), ("income_ds", "income_meta", "region"),
           _grouped("acc_top5", "income_ds", "acc_top5_wg", _top5_correct)),
    Scorer("geode", "adds accuracy per region and the worst region (GeoDE)",
           ("acc1", "acc_wg"), ("region", "country"), _grouped("acc", "region", "acc_wg", _correct)),
)}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        hint = did_you_mean(name, SCORERS, n=2)
        raise KeyError(f"unknown scorer {name!r} (one of {', '.join(SCORERS)}){hint}")
    return SCORERS[name]
