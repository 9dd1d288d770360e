"""Subset files: DataComp's format (``.npy`` of sorted ``u8,u8`` uids) plus a JSON sidecar.

``save_subset`` writes both atomically, the array first; the sidecar records the sha256 of the array file, so
``load_subset`` can tell a sidecar that belongs to an older array (e.g. after a kill between the two renames) and
refuse it rather than mislabel the subset. DataComp subset files without a sidecar load with an empty sidecar.
"""

from __future__ import annotations

import io
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from datafilter.common.files import atomic_path, read_json, write_json
from datafilter.pool.uid import check_uid_array


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix(".json") if path.suffix == ".npy" else path.with_name(path.name + ".json")


def save_subset(path: str | Path, uids: np.ndarray, sidecar: dict[str, Any]) -> Path:
    """Write ``uids`` (sorted ``u8,u8``) to ``path`` and ``sidecar`` beside it; returns the sidecar path."""
    path = Path(path)
    uids = check_uid_array(np.asarray(uids), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, uids)
    data = buf.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    side = sidecar_path(path)
    write_json(side, {**sidecar, "file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "count": len(uids)})
    return side


def load_subset(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """The uids of a subset file and its sidecar (``{}`` when there is none, as for DataComp's own files)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"subset file not found: {path}")
    data = path.read_bytes()
    try:
        uids = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{path}: not a numpy .npy file ({exc})") from None
    check_uid_array(uids, path)
    side = sidecar_path(path)
    if not side.exists():
        return uids, {}
    meta = read_json(side)
    digest = hashlib.sha256(data).hexdigest()
    if meta.get("sha256") not in (None, digest):
        raise ValueError(f"{side} describes another version of {path.name} (sha256 differs); rerun the filter")
    return uids, meta
