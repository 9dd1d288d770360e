"""The filter report: what a subset removed and why, how it overlaps other subsets, and, where the pool has ground
truth (a synthetic pool's ``ground_truth.parquet``), how precisely and completely it removed each kind of noise.

Only this module reads the ground truth; filters never see it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq

from datafilter.common.files import write_json
from datafilter.filters.subset import load_subset
from datafilter.pool.uid import uids_from_arrow
from datafilter.pool.format import GROUND_TRUTH

CLEAN = "clean"


def kept_mask(pool, subset: np.ndarray, name: str | Path) -> np.ndarray:
    """Bool per pool row: the row's uid is in the subset (repeats count once). A subset of another pool is an
    error: its report would call every sample removed."""
    rows = pool.rows_of(subset)
    if (rows < 0).any():
        raise ValueError(f"{name}: {int((rows < 0).sum())} uid(s) are not in {pool.path}; is it a subset of another "
                         f"pool (or of an earlier build of this one)?")
    mask = np.zeros(pool.num_samples, bool)
    mask[rows] = True
    return mask


def noise_metrics(kept: np.ndarray, noise: np.ndarray) -> dict[str, Any]:
    """Per noise type: how many there are, how many were removed, recall (share of that type removed) and
    precision (share of all removed samples that are of that type); plus the same for "any noise"."""
    removed = ~kept
    n_removed = int(removed.sum())
    out: dict[str, Any] = {"types": {}}
    for t in sorted(set(noise.tolist())):
        is_t = noise == t
        r = int((removed & is_t).sum())
        out["types"][t] = {"count": int(is_t.sum()), "removed": r, "recall": r / max(1, int(is_t.sum())),
                           "precision": r / n_removed if n_removed else 0.0}
    is_noise = noise != CLEAN
    r = int((removed & is_noise).sum())
    out["any_noise"] = {"count": int(is_noise.sum()), "removed": r, "recall": r / max(1, int(is_noise.sum())),
                        "precision": r / n_removed if n_removed else 0.0}
    out["kept_clean_fraction"] = float((kept & ~is_noise).sum() / max(1, int(kept.sum())))
    return out


def subset_report(subset: str | Path, *, pool_dir: str | Path | None = None, compare: Sequence[str | Path] = (),
                  out: str | Path | None = None, plot: bool = True) -> tuple[dict[str, Any], Path]:
    uids, meta = load_subset(subset)
    pool_dir = pool_dir or meta.get("pool")
    if not pool_dir:
        raise ValueError(f"{subset}: the sidecar names no pool; pass --pool")
    from datafilter.pool.pool import Pool

    pool = Pool(pool_dir)
    kept = kept_mask(pool, uids, subset)
    report: dict[str, Any] = {"subset": str(subset), "filter": meta.get("filter"), "params": meta.get("params"),
                              "pool": str(pool.path), "input": pool.num_samples, "kept": len(uids),
                              "unique_kept": int(kept.sum()), "counts": meta.get("counts", {}), "overlap": {}}
    for other in compare:
        o_uids, _ = load_subset(other)
        o = kept_mask(pool, o_uids, other)
        union = int((kept | o).sum())
        report["overlap"][str(other)] = {"jaccard": int((kept & o).sum()) / union if union else 1.0,
                                         "intersection": int((kept & o).sum()), "other_kept": int(o.sum())}
    gt_path = pool.path / GROUND_TRUTH
    if gt_path.exists():
        gt = pq.read_table(gt_path, columns=["uid", "noise"])
        gt_uids = uids_from_arrow(gt.column("uid"))
        noise = np.asarray(gt.column("noise").to_pylist(), dtype=object)
        rows = pool.rows_of(gt_uids)
        if (rows < 0).any():
            raise ValueError(f"{gt_path}: {int((rows < 0).sum())} uid(s) are not in the pool")
        report["noise"] = noise_metrics(kept[rows], noise)
    out = Path(out) if out else Path(subset).with_suffix(".report.json")
    write_json(out, report)
    if plot:
        _plot(report, out.with_suffix(".png"))
    return report, out


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = {k: v for k, v in report["counts"].items() if v}
    noise = report.get("noise", {}).get("types", {})
    ncols = 1 + bool(noise)
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 3.2), squeeze=False)
    ax = axes[0][0]
    labels = ["kept"] + list(counts)
    ax.barh(labels, [report["unique_kept"]] + list(counts.values()), color=["tab:green"] + ["tab:red"] * len(counts))
    ax.set_title(f"{report.get('filter') or 'subset'}: samples by outcome")
    if noise:
        ax = axes[0][1]
        names = list(noise)
        ax.barh(names, [noise[n]["recall"] for n in names], color=["tab:gray" if n == CLEAN else "tab:blue"
                                                                   for n in names])
        ax.set_xlim(0, 1)
        ax.set_title("share removed, per ground-truth type")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
