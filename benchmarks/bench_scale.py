"""Filtering DataComp's released metadata at scale: time and memory of every built-in filter on synthetic metadata
in DataComp's exact layout, side by side with DataComp's and d2pruning's own code on the same files.

    python benchmarks/bench_scale.py --sizes 1000000 4000000 --workdir /tmp/dcscale \\
        --datacomp-repo /tmp/datacomp --d2pruning-repo /tmp/d2pruning --repeats 3 --json scale.json
    python benchmarks/bench_scale.py --sizes 200000 --only clip_score image_based d2_pruning    # a quick look
    python benchmarks/bench_scale.py --recall-study             # assignment recall against exhaustive search
    python benchmarks/bench_scale.py --combine 1m.json 4m.json  # extrapolate from runs made one size at a time
    python benchmarks/bench_scale.py --sizes 4000000 --only d2_pruning --d2pruning-repo /tmp/d2pruning \
        --d2pruning-limit 1640                                  # stop theirs at twice our time: a lower bound

Data (made once per size under --workdir, deleted afterwards unless --keep-data): ``NNNNNNNN.parquet`` (uid, url,
text, original_width, original_height, clip_b32_similarity_score, clip_l14_similarity_score) + ``NNNNNNNN.npz``
(b32_img, b32_txt 512-d; l14_img, l14_txt 768-d; float16, unit vectors) per 250k-row shard, as DataComp releases
them; the scores are float16-rounded, so many tie. L/14 image vectors are points around 100k cells, children of 1,000
concepts in a low-rank subspace around a common direction (CLIP's cone); captions embed near their image (30% near
another image: mismatched; scores about 0.28 and 0.10), B/32 vectors are a random projection of L/14's. Released assets as DataComp ships them:
``small_centroids_l14.pt`` (the 100k cell means, ``torch.save`` of a float32 array, pickle protocol 4) and
``in1k_clip_vit_l14_{0..4}.pt`` (1.28M ImageNet-like features from 300 concepts, ``{"image_features": tensor}``).
Captions are English photo captions, 15% in other languages and 5% too short, so the caption filter has work; 2% of
the images are near-duplicates of others, so SemDeDup has some.

Every measurement is a fresh process (the CLI, ``datafilter filter NAME DIR --datacomp l14``, as a user runs it);
memory is sampled every 50 ms over the process and its children: ``anon`` (RssAnon: what the processes hold beyond
pages of memory-mapped files) and ``rss`` (all resident pages). With two sizes, each filter's time and anon memory
are extrapolated to --extrapolate rows (12.8M, DataComp small) from the measured growth (time ~ N^b, memory linear).

Reference code (optional local checkouts, imported at run time, never copied): DataComp's
``load_uids_with_clip_score`` (its ``gcld3`` and ``nltk`` imports, unused on this path, are stubbed) and, with
--datacomp-image-rows, its ``load_uids_with_image_filter`` on the first rows' shard, with its CUDA assignment run by
the same torch code on the CPU, ``download`` pointed at the synthetic assets, ``torch.load`` allowed to unpickle
them, and the installed prediction-only fastText given ``tokenize`` and batch ``predict`` (stubs, named in the
output); d2pruning's ``select_d2_datacomp.py`` pipeline (bench_filters.run_d2pruning), which logs each of its
phases as it ends, so a run stopped by --d2pruning-limit shows how far it got.

A size's data can also be the first shards of a larger size's (symbolic links to its files and assets, and a
``DONE`` file), which spares the disk a second data set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SHARD = 250_000
# Rows generated at a time: temporaries small enough for the allocator to reuse (fresh memory is slow to touch on
# virtual machines that hand freed pages back to their host; see datafilter.filters.ops.float32_rows).
GEN_CHUNK = 8192
CELLS, CONCEPTS, IMAGENET, IMAGENET_CONCEPTS = 100_000, 1000, 1_281_167, 300
EN = ["a photo of a {}", "close-up of a {} on a table", "the {} in the garden", "my new {}", "{} for sale",
      "a {} at sunset", "vintage {} illustration", "two {}s in the snow", "a small {} near the window"]
OTHER = ["une photo de {}", "ein {} im Garten", "un {} en la playa", "{} に関する写真", "foto di un {}"]
WORDS = ["dog", "cat", "bicycle", "lamp", "house", "flower", "car", "mountain", "bird", "chair", "guitar", "boat",
         "tree", "cake", "shoe", "clock", "horse", "bridge", "kite", "teapot"]


# --- data --------------------------------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class World:
    """The generating structure: concepts, cells, and how a point is drawn around its cell."""

    def __init__(self, d: int = 768, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.d = d
        mu = _unit(rng.standard_normal((1, d)))[0]
        u = np.linalg.qr(rng.standard_normal((d, 128)))[0]
        self.v = np.linalg.qr(rng.standard_normal((d, 256)))[0].astype(np.float32)
        concepts = _unit(0.6 * mu + 0.8 * _unit(rng.standard_normal((CONCEPTS, 128)) @ u.T))
        self.parent = rng.integers(0, CONCEPTS, CELLS)
        self.cells = _unit(concepts[self.parent] + 0.2 * _unit(rng.standard_normal((CELLS, 256)) @ self.v.T)
                           ).astype(np.float32)
        self.b32 = (rng.standard_normal((d, 512)) / np.sqrt(d)).astype(np.float32)
        self.text_dir = _unit(rng.standard_normal((1, d)))[0].astype(np.float32)  # captions' own cone

    def captions(self, rng: np.random.Generator, cells: np.ndarray) -> np.ndarray:
        """Caption embeddings of images of ``cells``: cosine about 0.28 with a matching image and 0.10 with
        another, as CLIP L/14 scores run."""
        noise = _unit(rng.standard_normal((len(cells), self.d), np.float32))
        return _unit(0.4 * self.points(rng, cells) + 0.8 * self.text_dir + 0.6 * noise).astype(np.float32)

    def points(self, rng: np.random.Generator, cells: np.ndarray) -> np.ndarray:
        n = len(cells)
        x = self.cells[cells] + 0.3 * _unit(rng.standard_normal((n, 256), np.float32) @ self.v.T)
        x += 0.5 / np.sqrt(self.d) * rng.standard_normal((n, self.d), np.float32)
        return _unit(x).astype(np.float32)


def make_data(n: int, out: Path, seed: int = 0, imagenet: int = IMAGENET) -> Path:
    """DataComp-layout metadata for ``n`` rows plus the released assets; skipped if already complete."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    meta = out / "metadata"
    if (out / "DONE").exists():
        return meta
    shutil.rmtree(out, ignore_errors=True)
    meta.mkdir(parents=True)
    world = World(seed=seed)
    rng = np.random.default_rng(seed + 1)
    for shard, lo in enumerate(range(0, n, SHARD)):
        m = min(SHARD, n - lo)
        arrays = {k: np.empty((m, 768 if k.startswith("l14") else 512), np.float16)
                  for k in ("b32_img", "b32_txt", "l14_img", "l14_txt")}
        for s in range(0, m, GEN_CHUNK):
            e = min(m, s + GEN_CHUNK)
            cells = rng.integers(0, CELLS, e - s)
            img = world.points(rng, cells)
            dup = np.flatnonzero(rng.random(e - s) < 0.02)  # near-duplicates of other rows of the chunk
            src = rng.integers(0, e - s, len(dup))
            img[dup] = _unit(img[src] + 0.05 / np.sqrt(768) * rng.standard_normal((len(dup), 768), np.float32))
            cells[dup] = cells[src]
            mismatched = rng.random(e - s) < 0.3
            cells = np.where(mismatched, rng.integers(0, CELLS, e - s), cells)
            txt = world.captions(rng, cells)
            arrays["l14_img"][s:e], arrays["l14_txt"][s:e] = img, txt
            arrays["b32_img"][s:e] = _unit(img @ world.b32)
            arrays["b32_txt"][s:e] = _unit(txt @ world.b32)
        scores = {}
        for model in ("b32", "l14"):  # the score of the stored float16 vectors, rounded to float16: ties
            a, b = arrays[f"{model}_img"], arrays[f"{model}_txt"]
            scores[model] = np.concatenate([np.einsum("nd,nd->n", a[s:s + GEN_CHUNK].astype(np.float32),
                                                      b[s:s + GEN_CHUNK].astype(np.float32))
                                            for s in range(0, m, GEN_CHUNK)]).astype(np.float16).astype(np.float32)
        kind = rng.random(m)
        words = np.array(WORDS)[rng.integers(0, len(WORDS), m)]
        en = np.array(EN)[rng.integers(0, len(EN), m)]
        other = np.array(OTHER)[rng.integers(0, len(OTHER), m)]
        text = [("IMG_%04d" % i) if k < 0.05 else (o if k < 0.2 else t).format(w)
                for i, (k, w, t, o) in enumerate(zip(kind, words, en, other))]
        hexes = [f"{a:016x}{b:016x}" for a, b in rng.integers(0, 2**63, size=(m, 2))]
        table = pa.table({"uid": hexes, "url": [f"http://example.com/{lo + i}.jpg" for i in range(m)], "text": text,
                          "original_width": rng.integers(100, 1200, m), "original_height": rng.integers(100, 1200, m),
                          "clip_b32_similarity_score": scores["b32"], "clip_l14_similarity_score": scores["l14"]})
        pq.write_table(table, meta / f"{shard:08d}.parquet")
        np.savez(meta / f"{shard:08d}.npz", **arrays)
        print(f"  shard {shard}: {m:,} rows", flush=True)
    cent = np.zeros((CELLS, 768), np.float32)
    for _ in range(6):  # each cell's mean of six points: what k-means would put there
        for s in range(0, CELLS, GEN_CHUNK):
            cent[s:s + GEN_CHUNK] += world.points(rng, np.arange(s, min(CELLS, s + GEN_CHUNK)))
    torch.save(cent / 6, out / "small_centroids_l14.pt", pickle_protocol=4)
    chosen = rng.choice(CONCEPTS, IMAGENET_CONCEPTS, replace=False)
    pool_cells = np.flatnonzero(np.isin(world.parent, chosen))
    for i, part in enumerate(np.array_split(np.arange(imagenet), 5)):
        cells = rng.choice(pool_cells, len(part))
        feats = np.empty((len(part), 768), np.float16)
        for s in range(0, len(part), GEN_CHUNK):
            feats[s:s + GEN_CHUNK] = world.points(rng, cells[s:s + GEN_CHUNK])
        torch.save({"image_features": torch.from_numpy(feats)}, out / f"in1k_clip_vit_l14_{i}.pt")
    (out / "DONE").write_text("ok\n")
    return meta


# --- measuring ---------------------------------------------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _mem_kb(pids: list[int]) -> tuple[int, int]:
    anon = rss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1])
                    elif line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
        except OSError:
            pass
    return anon, rss


def measure(cmd: list[str], log: Path | None = None, env: dict | None = None, limit: float = 0) -> dict:
    """Wall time and peak memory (RssAnon and RSS, summed over the process tree, sampled every 50 ms). ``limit``
    (seconds, 0: none): stop the process tree there and record ``"stopped_at_s"``; enough to show that a
    reference implementation is slower than ours without waiting for it."""
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
    peak_anon = peak_rss = 0
    stopped = False
    while proc.poll() is None:
        anon, rss = _mem_kb(_tree(proc.pid))
        peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss)
        if limit and time.perf_counter() - t0 > limit and not stopped:
            for pid in _tree(proc.pid):  # its worker processes too (same session: Ctrl-C still reaches them)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            stopped = True
        time.sleep(0.05)
    if log:
        out.close()
    r = {"s": round(time.perf_counter() - t0, 2), "anon_mb": round(peak_anon / 1024),
         "rss_mb": round(peak_rss / 1024), "rc": proc.returncode}
    return r | ({"stopped_at_s": limit} if stopped else {})


def datafilter_cmd(name: str, meta: Path, out: Path, params: dict, workdir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "datafilter", "-q", "filter", name, str(meta), "--datacomp", "l14", "--out",
           str(out), "--workdir", str(workdir)]
    for k, v in params.items():
        cmd += ["--param", f"{k}={v}"]
    return cmd


def subset_uids(path: Path) -> np.ndarray:
    return np.load(path)


def _stub_unused_imports() -> None:
    """DataComp's ``apply_filter`` imports gcld3 and nltk at the top; the paths run here use neither."""
    import types

    for mod in ("gcld3", "nltk", "nltk.corpus"):
        if mod not in sys.modules:
            stub = types.ModuleType(mod)
            stub.wordnet = None
            sys.modules[mod] = stub


def child_datacomp_clip(repo: str, meta: str, fraction: float, out: str, workers: int) -> None:
    _stub_unused_imports()
    sys.path.insert(0, repo)
    from baselines.apply_filter import load_uids_with_clip_score

    uids = load_uids_with_clip_score(meta, "l14", None, fraction, workers)
    np.save(out, np.sort(uids))


def child_datacomp_image(repo: str, meta: str, data: str, out: str) -> None:
    """DataComp's image-based baseline on the CPU, with the stubs named in the module docstring."""
    import torch

    torch.set_num_threads(1)  # its workers are forked: an OpenMP pool started before the fork would deadlock them
    from datafilter.filters.language import bundled_fasttext_model, fasttext_tokens

    _stub_unused_imports()
    import fasttext

    real_load = fasttext.load_model

    class Model:  # the prediction-only fastText build: batch predict and tokenize added
        def __init__(self, path):
            self.m = real_load(path)

        def predict(self, text, k=1):
            if isinstance(text, list):
                return [self.m.predict(t, k=k)[0] for t in text], None
            return self.m.predict(text, k=k)

    fasttext.load_model = Model
    fasttext.tokenize = fasttext_tokens
    real_torch_load = torch.load
    torch.load = lambda f, *a, **kw: real_torch_load(f, *a, **{**kw, "weights_only": False})
    sys.path.insert(0, repo)
    import baselines.apply_filter as af

    assets = {"fasttext": str(bundled_fasttext_model()), "small_centroids": f"{data}/small_centroids_l14.pt",
              **{f"in1k_clip_vit_l14_{i}": f"{data}/in1k_clip_vit_l14_{i}.pt" for i in range(5)}}
    af.download = lambda name, root=None: assets[name]

    @torch.no_grad()
    def on_cpu(features, centroids, batch_size, device):  # get_centroid_ids_gpu's computation, device "cpu"
        labels = torch.zeros(features.shape[0], dtype=torch.long)
        for i in range(0, features.shape[0], batch_size):
            sim = torch.einsum("ik, jk -> ij", features[i:i + batch_size, :].float(), centroids.float())
            labels[i:i + batch_size] = torch.argmax(sim, dim=1).long()
        return labels

    af.get_centroid_ids_gpu = on_cpu
    uids = af.load_uids_with_image_filter(meta, "small", 1, 4096)
    np.save(out, np.sort(uids))


def child(kind: str, *args: str) -> None:
    if kind == "data":
        make_data(int(args[0]), Path(args[1]), imagenet=int(args[2]))
    elif kind == "datacomp_clip":
        child_datacomp_clip(args[0], args[1], float(args[2]), args[3], int(args[4]))
    elif kind == "datacomp_image":
        child_datacomp_image(*args)
    elif kind == "d2pruning":
        from bench_filters import run_d2pruning

        print(json.dumps(run_d2pruning(args[0], args[1], args[2], float(args[3]), int(args[4]))))
    elif kind == "knn_recall":
        print(json.dumps(knn_recall(Path(args[0]), args[1])))


def knn_recall(meta: Path, workdir: str, queries: int = 300) -> dict:
    """Recall of D²'s graph (k = 10 on image+text) against brute force on sampled rows."""
    from datafilter.filters import FilterView
    from datafilter.filters.ops import Rows, knn_graph

    view = FilterView.from_datacomp(meta)
    src = Rows([view.image_embeddings(), view.text_embeddings()])
    ids, _, method = knn_graph(src, 10, workdir=workdir, copy=True)
    q = np.sort(np.random.default_rng(0).choice(len(src), queries, replace=False))
    fq = src.get(q)
    best = np.full((queries, 11), np.inf, np.float32)
    best_id = np.zeros((queries, 11), np.int64)
    for s in range(0, len(src), 65536):
        block = src.get(slice(s, s + 65536))
        d = (fq * fq).sum(1)[:, None] + (block * block).sum(1)[None, :] - 2 * fq @ block.T
        allv, alli = np.hstack([best, d]), np.hstack([best_id, np.arange(s, s + len(block))[None].repeat(queries, 0)])
        sel = np.argpartition(allv, 10, axis=1)[:, :11]
        best, best_id = np.take_along_axis(allv, sel, 1), np.take_along_axis(alli, sel, 1)
    recall = np.mean([len(set(ids[qi]) & (set(b) - {qi})) / 10 for qi, b in zip(q, best_id)])
    return {"recall_at_10": round(float(recall), 3), "method": method}


# --- the plan ------------------------------------------------------------------------------------------------------------
def plan(data: Path) -> list[tuple[str, str, dict]]:
    """(label, filter, params): every built-in, at the settings a DataComp-small user would use on this machine."""
    released = {"centroids": data / "small_centroids_l14.pt", "reference": data / "in1k_clip_vit_l14_*.pt"}
    return [
        ("none", "none", {}),
        ("random", "random", {}),
        ("basic", "basic", {}),
        ("clip_score", "clip_score", {"fraction": 0.3}),
        ("image_based", "image_based", {**released, "recall_sample": 10000}),
        ("image_based_clip_score", "image_based_clip_score", {**released, "fraction": 0.3}),
        ("d2_pruning", "d2_pruning", {"fraction": 0.3}),
        ("semdedup", "semdedup", {"kmeans_sample": 500_000}),
        ("negclip", "negclip", {}),
        ("normsim", "normsim", {"reference": data / "in1k_clip_vit_l14_*.pt"}),
        ("normsim_2", "normsim", {"reference": data / "in1k_clip_vit_l14_*.pt", "p": "2"}),
        ("vae_outlier", "vae_outlier", {"epochs": 1}),
    ]


def median(reps: list[dict], key: str):
    vals = [r[key] for r in reps if key in r]
    return statistics.median(vals) if vals else None


def report(label: str, reps: list[dict], extra: str = "") -> None:
    if any(r.get("rc") for r in reps):
        print(f"{label:<34} FAILED (exit {reps[0]['rc']}; log {reps[0].get('log')})", flush=True)
        return
    times = ", ".join(f"{r['s']:.1f}" for r in reps)
    print(f"{label:<34} {median(reps, 's'):>9.2f} s (runs {times})  anon {median(reps, 'anon_mb'):>6} MB  "
          f"rss {median(reps, 'rss_mb'):>6} MB {extra}", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child(*sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[200_000])
    ap.add_argument("--workdir", default="/tmp/datafilter_scale")
    ap.add_argument("--only", nargs="*", help="labels to run (default: all)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per measurement (medians reported)")
    ap.add_argument("--imagenet", type=int, default=IMAGENET, help="ImageNet-like reference features")
    ap.add_argument("--datacomp-repo", help="a local DataComp checkout: its CLIP-score code on the same files")
    ap.add_argument("--datacomp-workers", type=int, default=2, help="DataComp's num_workers")
    ap.add_argument("--datacomp-image-rows", action="store_true",
                    help="also run DataComp's image-based code (CPU, stubs) on the first shard and compare uids")
    ap.add_argument("--d2pruning-repo", help="a local d2pruning checkout: its DataComp D² pipeline on the same files")
    ap.add_argument("--d2pruning-limit", type=float, default=0,
                    help="stop d2pruning's run after this many seconds (0: let it finish); a run stopped there shows "
                         "it takes longer than that")
    ap.add_argument("--knn-recall", action="store_true", help="also measure D²'s kNN recall@10 (k=10 graph)")
    ap.add_argument("--extrapolate", type=int, default=12_800_000)
    ap.add_argument("--keep-data", action="store_true", help="keep the synthetic data (default: deleted after)")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--recall-study", action="store_true", help="only the assignment recall study")
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="only extrapolate, from the --json files of earlier runs (one size each, when the disk holds "
                         "one size's data at a time)")
    args = ap.parse_args()
    if args.recall_study:
        recall_study()
        return
    if args.combine:
        combined = {int(n): r for f in args.combine for n, r in json.loads(Path(f).read_text()).items()}
        extrapolate(combined, args.extrapolate)
        return
    results: dict[int, dict] = {}
    for n in args.sizes:
        root = Path(args.workdir) / str(n)
        need = n * (768 + 768 + 512 + 512) * 2 + args.imagenet * 768 * 2 + 2**30
        if not (root / "DONE").exists() and shutil.disk_usage(Path(args.workdir).parent).free < 2.2 * need:
            print(f"{n:,} rows need about {2.2 * need / 2**30:.0f} GiB of disk (data and D²'s working copy); skipped")
            continue
        t = time.perf_counter()
        r = measure([sys.executable, __file__, "_child", "data", str(n), str(root), str(args.imagenet)])
        if r["rc"]:
            raise SystemExit(f"data generation failed ({r})")
        meta = root / "metadata"
        print(f"\n== {n:,} rows in DataComp's layout ({time.perf_counter() - t:.0f} s: {root}); "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        res: dict[str, list[dict]] = {}
        for label, name, params in plan(root):
            if args.only and label not in args.only:
                continue
            reps = []
            for rep in range(args.repeats):
                out = root / "subsets" / f"{label}.npy"
                out.parent.mkdir(exist_ok=True)
                r = measure(datafilter_cmd(name, meta, out, params, root / "work"), log=root / f"{label}.log")
                r["log"] = str(root / f"{label}.log")
                if not r["rc"]:
                    side = json.loads(out.with_suffix(".json").read_text())
                    r.update(kept=side["kept"], timings=side["timings_s"], details=side["details"])
                reps.append(r)
            res[label] = reps
            detail = ""
            if reps and not reps[0].get("rc"):
                detail = f"kept {reps[0]['kept']:,}; phases {reps[0]['timings']}"
                rec = (reps[0]["details"].get("assignment") or {}).get("recall_sample")
                if rec:
                    detail += f"; assignment agrees with exhaustive on {rec['agree_with_exhaustive']:.4f} of " \
                              f"{rec['rows']:,} sampled rows"
            report(label, reps, detail)
            if label == "clip_score" and args.datacomp_repo and not reps[0].get("rc"):
                theirs = []
                for rep in range(args.repeats):
                    dc_out = root / "subsets" / "datacomp_clip.npy"
                    theirs.append(measure([sys.executable, __file__, "_child", "datacomp_clip", args.datacomp_repo,
                                           str(meta), "0.3", str(dc_out), str(args.datacomp_workers)],
                                          log=root / "datacomp_clip.log") | {"log": str(root / "datacomp_clip.log")})
                res["datacomp clip_score"] = theirs
                same = np.array_equal(subset_uids(root / "subsets" / "clip_score.npy"), np.load(dc_out)) \
                    if not theirs[0]["rc"] else None
                report("  DataComp load_uids_with_clip_score", theirs, f"same uids: {same}")
                if not theirs[0]["rc"]:
                    print(f"  ratio DataComp / ours: {median(theirs, 's') / median(reps, 's'):.2f}x "
                          "(whole-process medians)", flush=True)
            if label == "image_based" and args.datacomp_repo and args.datacomp_image_rows:
                one = root / "first_shard"
                one.mkdir(exist_ok=True)
                for ext in ("parquet", "npz"):
                    if not (one / f"00000000.{ext}").exists():
                        os.symlink(meta / f"00000000.{ext}", one / f"00000000.{ext}")
                dc_out, ours_out = root / "subsets" / "datacomp_image.npy", root / "subsets" / "image_first.npy"
                theirs = [measure([sys.executable, __file__, "_child", "datacomp_image", args.datacomp_repo,
                                   str(one), str(root), str(dc_out)], log=root / "datacomp_image.log")
                          | {"log": str(root / "datacomp_image.log")}]
                mine = measure(datafilter_cmd("image_based", one, ours_out, {**params, "assign": "exact"},
                                              root / "work"))
                same = (np.array_equal(np.load(ours_out), np.load(dc_out)) if not theirs[0]["rc"] and not mine["rc"]
                        else None)
                report("  DataComp image-based, shard 0 (CPU)", theirs, f"same uids as ours (exact): {same}")
                res["datacomp image_based shard 0"] = theirs
            if label == "d2_pruning" and args.d2pruning_repo:
                theirs = []
                for rep in range(args.repeats):
                    theirs.append(measure([sys.executable, __file__, "_child", "d2pruning", args.d2pruning_repo,
                                           str(meta), str(root / "d2pruning_out"), "0.3", "1"],
                                          log=root / "d2pruning.log", limit=args.d2pruning_limit)
                                  | {"log": str(root / "d2pruning.log")})
                res["d2pruning"] = theirs
                shutil.rmtree(root / "d2pruning_out", ignore_errors=True)  # its index and arrays: GBs at 4M rows
                if theirs[0].get("stopped_at_s"):
                    print(f"  d2pruning select_d2_datacomp (k=1): not finished after {theirs[0]['s']:.0f} s, "
                          f"stopped; peak RssAnon {theirs[0]['anon_mb']} MB; phases done: "
                          f"{(root / 'd2pruning.log').read_text().count(' done: ')} (in {root / 'd2pruning.log'})",
                          flush=True)
                else:
                    report("  d2pruning select_d2_datacomp (k=1)", theirs)
                if not theirs[0]["rc"] and not reps[0].get("rc"):
                    print(f"  ratio d2pruning / ours: {median(theirs, 's') / median(reps, 's'):.2f}x", flush=True)
            if label == "d2_pruning" and args.knn_recall:
                r = measure([sys.executable, __file__, "_child", "knn_recall", str(meta), str(root / "work_recall")],
                            log=root / "knn_recall.log")
                print(f"  kNN recall: {(root / 'knn_recall.log').read_text().strip().splitlines()[-1]}", flush=True)
        results[n] = res
        if args.json:
            Path(args.json).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2, default=str))
        if not args.keep_data:
            shutil.rmtree(root, ignore_errors=True)
    if len(results) >= 2:
        extrapolate(results, args.extrapolate)


def extrapolate(results: dict[int, dict], target: int) -> None:
    (n1, r1), (n2, r2) = sorted(results.items())[-2:]
    print(f"\n== extrapolated to {target:,} rows from {n1:,} and {n2:,} (time ~ N^b, memory linear; \"linear\": "
          f"the larger size's time scaled by rows, right where the work per row is fixed; \"fixed + per row\": the "
          f"line through both sizes, right where a fixed cost such as a reference index comes on top)")
    for label in r2:
        a, b = r1.get(label), r2.get(label)
        if not a or not b or any(x.get("rc") for x in a + b):
            continue
        t1, t2 = median(a, "s"), median(b, "s")
        exp = math.log(t2 / t1) / math.log(n2 / n1) if t1 > 0 and t2 > 0 else 1.0
        m1, m2 = median(a, "anon_mb"), median(b, "anon_mb")
        mem = m2 + (m2 - m1) * (target - n2) / (n2 - n1)
        per_row = (t2 - t1) / (n2 - n1)
        print(f"{label:<34} {t2 * (target / n2) ** exp:>9.0f} s (b = {exp:.2f}; linear {t2 * target / n2:.0f} s; "
              f"fixed + per row {t2 + per_row * (target - n2):.0f} s)  anon {mem:>7.0f} MB")


def recall_study(queries: int = 5000, seed: int = 0) -> None:
    """How often inverted lists over 100k centroids give the exhaustive search's centroid, against nprobe, for
    the benchmark's clustered centroids and for a harder set spread evenly in a 256-d subspace (no concepts)."""
    from datafilter.filters.ops import InnerProductIndex

    world = World(seed=seed)
    rng = np.random.default_rng(seed)
    hard_cells = _unit(0.6 * world.cells.mean(0) + 0.8 * _unit(rng.standard_normal((CELLS, 256)) @ world.v.T)
                       ).astype(np.float32)
    for label, cells in (("clustered (the benchmark's)", world.cells), ("even in 256-d (harder)", hard_cells)):
        world.cells = cells
        cent = sum(world.points(rng, np.arange(CELLS)) for _ in range(6)) / 6
        q = world.points(rng, rng.integers(0, CELLS, queries))
        exact = InnerProductIndex(cent, method="exact").search(q)[0]
        for nprobe in (8, 16, 32, 64):
            index = InnerProductIndex(cent, method="ivf", nprobe=nprobe, seed=seed)
            t = time.perf_counter()
            got = index.search(q)[0]
            print(f"{label:<30} nprobe {nprobe:>3}: agrees with exhaustive on {np.mean(got == exact):.4f} of "
                  f"{queries} rows, {1e6 * (time.perf_counter() - t) / queries:.0f} µs per row", flush=True)


if __name__ == "__main__":
    main()
