"""Atomic writes and small JSON helpers.

Every file a long step produces is written under a temporary name and renamed into place, so a kill leaves either the
old state or the new one, never half a file that a resumed run would mistake for finished work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    # Host and pid: ranks on different nodes of a shared file system never write the same temporary file.
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def cache_root() -> Path:
    """``$DATAFILTER_CACHE`` or ``~/.cache/datafilter``: what every stage keeps between runs (sources, renders,
    decoded pools and tasks, the scorer), never in the repository."""
    return Path(os.environ.get("DATAFILTER_CACHE") or Path.home() / ".cache" / "datafilter").expanduser()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def read_yaml(path: str | os.PathLike, what: str, error: type[Exception] = ValueError) -> Any:
    """A YAML file's content; a missing file or invalid YAML raises ``error`` naming the file (``what`` it should
    be: "recipe", "benchmark config", ...), so every config reader fails the same clear way."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({exc})") from None


def _json_default(obj: Any) -> Any:
    # numpy scalars and paths appear in stats and configs; everything else is a bug worth seeing.
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short hash of a JSON-able object, stable across runs and machines (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:length]
