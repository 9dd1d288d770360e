"""D²'s selection step on a real embedded pool: the repeated arg-max of the paper against the authors' script's loop.

Builds D²'s kNN graph once (the filter's defaults: image and text embeddings, one neighbour, forward gamma 1.0,
score offset 0.115) on a pool's embedding space, then selects ``--fraction`` of it three ways on the same graph:
  (a) ``greedy``: the filter's exact repeated arg-max (lazy max-heap);
  (b) ``lookahead``: the filter's transcription of the authors' selection loop;
  (c) with ``--d2pruning-repo``: the authors' own ``iterative_selection`` from ``select_d2_datacomp.py`` (a local
      checkout, imported at run time), fed the same graph files;
and prints the time of each and how many selected rows each pair shares.

    python benchmarks/bench_d2_selection.py work/pools/micro-XXXX
    python benchmarks/bench_d2_selection.py work/pools/micro-XXXX --d2pruning-repo /tmp/d2pruning
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from datafilter.filters.builtin.d2 import GRAPH_FIELDS, D2Config, forward_pass, reverse_pass, reverse_pass_lookahead
    from datafilter.filters.ops import Rows, knn_graph
    from datafilter.filters.view import FilterView

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pool")
    ap.add_argument("--space", default=None)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--d2pruning-repo", help="a local checkout of adymaharana/d2pruning")
    args = ap.parse_args()

    c = D2Config(fraction=args.fraction)
    view = FilterView.from_pool(args.pool, space=args.space)
    scores = view.scores(None)
    rows = np.flatnonzero(view.valid & np.isfinite(scores))
    t = time.perf_counter()
    nbrs, dists, method = knn_graph(Rows([view.image_embeddings(), view.text_embeddings()], rows), method=c.knn,
                                    **{f: getattr(c, f) for f in GRAPH_FIELDS})
    print(f"{len(rows):,} rows, kNN graph ({method}, k={c.k}) in {time.perf_counter() - t:.1f} s")
    s = scores[rows] + c.score_offset
    g = forward_pass(s, nbrs, dists, c.gamma)
    budget = int(len(rows) * c.fraction)
    picks = {}
    for name, fn in (("greedy", reverse_pass), ("lookahead", reverse_pass_lookahead)):
        t = time.perf_counter()
        picks[name] = fn(g, nbrs, dists, c.beta, budget)
        print(f"{name:>10}: {len(picks[name]):,} rows in {time.perf_counter() - t:.2f} s")
    if args.d2pruning_repo:
        sys.path.insert(0, args.d2pruning_repo)
        import select_d2_datacomp as d2

        with tempfile.TemporaryDirectory() as tmp:
            files = {}
            # Their loop works on the graph scores with its own offset-free CLIP scores only for printing.
            for key, arr in (("g", g), ("n", nbrs), ("c", scores[rows]), ("d", dists)):
                files[key] = str(Path(tmp) / f"{key}.npy")
                np.save(files[key], arr)
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                picks["authors"] = np.asarray(d2.iterative_selection(files["g"], files["n"], files["c"], files["d"],
                                                                     args.fraction, gamma=c.beta))
            print(f"{'authors':>10}: {len(picks['authors']):,} rows in {time.perf_counter() - t:.2f} s")
    names = list(picks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = len(np.intersect1d(picks[a], picks[b]))
            same_order = len(picks[a]) == len(picks[b]) and bool(np.array_equal(picks[a], picks[b]))
            print(f"{a} vs {b}: {shared:,} of {budget:,} rows shared ({100 * shared / max(budget, 1):.3f}%)"
                  f"{', same pick order' if same_order else ''}")


if __name__ == "__main__":
    main()
