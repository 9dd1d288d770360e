"""The ``Filter`` base class and the harness that runs one filter and checks what it returns.

A filter implements ``select(view)`` and nothing else; the base class does the bookkeeping (counts per reason,
timing per phase, the declared needs) and ``run_filter`` checks the output (dtype, order, membership in the pool) so
that one misbehaving plugin is reported by name and never produces a subset file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np

from datafilter.common.files import read_yaml
from datafilter.common.hints import did_you_mean
from datafilter.filters.view import FilterView
from datafilter.pool.uid import UID_DTYPE, is_sorted

log = logging.getLogger(__name__)


class FilterError(RuntimeError):
    """A filter could not run or returned something the harness refuses; the message names the filter."""


@dataclass(frozen=True)
class NoConfig:
    """The config of a filter without parameters."""


class Filter:
    """Base class of every filter.

    Subclasses set ``name``, ``version``, ``description`` (one line, shown by ``datafilter filters list``),
    ``Config`` (a frozen dataclass) and ``needs``, and implement ``select``. Needs may refer to config fields with
    ``{field}``, e.g. ``"reference:{reference}"``. Known needs: ``image_embeddings``, ``text_embeddings``, ``scores``,
    ``metadata:COLUMN``, ``reference:NAME``.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    description: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{type(self).__name__} expects a {self.Config.__name__} config, "
                            f"got {type(self.config).__name__}")
        self.counts: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self.spans: list[tuple[str, float, float]] = []  # (phase, start, end) on the perf_counter clock
        self.details: dict[str, Any] = {}  # facts about the run worth keeping in the sidecar

    # --- what a filter implements ----------------------------------------------------------------------------------
    def select(self, view: FilterView) -> np.ndarray:
        """Return the kept uids: sorted ``u8,u8`` (``view.uids_of(rows)`` makes them), repeats allowed.

        Call ``self.drop(reason, n)`` for what is removed and why; wrap long steps in ``with self.phase(name):``.
        """
        raise NotImplementedError

    # --- bookkeeping -----------------------------------------------------------------------------------------------
    def required(self) -> tuple[str, ...]:
        fields = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}
        return tuple(n.format(**fields) for n in self.needs)

    def drop(self, reason: str, n: int | np.integer) -> None:
        """Count ``n`` samples removed for ``reason`` (reasons add up; zero counts are kept, they are informative)."""
        self.counts[reason] = self.counts.get(reason, 0) + int(n)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            self.spans.append((name, start, end))
            self.timings[name] = self.timings.get(name, 0.0) + end - start
            log.info("%s: %s took %.2f s", self.name, name, self.timings[name])

    def drop_invalid(self, view: FilterView, *kinds: str) -> np.ndarray:
        """The rows with usable embeddings of ``kinds`` (``image``, ``text``; none: ``view.valid``), counting the
        others as ``no_embedding``. Name only the kinds the filter reads: checking a kind may read its arrays."""
        valid = view.usable(*kinds)
        self.drop("no_embedding", int((~valid).sum()))
        return valid


@dataclass
class RunResult:
    """What one run produced: the subset and the facts for its sidecar."""

    uids: np.ndarray
    filter: str
    version: str
    params: dict[str, Any]
    counts: dict[str, int]
    input: int
    kept: int
    unique_kept: int
    timings: dict[str, float]
    elapsed_s: float
    plugin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def sidecar(self, view: FilterView) -> dict[str, Any]:
        from datafilter import __version__

        return {"filter": self.filter, "version": self.version, "plugin": self.plugin, "params": self.params,
                "pool": view.pool_path, "pool_id": view.pool_id, "space": view.space, "input": self.input,
                "kept": self.kept, "unique_kept": self.unique_kept, "counts": self.counts,
                "timings_s": {k: round(v, 4) for k, v in self.timings.items()}, "elapsed_s": round(self.elapsed_s, 4),
                "details": self.extra, "datafilter_version": __version__}


# --- configs ----------------------------------------------------------------------------------------------------------
def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ValueError as exc:
                last = exc
        raise last or ValueError(f"{key}: cannot convert {value!r}")
    if origin is typing.Literal:
        if value not in args:  # YAML gives 2 where the choices are strings like "2"
            value = next((a for a in args if str(a) == str(value)), value)
        if value not in args:
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else list(value)
        inner = args[0] if args else str
        return tuple(_convert(v.strip() if isinstance(v, str) else v, inner, key) for v in items if v != "")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}: {value!r} is not a boolean")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: {value!r} is not {tp.__name__}") from None
    return value


def make_config(config_cls: type, params: Mapping[str, Any] | None = None, *, owner: str = "") -> Any:
    """Build a config from ``{field: value}`` (strings from the command line or values from YAML), typed by the
    dataclass fields; unknown keys get a "did you mean"."""
    params = dict(params or {})
    hints = typing.get_type_hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls)]
    kwargs = {}
    for key, value in params.items():
        if key not in names:
            hint = did_you_mean(key, names)
            raise ValueError(f"filter {owner!r} has no parameter {key!r}{hint} "
                             f"(parameters: {', '.join(names) or 'none'})")
        kwargs[key] = _convert(value, hints[key], f"{owner}.{key}")
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"filter {owner!r}: bad parameters: {exc}") from None


def parse_params(pairs: Sequence[str] = (), config_file: str | Path | None = None) -> dict[str, Any]:
    """``--config file.yaml`` first, then ``--param key=value`` pairs on top."""
    out: dict[str, Any] = {}
    if config_file:
        data = read_yaml(config_file, "filter config") or {}
        if not isinstance(data, dict):
            raise ValueError(f"{config_file}: expected a mapping of parameter names to values")
        out.update(data.get("params", data) if isinstance(data.get("params"), dict) else data)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--param expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def config_to_json(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}


# --- running ----------------------------------------------------------------------------------------------------------
def run_filter(flt: Filter, view: FilterView, *, plugin: str = "") -> RunResult:
    """Run one filter on a view and check its output. Any problem raises ``FilterError`` naming the filter."""
    label = f"filter {flt.name!r}" + (f" ({plugin})" if plugin else "")
    missing = view.missing(flt.required())
    if missing:
        raise FilterError(f"{label} cannot run on {view.pool_path or 'this pool'}; missing:\n  " + "\n  ".join(missing))
    flt.counts, flt.timings, flt.spans, flt.details = {}, {}, [], {}
    start = time.perf_counter()
    try:
        out = flt.select(view)
    except FilterError as exc:
        if label in str(exc):
            raise
        raise FilterError(f"{label}: {exc}") from exc
    except Exception as exc:
        raise FilterError(f"{label} raised {type(exc).__name__}: {exc}") from exc
    elapsed = time.perf_counter() - start
    uids = _check_output(label, out, view)
    unique = int(len(uids) - np.count_nonzero((uids[1:] == uids[:-1]))) if len(uids) else 0
    counts = {k: int(v) for k, v in flt.counts.items()}
    accounted = sum(counts.values()) + unique
    if accounted < view.n:
        counts["unspecified"] = view.n - accounted
    elif accounted > view.n:
        log.warning("%s counts %d removals plus %d kept for %d input rows", label, sum(counts.values()), unique,
                    view.n)
    return RunResult(uids=uids, filter=flt.name, version=str(flt.version), params=config_to_json(flt.config),
                     counts=counts, input=view.n, kept=len(uids), unique_kept=unique, timings=dict(flt.timings),
                     elapsed_s=elapsed, plugin=plugin, extra=dict(flt.details))


def _check_output(label: str, out: Any, view: FilterView) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise FilterError(f"{label} returned {type(out).__name__}, expected a numpy array of dtype {UID_DTYPE}")
    if out.dtype != UID_DTYPE:
        raise FilterError(f"{label} returned dtype {out.dtype}, expected {UID_DTYPE} (use view.uids_of(rows))")
    if out.ndim != 1:
        raise FilterError(f"{label} returned an array of shape {out.shape}, expected one dimension")
    if not is_sorted(out):
        raise FilterError(f"{label} returned unsorted uids (subsets are sorted; use view.uids_of(rows))")
    unknown = ~view.contains(out)
    if unknown.any():
        from datafilter.pool.uid import uids_to_hex

        raise FilterError(f"{label} returned {int(unknown.sum())} uid(s) that are not in the pool, e.g. "
                          f"{uids_to_hex(out[unknown][:1])[0]}")
    return np.ascontiguousarray(out)
