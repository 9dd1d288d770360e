"""Run a registered filter on a pool directory and write its subset: the code behind ``datafilter filter``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from datafilter.filters.base import RunResult, run_filter
from datafilter.filters.registry import load_filter
from datafilter.filters.subset import save_subset
from datafilter.filters.view import FilterView

log = logging.getLogger(__name__)


def default_output(pool_dir: str | Path, name: str) -> Path:
    return Path("work") / "subsets" / Path(pool_dir).resolve().name / f"{name}.npy"


def filter_pool(name: str, pool_dir: str | Path, out: str | Path | None = None, *,
                params: Mapping[str, Any] | None = None, space: str | None = None,
                references: Mapping[str, str | Path] | None = None,
                view: FilterView | None = None, workdir: str | Path | None = None) -> tuple[RunResult, Path]:
    """Run filter ``name`` on ``pool_dir`` and save the subset to ``out``.

    Nothing is written unless the filter succeeds and its output passes the checks, so a failing plugin leaves
    earlier subsets (including a previous ``out``) untouched.
    """
    flt, where = load_filter(name, dict(params or {}))
    view = view or FilterView.from_pool(pool_dir, space=space, references=references, workdir=workdir)
    result = run_filter(flt, view, plugin=where)
    out = Path(out) if out else default_output(pool_dir, name)
    save_subset(out, result.uids, result.sidecar(view))
    log.info("%s: kept %d of %d samples -> %s", name, result.kept, result.input, out)
    return result, out
