"""Time and peak memory of the built-in filters on synthetic pools, optionally side by side with DataComp's and
d2pruning's own code run on the same files.

    python benchmarks/bench_filters.py --sizes 100000 300000 1000000
    python benchmarks/bench_filters.py --sizes 100000 --datacomp-repo ../datacomp --d2pruning-repo ../d2pruning

Data (made once per size, under --workdir): a pool directory in the project's format (parquet metadata, empty tar
files, embeddings written in the EmbeddingStore layout) with two spaces: ``img768`` (768-d image and text, for
CLIP score, image-based and the others) and ``pair512`` (512-d image + 512-d text, for D²); plus the same arrays in
DataComp's metadata layout (``NNNNNNNN.parquet`` + ``.npz``) for their code. Vectors are clustered (a few hundred
samples per centre, plus mismatched captions) so that k-means and kNN do real work.

Every measurement runs in a fresh process; it reports wall time, the peak resident memory of that process and, for
our filters, each phase's time and peak memory (sampled every 10 ms). ``--repeats`` gives medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARD = 50_000
SPACES = {"img768": 768, "pair512": 512}


# --- data -------------------------------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(n: int, root: Path, seed: int = 0) -> Path:
    """Write the synthetic pool (and DataComp layout copies) for ``n`` samples; skip if already complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datafilter.embed.store import EmbeddingStore, SpaceInfo
    from datafilter.pool import Pool

    pool_dir = root / "pool"
    done = root / "DONE"
    if done.exists():
        return pool_dir
    rng = np.random.default_rng(seed)
    pool_dir.mkdir(parents=True, exist_ok=True)
    n_centres = max(10, n // 300)
    centres = {d: _unit(rng.standard_normal((n_centres, d), np.float32)) for d in set(SPACES.values())}
    hexes = np.array([f"{a:016x}{b:016x}" for a, b in rng.integers(0, 2**63, size=(n, 2))])
    shard_rows = [(i, lo, min(n, lo + SHARD)) for i, lo in enumerate(range(0, n, SHARD))]
    for i, lo, hi in shard_rows:
        name = f"{i:08d}"
        m = hi - lo
        table = pa.table({"uid": hexes[lo:hi].tolist(), "key": [f"{name}{j:05d}" for j in range(m)],
                          "text": [f"a photo of thing {j % 977}" for j in range(lo, hi)],
                          "original_width": rng.integers(100, 800, m), "original_height": rng.integers(100, 800, m)})
        pq.write_table(table, pool_dir / f"{name}.parquet")
        (pool_dir / f"{name}.tar").write_bytes(b"")
    pool = Pool(pool_dir)
    dc_dirs = {sp: root / f"datacomp_{sp}" for sp in SPACES}
    for sp, d in SPACES.items():
        store = EmbeddingStore(pool, sp)
        store.init(SpaceInfo(f"synthetic-{d}", "", d, "clip_l14_similarity_score"))
        dc_dirs[sp].mkdir(exist_ok=True)
        sigma = 0.8 / np.sqrt(d)
        for (i, lo, hi), shard in zip(shard_rows, pool.shards):
            m = hi - lo
            c = rng.integers(0, n_centres, m)
            img = _unit(centres[d][c] + sigma * rng.standard_normal((m, d), np.float32))
            txt = _unit(img + 1.2 * sigma * rng.standard_normal((m, d), np.float32))
            mismatched = rng.random(m) < 0.3
            txt[mismatched] = _unit(centres[d][rng.integers(0, n_centres, mismatched.sum())]
                                    + sigma * rng.standard_normal((mismatched.sum(), d), np.float32))
            img16, txt16 = img.astype(np.float16), txt.astype(np.float16)
            score = np.einsum("nd,nd->n", img16.astype(np.float32), txt16.astype(np.float32))
            img_p, txt_p, scores_p = store.paths(shard)
            np.save(img_p, img16)
            np.save(txt_p, txt16)
            uids = hexes[lo:hi].tolist()
            pq.write_table(pa.table({"uid": uids, "valid": np.ones(m, bool),
                                     "clip_l14_similarity_score": score.astype(np.float32)}), scores_p)
            # DataComp's layout: parquet with the score columns, npz with l14_img / l14_txt
            pq.write_table(pa.table({"uid": uids, "text": pool.metadata(["text"], [shard]).column("text"),
                                     "clip_l14_similarity_score": score.astype(np.float32),
                                     "clip_b32_similarity_score": score.astype(np.float32)}),
                           dc_dirs[sp] / f"{shard.name}.parquet")
            np.savez(dc_dirs[sp] / f"{shard.name}.npz", l14_img=img16, l14_txt=txt16)
        ref = _unit(centres[d][rng.choice(n_centres, max(1, n_centres // 10), replace=False).repeat(10)]
                    + sigma * rng.standard_normal((max(1, n_centres // 10) * 10, d), np.float32))
        (store.dir / "reference").mkdir(exist_ok=True)
        np.save(store.dir / "reference" / "imagenet_train.npy", ref.astype(np.float16))
    done.write_text("ok\n")
    return pool_dir


# --- measuring --------------------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """Samples this process's resident memory every 10 ms, so each phase's peak can be read afterwards."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), _rss_mb()))
            time.sleep(0.01)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def peak(self, start: float, end: float) -> float:
        vals = [r for t, r in self.samples if start <= t <= end + 0.01]
        return max(vals) if vals else _rss_mb()


def run_ours(pool: str, space: str, name: str, params: dict) -> dict:
    """One of our filters in this process; phase timings and peaks."""
    from datafilter.filters import FilterView, load_filter, run_filter

    with RssSampler() as sampler:
        t0 = time.perf_counter()
        view = FilterView.from_pool(pool, space=space)
        flt, where = load_filter(name, params)
        res = run_filter(flt, view, plugin=where)
        t1 = time.perf_counter()
    phases = {p: {"s": round(e - s, 2), "peak_mb": round(sampler.peak(s, e))} for p, s, e in flt.spans}
    emb_mb = sum(a.nbytes for k, a in view._cache.items() if k in ("image", "text")) / 2**20
    return {"s": round(t1 - t0, 2), "kept": res.kept, "phases": phases, "details": res.extra,
            "embeddings_read_mb": round(emb_mb)}


def knn_recall(pool: str, space: str, queries: int = 500, k: int = 10) -> dict:
    """Recall@k of D²'s default kNN graph against brute force, and how close its distances are, on sampled rows."""
    from datafilter.filters import FilterView
    from datafilter.filters.ops import Rows, knn_graph

    view = FilterView.from_pool(pool, space=space)
    src = Rows([view.image_embeddings(), view.text_embeddings()])
    t0 = time.perf_counter()
    ids, dist, method = knn_graph(src, k)
    elapsed = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    q = np.sort(rng.choice(len(src), queries, replace=False))
    fq = src.get(q)
    d = np.empty((len(q), len(src)), np.float32)
    for s in range(0, len(src), 65536):  # brute force by matrix products, a slice of the pool at a time
        block = src.get(slice(s, s + 65536))
        d[:, s:s + len(block)] = (fq * fq).sum(1)[:, None] + (block * block).sum(1)[None, :] - 2 * fq @ block.T
    d[np.arange(len(q)), q] = np.inf
    exact = np.argpartition(d, k, axis=1)[:, :k]
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids[q], exact)]))
    true_d = np.take_along_axis(d, ids[q], 1)
    rel = float(np.median(np.abs(dist[q] - true_d) / np.maximum(true_d, 1e-9)))
    return {"s": round(elapsed, 2), "method": method, "recall_at_k": round(recall, 3),
            "median_relative_distance_error": round(rel, 3)}


def run_datacomp_clip(repo: str, dc_dir: str, fraction: float) -> dict:
    """DataComp's CLIP-score baseline, imported from a checkout (modules it imports but this path does not use are
    stubbed: fasttext, gcld3, nltk)."""
    import types

    for mod in ("fasttext", "gcld3", "nltk", "nltk.corpus"):
        if mod not in sys.modules:
            stub = types.ModuleType(mod)
            stub.FastText = types.SimpleNamespace(eprint=None)
            stub.wordnet = None
            sys.modules[mod] = stub
    sys.path.insert(0, repo)
    from baselines.apply_filter import load_uids_with_clip_score

    t0 = time.perf_counter()
    uids = load_uids_with_clip_score(dc_dir, "l14", None, fraction, 1)
    return {"s": round(time.perf_counter() - t0, 2), "kept": len(uids)}


def run_d2pruning(repo: str, dc_dir: str, out: str, fraction: float, k: int) -> dict:
    """d2pruning's DataComp pipeline (IVF-PQ graph, image+text), its own functions in its own order."""
    import multiprocessing
    import pickle

    import pandas as pd

    # their worker pools fork after pyarrow/faiss started threads, which can deadlock; spawn is safe
    multiprocessing.set_start_method("spawn", force=True)
    sys.path.insert(0, repo)
    import select_d2_datacomp as d2

    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    phases = {}
    t0 = time.perf_counter()
    parquets = sorted(str(p) for p in Path(dc_dir).glob("*.parquet"))
    scores, offset, offsets = [], 0, {}
    for p in parquets:
        s = pd.read_parquet(p, columns=["clip_l14_similarity_score"])["clip_l14_similarity_score"].to_numpy()
        offsets[p] = offset
        offset += len(s)
        scores.append(s)
    np.save(out_p / "clip_scores.npy", np.concatenate(scores))
    pickle.dump(offsets, open(out_p / "offsets.pkl", "wb"))
    uids, feats = d2.load_features(dc_dir, 0.02, 1, "image|text")
    np.save(out_p / "train.npy", feats)
    phases["load_sample"] = time.perf_counter() - t0
    print(f"load_sample done: {phases['load_sample']:.0f} s", flush=True)  # a stopped run's log says how far it got
    t = time.perf_counter()
    d2.create_faiss_index(str(out_p / "train.npy"), str(out_p / "ivfpq.index"), feats.shape[1])
    d2.add_to_index(dc_dir, str(out_p / "ivfpq.index"), "image|text")
    phases["index"] = time.perf_counter() - t
    print(f"index done: {phases['index']:.0f} s", flush=True)
    t = time.perf_counter()
    uids, neighbors, graph_scores, clip_scores, distances = d2.initialize_graph(
        dc_dir, str(out_p / "ivfpq_added.index"), str(out_p / "clip_scores.npy"), str(out_p / "offsets.pkl"), 1,
        "image|text", k)
    phases["graph"] = time.perf_counter() - t
    print(f"graph done: {phases['graph']:.0f} s", flush=True)
    for name, arr in (("g", graph_scores), ("n", neighbors), ("c", clip_scores), ("d", distances)):
        np.save(out_p / f"{name}.npy", arr)
    t = time.perf_counter()
    sel = d2.iterative_selection(str(out_p / "g.npy"), str(out_p / "n.npy"), str(out_p / "c.npy"),
                                 str(out_p / "d.npy"), fraction)
    phases["select"] = time.perf_counter() - t
    return {"s": round(time.perf_counter() - t0, 2), "kept": len(sel),
            "phases": {k: {"s": round(v, 2)} for k, v in phases.items()}}


def child(argv: list[str]) -> dict:
    """Run one measurement in a fresh process; add its wall time and peak RSS (from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "_child", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        return {"error": f"exit {os.waitstatus_to_exitcode(status)}", "process_s": round(wall, 2)}
    res = json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {}
    res.update(process_s=round(wall, 2), process_peak_mb=round(usage.ru_maxrss / 1024))
    return res


def whole_process(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    return {"process_s": round(time.perf_counter() - t0, 2), "process_peak_mb": round(usage.ru_maxrss / 1024),
            "rc": os.waitstatus_to_exitcode(status)}


# --- the plan ---------------------------------------------------------------------------------------------------------
def plan(n: int, args) -> list[tuple[str, str, dict]]:
    """(label, space, params) of our runs at size n."""
    fast = {"caption_filter": False, "kmeans_sample": n // 4, "niter": args.niter, "pca_dim": args.pca_dim,
            "candidates": args.candidates, "samples_per_cluster": 128}
    runs = [("clip_score", "img768", {}), ("image_based", "img768", fast), ("d2_pruning", "pair512", {"k": 10})]
    if n <= args.datacomp_setting_max:
        runs.append(("image_based@datacomp", "img768", {"caption_filter": False, "kmeans_sample": 0, "niter": 20,
                                                        "samples_per_cluster": 128}))
    if n <= args.all_max:
        runs += [("none", "img768", {}), ("random", "img768", {}), ("basic", "img768", {"language": ""}),
                 ("semdedup", "img768", {"kmeans_sample": n // 4, "niter": args.niter}),
                 ("negclip", "img768", {}), ("normsim", "img768", {}), ("vae_outlier", "img768", {"epochs": 2}),
                 ("image_based_clip_score", "img768", fast)]
    return runs


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        kind, *rest = sys.argv[2:]
        if kind == "ours":
            pool, space, name, params = rest
            res = run_ours(pool, space, name, json.loads(params))
        elif kind == "knn_recall":
            res = knn_recall(*rest)
        elif kind == "data":
            make_data(int(rest[0]), Path(rest[1]))
            res = {}
        elif kind == "datacomp_clip":
            res = run_datacomp_clip(*rest[:2], float(rest[2]))
        else:
            res = run_d2pruning(*rest[:3], float(rest[3]), int(rest[4]))
        print(json.dumps(res))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--workdir", default=str(ROOT / "work" / "bench_filters"))
    ap.add_argument("--repeats", type=int, default=1, help="runs per measurement; medians are reported")
    ap.add_argument("--only", nargs="*", help="labels to run (default: all planned)")
    ap.add_argument("--niter", type=int, default=10, help="k-means iterations of the fast image-based setting "
                    "(which also trains on a quarter of the pool)")
    ap.add_argument("--pca-dim", type=int, default=64, help="PCA dimensions of the fast image-based setting")
    ap.add_argument("--candidates", type=int, default=8, help="candidate centroids of the fast image-based setting")
    ap.add_argument("--datacomp-setting-max", type=int, default=100_000,
                    help="largest size at which image-based also runs with DataComp's setting (all points, 20 it.)")
    ap.add_argument("--all-max", type=int, default=100_000, help="largest size at which every built-in runs")
    ap.add_argument("--datacomp-repo", help="a local DataComp checkout: run its CLIP-score baseline on the same files")
    ap.add_argument("--d2pruning-repo", help="a local d2pruning checkout: run its DataComp D² script's functions")
    ap.add_argument("--json", help="also write all results here")
    args = ap.parse_args()
    results = []
    for n in args.sizes:
        root = Path(args.workdir) / str(n)
        t = time.perf_counter()
        pool = root / "pool"
        if not (root / "DONE").exists():  # in a child, so this process stays small and its children's peaks honest
            child(["data", str(n), str(root)])
        print(f"\n== {n:,} samples (data ready in {time.perf_counter() - t:.0f} s: {root})", flush=True)
        measurements: list[tuple[str, list]] = []
        runs = [r for r in plan(n, args) if not args.only or r[0] in args.only]
        for label, space, params in runs:
            printed = len(measurements)
            name = label.split("@")[0]
            reps = [child(["ours", str(pool), space, name, json.dumps(params)]) for _ in range(args.repeats)]
            measurements.append((label, reps))
            if name == "clip_score":
                cmd = [sys.executable, "-m", "datafilter", "-q", "filter", "clip_score", str(pool), "--space", space,
                       "--out", str(root / "clip_cli.npy")]
                measurements.append(("clip_score (whole CLI process)",
                                     [whole_process(cmd) for _ in range(args.repeats)]))
                api = ("from datafilter.filters.harness import filter_pool; "
                       f"filter_pool('clip_score', {str(pool)!r}, {str(root / 'clip_api.npy')!r}, space={space!r})")
                measurements.append(("clip_score (whole process, Python API)",
                                     [whole_process([sys.executable, "-c", api]) for _ in range(args.repeats)]))
                if args.datacomp_repo:
                    measurements.append(("  DataComp clip score", [child(["datacomp_clip", args.datacomp_repo,
                                                                          str(root / "datacomp_img768"), "0.3"])
                                                                    for _ in range(args.repeats)]))
            if name == "d2_pruning":
                measurements.append(("  d2 kNN graph vs brute force", [child(["knn_recall", str(pool), space])]))
            if name == "d2_pruning" and args.d2pruning_repo:
                measurements.append(("  d2pruning (IVF-PQ)", [child(["d2pruning", args.d2pruning_repo,
                                                                     str(root / "datacomp_pair512"),
                                                                     str(root / "d2pruning_out"), "0.3", "10"])
                                                              for _ in range(args.repeats)]))
            for m in measurements[printed:]:
                report(n, *m)
        results.append({"n": n, "runs": {label: reps for label, reps in measurements}})
        _ratios(measurements)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))


def _median(reps: list[dict], key: str):
    vals = [r[key] for r in reps if key in r]
    return statistics.median(vals) if vals else None


def report(n: int, label: str, reps: list[dict]) -> None:
    if any("error" in r for r in reps):
        print(f"{label:<34} FAILED: {reps[0].get('error')}", flush=True)
        return
    inner = _median(reps, "s")
    line = f"{label:<34} process {_median(reps, 'process_s'):>7.2f} s  peak {_median(reps, 'process_peak_mb'):>6} MB"
    if inner is not None:
        kept = reps[0].get("kept")
        line += f"  (filter {inner:.2f} s" + (f", kept {kept:,})" if kept is not None else ")")
    if reps[0].get("embeddings_read_mb"):
        line += f"  embeddings read {reps[0]['embeddings_read_mb']} MB"
    print(line, flush=True)
    for phase, info in (reps[0].get("phases") or {}).items():
        s = statistics.median([r["phases"][phase]["s"] for r in reps])
        peak = f"  peak {info['peak_mb']} MB" if "peak_mb" in info else ""
        print(f"    {phase:<28} {s:>8.2f} s{peak}", flush=True)
    if reps[0].get("details"):
        print(f"    details: {reps[0]['details']}", flush=True)
    if "recall_at_k" in reps[0]:
        print(f"    recall@10 {reps[0]['recall_at_k']}, median relative distance error "
              f"{reps[0]['median_relative_distance_error']}", flush=True)


def _ratios(measurements: list[tuple[str, list]]) -> None:
    got = {label: _median(reps, "process_s") for label, reps in measurements if not any("error" in r for r in reps)}
    pairs = [("clip_score (whole CLI process)", "  DataComp clip score"),
             ("clip_score (whole process, Python API)", "  DataComp clip score"),
             ("d2_pruning", "  d2pruning (IVF-PQ)"),
             ("image_based", "image_based@datacomp")]
    for ours, theirs in pairs:
        if got.get(ours) and got.get(theirs):
            print(f"ratio {theirs.strip()} / {ours}: {got[theirs] / got[ours]:.1f}x (whole-process medians)")


if __name__ == "__main__":
    main()
