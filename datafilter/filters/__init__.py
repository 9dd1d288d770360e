"""Filters: plugins that select a subset of a pool.

A filter is a class with a name, a version, a frozen dataclass config and declared needs. The harness gives it a
read-only ``FilterView`` of the pool and checks what it returns: sorted ``u8,u8`` uids of the pool (repeats allowed),
with counts per reason for what it removed. Built-ins and third-party filters register the same way, through the
``datafilter.filters`` entry-point group, and are imported only when used.
"""

from datafilter.filters.base import Filter, FilterError, NoConfig, RunResult, run_filter
from datafilter.filters.registry import available, filter_class, load_filter
from datafilter.filters.subset import load_subset, save_subset
from datafilter.filters.view import FilterView

__all__ = ["Filter", "FilterError", "FilterView", "NoConfig", "RunResult", "available", "filter_class",
           "load_filter", "load_subset", "run_filter", "save_subset"]
