"""Filter discovery through the ``datafilter.filters`` entry-point group.

Built-ins are registered in this project's ``pyproject.toml`` exactly like third-party plugins, so a plugin package
needs one class and one entry-point line. Classes are imported only when a filter is used or listed.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from datafilter.common.hints import did_you_mean
from datafilter.filters.base import Filter, FilterError, make_config

GROUP = "datafilter.filters"


def available() -> dict[str, EntryPoint]:
    """All registered filters by name (no imports happen here)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)  # first installed distribution wins, as for console scripts
    return dict(sorted(found.items()))


def filter_class(name: str) -> tuple[type[Filter], str]:
    """The class registered under ``name`` and its ``module:Class`` path; "did you mean" for unknown names."""
    eps = available()
    if name not in eps:
        hint = did_you_mean(name, eps, n=3)
        raise FilterError(f"no filter named {name!r}{hint} (see `datafilter filters list`)")
    ep = eps[name]
    try:
        cls = ep.load()
    except Exception as exc:
        raise FilterError(f"filter {name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Filter)):
        raise FilterError(f"filter {name!r} ({ep.value}) is not a subclass of datafilter.filters.Filter")
    if cls.name != name:
        raise FilterError(f"filter {name!r} ({ep.value}) declares name {cls.name!r}; the entry-point name and the "
                          f"class's `name` must agree")
    return cls, ep.value


def load_filter(name: str, params: dict[str, Any] | None = None) -> tuple[Filter, str]:
    """An instance of filter ``name`` configured from ``params`` (typed by its config dataclass)."""
    cls, where = filter_class(name)
    return cls(make_config(cls.Config, params, owner=name)), where
