"""A fingerprint of a filter plugin's code, so that a cached subset is redone when the code that made it changed,
even if the plugin's author forgot to bump its ``version``.

The fingerprint hashes the source files of the module that defines the filter class and of every module it imports,
directly or through others, from its own top-level package or from ``datafilter`` (the harness code its result
depends on: the view, the ops it calls). Imports are read from the source (anywhere in a module, functions included),
nothing is executed. Third-party libraries (numpy, faiss) are not followed: their versions are the environment's.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

HARNESS = "datafilter"


def plugin_code_hash(cls: type) -> str:
    """16 hex digits over the class's qualified name and the code files it depends on (see the module docstring)."""
    files = plugin_code_files(cls)
    h = hashlib.sha256(f"{cls.__module__}:{cls.__qualname__}".encode())
    for name, path in files:
        h.update(name.encode() + b"\0")
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def plugin_code_files(cls: type) -> list[tuple[str, str]]:
    """(module name, file) of every module the fingerprint of ``cls`` covers, sorted by module name."""
    roots = frozenset({cls.__module__.partition(".")[0], HARNESS})
    seen: dict[str, str] = {}
    todo = [cls.__module__]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        origin = _origin(name)
        if origin is None:
            continue
        seen[name] = origin
        stamp = Path(origin).stat().st_mtime_ns  # an edited file is parsed again, even in a long-lived process
        todo.extend(m for m in _imports(name, origin, stamp, roots) if m not in seen)
    return sorted(seen.items())


@lru_cache(maxsize=None)
def _origin(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return None  # a namespace package or a built-in module: no file of its own
    return spec.origin


@lru_cache(maxsize=None)
def _imports(module: str, origin: str, stamp: int, roots: frozenset[str]) -> frozenset[str]:
    """Modules of the ``roots`` packages named by the import statements of one file (``from a import b`` gives
    ``a.b`` when that is a module, else ``a``). Nothing outside the roots is looked up, so no other library is
    imported on the way."""
    if not origin.endswith(".py"):
        return frozenset()  # a compiled extension: hashed, not parsed
    try:
        tree = ast.parse(Path(origin).read_bytes(), origin)
    except (SyntaxError, ValueError):
        return frozenset()
    package = module if Path(origin).name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            if base.partition(".")[0] not in roots:
                continue
            out.add(base)
            for alias in node.names:
                if alias.name != "*" and _origin(f"{base}.{alias.name}") is not None:
                    out.add(f"{base}.{alias.name}")
    return frozenset(m for m in out if m.partition(".")[0] in roots)
