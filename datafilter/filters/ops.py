"""Numerical building blocks shared by the built-in filters: global quantiles, chunked float32 reads of float16
embeddings, k-means, nearest-centroid assignment (exhaustive or by inverted lists), kNN graphs (faiss and BLAS,
threads = free cores), memory checks and working arrays on disk for inputs larger than memory."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from datafilter.common.launch import free_cores

log = logging.getLogger(__name__)

CHUNK = 32768
READ_BLOCK = 4096  # rows gathered at a time into a chunk's buffer (see float32_rows)


def faiss_threads(threads: int = 0):
    """Import faiss with its OpenMP pool sized to the cores this process may use."""
    import faiss

    faiss.omp_set_num_threads(threads or free_cores())
    return faiss


def top_fraction_mask(scores: np.ndarray, fraction: float) -> np.ndarray:
    """DataComp's global top-fraction rule: ``n = int(N * fraction)``, threshold = the score at index ``n`` of the
    scores sorted in decreasing order, keep every score ``>= threshold`` (so ties at the threshold are all kept).

    ``N`` counts only finite scores; NaN (no embedding) is never kept. ``np.partition`` finds the threshold in
    linear time instead of sorting a million scores.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    finite = np.isfinite(scores)
    vals = scores[finite]
    n = int(len(vals) * fraction)
    if n >= len(vals):
        return finite
    threshold = np.partition(vals, len(vals) - 1 - n)[len(vals) - 1 - n]
    return finite & (scores >= threshold)


def float32_rows(arr: np.ndarray, rows: np.ndarray, chunk: int = CHUNK, desc: str | None = None
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, arr[rows[start:start+chunk]] as float32)`` for consecutive chunks: memory stays one chunk.

    Every chunk is written into one buffer, and the block yielded is a view of it, valid until the next chunk (use
    it or copy it). Fresh memory for each chunk would cost more than reading it: on a virtual machine that hands
    freed memory back to its host, a page costs about 16 ms per MB the first time it is touched (measured on the
    project's 2-core machine, against 0.1 ms once reused)."""
    buf = None
    for start in tqdm(range(0, len(rows), chunk), desc=desc, disable=desc is None or len(rows) <= chunk,
                      unit="chunk"):
        idx = rows[start:start + chunk]
        if buf is None:
            buf = np.empty((len(idx), arr.shape[1]), np.float32)
        yield start, _fill(buf[:len(idx)], arr, idx)


def gather_float32(arr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``arr[rows]`` as one float32 array (a k-means or PCA sample), filled in place."""
    return _fill(np.empty((len(rows), arr.shape[1]), np.float32), arr, rows)


def _fill(out: np.ndarray, arr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``out[:] = arr[rows]``, converted on assignment, ``READ_BLOCK`` rows at a time: the temporaries of the gather
    stay small enough for the allocator to reuse (see ``float32_rows``)."""
    for s in range(0, len(rows), READ_BLOCK):
        out[s:s + READ_BLOCK] = arr[rows[s:s + READ_BLOCK]]
    return out


def gpu_count() -> int:
    """GPUs faiss can use (0 with the CPU-only faiss wheel)."""
    faiss = faiss_threads()
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:
        return 0


def kmeans(x: np.ndarray, k: int, *, niter: int, seed: int, spherical: bool = False, gpu: bool = False
           ) -> np.ndarray:
    """faiss k-means on float32 ``x`` with every point used (faiss would otherwise subsample to 256 per centroid;
    choosing a sample is the caller's documented decision), on the GPUs when ``gpu`` and faiss sees any (DataComp
    clusters on GPUs). Returns ``[k, d]`` float32 centroids."""
    faiss = faiss_threads()
    k = max(1, min(k, len(x)))
    use_gpu = bool(gpu) and gpu_count() > 0
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=spherical, verbose=False, gpu=use_gpu,
                      max_points_per_centroid=max(1, (len(x) + k - 1) // k) + 1, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(x, np.float32))
    return np.asarray(km.centroids, np.float32)


def available_memory() -> int:
    """Bytes of memory the kernel says a new allocation can get without swapping (``MemAvailable``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_memory(nbytes: float, what: str, hint: str = "") -> None:
    """Refuse, before the work starts, a step that needs more memory than is available (a swap storm or the OOM
    killer would come hours later)."""
    avail = available_memory()
    if nbytes > 0.9 * avail:
        raise ValueError(f"{what} needs {nbytes / 2**30:.1f} GiB of memory and {avail / 2**30:.1f} GiB are "
                         f"available{'; ' + hint if hint else ''}")


def check_disk(path: Path, nbytes: float, what: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if nbytes > free:
        raise ValueError(f"{what} needs {nbytes / 2**30:.1f} GiB of disk in {path} and {free / 2**30:.1f} GiB are "
                         "free; free space or choose another work directory (--workdir)")


# Below this many vectors an exhaustive search is as fast as inverted lists (and exact).
IVF_MIN_VECTORS = 16384
# Queries per matrix product of an inverted-list search: large enough for BLAS, small enough to share out evenly.
QUERY_BLOCK = 1024


class InnerProductIndex:
    """For each query, the vector of a fixed set (k-means centroids, a target set) with the largest inner product:
    DataComp's nearest-centroid rule, at a cost that makes 100k centroids feasible on a CPU.

    ``exact``: every vector is compared (faiss's flat index; ties go to the lowest index). ``ivf``: k-means splits
    the vectors into ``nlist`` groups (0: about 3.2 sqrt(k), 1,012 for 100k centroids); a query is compared exactly
    with the members of the ``nprobe`` groups whose centres have the largest inner products with it, so its answer
    differs from the exact one only when its best vector lies in a group not probed (``recall`` measures how often
    on a sample). Each group's members meet all the queries of a chunk that probe it in one matrix product, a
    thread per free core. ``auto``: ``exact`` below ``IVF_MIN_VECTORS`` vectors, else ``ivf``.
    """

    def __init__(self, vectors: np.ndarray, *, method: str = "auto", nlist: int = 0, nprobe: int = 32,
                 seed: int = 0, niter: int = 10):
        faiss = faiss_threads()
        k, d = vectors.shape
        if method == "auto":
            method = "exact" if k < IVF_MIN_VECTORS else "ivf"
        if method not in ("exact", "ivf"):
            raise ValueError(f"unknown assignment method {method!r} (auto, exact, ivf)")
        self.method, self.k, self.dim = method, k, d
        if method == "exact":
            self.flat = faiss.IndexFlatIP(d)
            self.flat.add(np.ascontiguousarray(vectors, np.float32))
            return
        nlist = min(k, nlist or max(1, int(round(3.2 * np.sqrt(k)))))
        # the groups' k-means sees at most 64 vectors per group, as faiss's own training would subsample
        centres = kmeans(gather_float32(vectors, sample_rows(np.arange(k), nlist * 64, seed)), nlist, niter=niter,
                         seed=seed)
        coarse = faiss.IndexFlatL2(d)
        coarse.add(centres)
        group = np.empty(k, np.int64)
        for start, block in float32_rows(vectors, np.arange(k)):
            group[start:start + len(block)] = coarse.search(block, 1)[1][:, 0]
        order = np.argsort(group, kind="stable")  # members of a group in increasing index order
        self.bounds = np.searchsorted(group[order], np.arange(nlist + 1))
        self.members = order
        # kept in the vectors' own precision (float16 targets stay half the size); widened a group at a time,
        # which is exact
        self.grouped = np.ascontiguousarray(vectors[order])
        self.centres = faiss.IndexFlatIP(d)
        self.centres.add(np.ascontiguousarray(centres, np.float32))
        self.nlist, self.nprobe = nlist, max(1, min(nprobe, nlist))

    def _group(self, g: int, buf: np.ndarray | None = None) -> np.ndarray:
        """Group ``g``'s vectors as float32 (widening float16 is exact), into ``buf`` when given."""
        stored = self.grouped[self.bounds[g]:self.bounds[g + 1]]
        if stored.dtype == np.float32:
            return stored
        if buf is None:
            return stored.astype(np.float32)
        out = buf[:len(stored)]
        np.copyto(out, stored)
        return out

    def describe(self) -> dict:
        out = {"method": self.method, "vectors": self.k}
        if self.method == "ivf":
            out.update(nlist=self.nlist, nprobe=self.nprobe)
        return out

    def search_exact(self, x: np.ndarray, absolute: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Exhaustive search (under ``ivf``, over the grouped copy a group at a time, so no other copy of the
        vectors and no [queries, vectors] matrix is held); ``absolute``: of ``|<x, v>|``."""
        x = np.ascontiguousarray(x, np.float32)
        if self.method == "exact" and not absolute:
            sims, ids = self.flat.search(x, 1)
            return ids[:, 0].astype(np.int64), sims[:, 0]
        if self.method == "exact":
            best = np.maximum(self.flat.search(x, 1)[0][:, 0], self.flat.search(-x, 1)[0][:, 0])
            return np.full(len(x), -1, np.int64), best
        sims = np.full(len(x), -np.inf, np.float32)
        ids = np.zeros(len(x), np.int64)
        for g in range(self.nlist):  # every group: an exhaustive search with the grouped copy
            prod = x @ self._group(g).T
            if absolute:
                np.abs(prod, out=prod)
            if prod.shape[1] == 0:
                continue
            a = prod.argmax(axis=1)
            v = prod[np.arange(len(x)), a]
            ids_g = self.members[self.bounds[g] + a]
            better = (v > sims) | ((v == sims) & (ids_g < ids))
            sims[better], ids[better] = v[better], ids_g[better]
        return ids, sims

    def search(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(index of the best vector, its inner product)`` for each row of ``x`` ([m, d] float32)."""
        if self.method == "exact":
            return self.search_exact(x)
        import threading
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        x = np.ascontiguousarray(x, np.float32)
        m, d = x.shape
        p = self.nprobe
        top = self.centres.search(x, p)[1] if p < self.nlist else np.tile(np.arange(p), (m, 1))
        gi = top.ravel()
        pair = np.argsort(gi, kind="stable")
        qi = (pair // p).astype(np.int64)  # the query of each (query, group) pair, grouped by group
        gb = np.searchsorted(gi[pair], np.arange(self.nlist + 1))
        best = np.full(m, -np.inf, np.float32)
        best_id = np.full(m, np.iinfo(np.int64).max, np.int64)
        # Work items of at most QUERY_BLOCK queries: each thread's buffers stay small, and the items share out evenly
        # over the threads however the queries spread over the groups.
        work = [(g, s, min(gb[g + 1], s + QUERY_BLOCK)) for g in range(self.nlist)
                if self.bounds[g + 1] > self.bounds[g] for s in range(gb[g], gb[g + 1], QUERY_BLOCK)]
        widest = int(np.diff(self.bounds).max())
        local = threading.local()

        def one(item: tuple[int, int, int]):
            g, lo, hi = item
            if not hasattr(local, "x"):  # buffers reused by each thread: no fresh pages per work item
                local.x = np.empty((QUERY_BLOCK, d), np.float32)
                local.s = np.empty(QUERY_BLOCK * widest, np.float32)
                local.g = np.empty((widest, d), np.float32)
            qs = qi[lo:hi]
            xq = np.take(x, qs, axis=0, out=local.x[:len(qs)])
            group = self._group(g, local.g)
            sims = np.matmul(xq, group.T, out=local.s[: len(qs) * len(group)].reshape(len(qs), len(group)))
            a = sims.argmax(axis=1)  # first maximum: the lowest index within the group
            return qs, sims[np.arange(len(qs)), a], self.members[self.bounds[g] + a]

        with threadpool_limits(1), ThreadPoolExecutor(free_cores()) as pool:
            for qs, v, ids in pool.map(one, work):
                better = (v > best[qs]) | ((v == best[qs]) & (ids < best_id[qs]))
                best[qs[better]] = v[better]
                best_id[qs[better]] = ids[better]
        return best_id, best

    def max_abs(self, x: np.ndarray) -> np.ndarray:
        """``max_j |<x, v_j>|`` for each row of ``x``: the larger of the best inner products of ``x`` and ``-x``."""
        x = np.ascontiguousarray(x, np.float32)
        if self.method == "exact":
            return self.search_exact(x, absolute=True)[1]
        return np.maximum(self.search(x)[1], self.search(-x)[1])

    def assign(self, arr: np.ndarray, rows: np.ndarray, chunk: int = 65536, desc: str | None = None) -> np.ndarray:
        """The best vector's index for each of ``rows`` of ``arr``, read in float32 chunks."""
        out = np.empty(len(rows), np.int64)
        for start, block in float32_rows(arr, rows, chunk, desc):
            out[start:start + len(block)] = self.search(block)[0]
        return out

    def recall(self, arr: np.ndarray, rows: np.ndarray, got: np.ndarray, sample: int, seed: int) -> float | None:
        """Share of a random sample of ``rows`` whose ``got`` index is the exhaustive search's (None if exact)."""
        if self.method == "exact" or sample <= 0 or len(rows) == 0:
            return None
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), min(sample, len(rows)), replace=False))
        exact = self.search_exact(np.asarray(arr[rows[pick]], np.float32))[0]
        return float(np.mean(exact == got[pick]))


def nearest_centroid(arr: np.ndarray, rows: np.ndarray, centroids: np.ndarray, chunk: int = CHUNK,
                     desc: str | None = None) -> np.ndarray:
    """Index of the centroid with the largest inner product for each row (DataComp's assignment rule), by
    exhaustive search; ties go to the lowest centroid index."""
    return InnerProductIndex(centroids, method="exact").assign(arr, rows, chunk, desc)


def pca_kmeans(arr: np.ndarray, train_rows: np.ndarray, k: int, *, dim: int, niter: int, seed: int
               ) -> tuple[np.ndarray, "PCA"]:
    """k-means in a ``dim``-dimensional PCA projection of the training rows (the cost of every iteration drops by
    ``d / dim``); the full-dimensional centroid of a cluster is the mean of its training points, so the assignment
    rule downstream stays DataComp's (largest inner product with a full-dimensional centroid). The training rows
    are read in chunks twice rather than held as float32. Returns ``(full centroids [k, d], the PCA)``."""
    pca = PCA(gather_float32(arr, sample_rows(train_rows, 20_000, seed)), dim)
    xr = np.empty((len(train_rows), dim), np.float32)
    for start, block in float32_rows(arr, train_rows):
        xr[start:start + len(block)] = pca.apply(block)
    reduced = kmeans(xr, k, niter=niter, seed=seed)
    labels = _nearest_l2(reduced, xr, CHUNK)
    del xr
    sums = np.zeros((len(reduced), arr.shape[1]), np.float64)
    for start, block in float32_rows(arr, train_rows):
        lab = labels[start:start + len(block)]
        order = np.argsort(lab, kind="stable")
        uniq, first = np.unique(lab[order], return_index=True)
        sums[uniq] += np.add.reduceat(block[order], first, axis=0)
    counts = np.bincount(labels, minlength=len(reduced))
    full = (sums[counts > 0] / counts[counts > 0, None]).astype(np.float32)  # empty clusters cannot be nearest
    return full, pca


def nearest_centroid_pca(arr: np.ndarray, rows: np.ndarray, centroids: np.ndarray, pca, candidates: int,
                         chunk: int = 8192, desc: str | None = None) -> np.ndarray:
    """DataComp's nearest centroid (largest inner product), searched in two steps: the ``candidates`` best
    centroids in the PCA projection, then the exact full-dimensional inner product among them. Differs from the
    exhaustive search only when the true nearest centroid is not among the candidates."""
    faiss = faiss_threads()
    # x.c = (x - mean).c + mean.c ~ P(x - mean) . Pc + mean.c: one extra column carries the bias mean.c
    reduced = np.hstack([centroids @ pca.components, (centroids @ pca.mean)[:, None]]).astype(np.float32)
    index = faiss.IndexFlatIP(reduced.shape[1])
    index.add(reduced)
    c = min(candidates, len(centroids))
    out = np.empty(len(rows), np.int64)
    for start, block in float32_rows(arr, rows, chunk, desc):
        proj = np.hstack([pca.apply(block), np.ones((len(block), 1), np.float32)])
        _, cand = index.search(np.ascontiguousarray(proj, np.float32), c)
        sims = np.einsum("nd,ncd->nc", block, centroids[cand])
        # ties between candidates go to the lower centroid index, as in the exhaustive search
        tied = sims == sims.max(axis=1, keepdims=True)
        out[start:start + len(block)] = np.where(tied, cand, np.iinfo(np.int64).max).min(axis=1)
    return out


def sample_rows(rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A sorted random sample of ``size`` rows (all rows when ``size`` is 0 or not smaller)."""
    if size <= 0 or size >= len(rows):
        return rows
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size, replace=False))


def _drop_self(ids: np.ndarray, dist: np.ndarray, self_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from its k+1 results (wherever it landed; exact duplicates can come first);
    when the search missed it, drop the farthest result instead."""
    is_self = ids == self_ids[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(dist, order, 1)


class Rows:
    """Rows of one or more row-aligned arrays, concatenated along features and read as float32 on demand.

    The kNN graph reads the (float16, possibly memory-mapped) embeddings through this in chunks, so its memory is
    the index plus a chunk rather than a float32 copy of every embedding.
    """

    def __init__(self, parts: Sequence[np.ndarray], rows: np.ndarray | None = None):
        self.parts = list(parts)
        self.rows = np.arange(len(self.parts[0])) if rows is None else np.asarray(rows)
        self.dim = sum(p.shape[1] for p in self.parts)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, idx: np.ndarray | slice, dtype: type = np.float32) -> np.ndarray:
        r = self.rows[idx]
        out = np.empty((len(r), self.dim), dtype)
        lo = 0
        for p in self.parts:
            out[:, lo:lo + p.shape[1]] = p[r]
            lo += p.shape[1]
        return out


# Up to this many kNN lists, one k-means makes them; above it, two levels (see kmeans_lists).
FLAT_LISTS = 4096


def _nearest_l2(centroids: np.ndarray, x: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index of the nearest centroid (L2) of every row of ``x``, a chunk at a time."""
    faiss = faiss_threads()
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), chunk):
        out[s:s + chunk] = index.search(np.ascontiguousarray(x[s:s + chunk], np.float32), 1)[1][:, 0]
    return out


def _kmeans_cells(x: np.ndarray, k: int, sample: int, *, niter: int, seed: int) -> np.ndarray:
    """The cell of every row of ``x`` among ``k`` k-means cells trained on ``sample`` of its rows."""
    return _nearest_l2(kmeans(x[sample_rows(np.arange(len(x)), sample, seed)], k, niter=niter, seed=seed), x)


def kmeans_lists(part: np.ndarray, nlist: int, *, niter: int, seed: int, flat_max: int = FLAT_LISTS
                 ) -> np.ndarray:
    """The list of every row of ``part``: about ``nlist`` k-means cells, trained on 32 rows per list.

    Up to ``flat_max`` lists, one k-means over all of them, and every row is assigned to the nearest of ``nlist``
    centroids. Both steps cost rows × lists, so with a fixed list size (``knn_lists``) they grow as rows²: at 4M
    rows and 15,625 lists they took 294 s of the graph's 781 (in two levels: 16 s). Above ``flat_max`` the lists
    are made in two levels, as faiss does for large indexes: about sqrt(nlist) coarse cells over all rows, then
    each coarse cell split by its own k-means into lists in proportion to its rows. A row then meets about
    2 sqrt(nlist) centroids instead of ``nlist``. The cells only decide which rows are compared; every distance in
    the graph stays exact."""
    m = len(part)
    if nlist <= flat_max:
        return _kmeans_cells(part, nlist, nlist * 32, niter=niter, seed=seed)
    n_coarse = int(np.ceil(np.sqrt(nlist)))
    coarse = _kmeans_cells(part, n_coarse, nlist * 32, niter=niter, seed=seed)
    order = np.argsort(coarse, kind="stable")
    bounds = np.searchsorted(coarse[order], np.arange(n_coarse + 1))
    lists = np.empty(m, np.int64)
    first = 0
    for c in tqdm(range(n_coarse), desc="lists", unit="cell", disable=n_coarse < 64):
        rows = order[bounds[c]:bounds[c + 1]]  # sorted: one cell's rows in row order
        if not len(rows):
            continue
        fine = max(1, min(len(rows), round(nlist * len(rows) / m)))
        lists[rows] = first + (_kmeans_cells(np.asarray(part[rows], np.float32), fine, fine * 32, niter=niter,
                                             seed=seed + 1 + c) if fine > 1 else 0)
        first += fine
    return lists


def split_lists(part: np.ndarray, lists: np.ndarray, cap: int) -> np.ndarray:
    """Bisect every list of more than ``cap`` rows, recursively, at the median of its principal axis (in ``part``),
    until no list exceeds ``cap``. Returns the new list of every row (lists keep their number; halves get new ones).

    k-means cells of real data are uneven (dense regions gather several times the mean), and the kNN cost of a
    list grows with its size times the size of the lists it probes, so a few big lists dominate the time. Halving
    them keeps each piece compact, and its sibling stays among its nearest lists.
    """
    lists = lists.copy()
    order = np.argsort(lists, kind="stable")
    bounds = np.searchsorted(lists[order], np.arange(lists.max() + 2))
    stack = [order[bounds[li]:bounds[li + 1]] for li in np.flatnonzero(np.diff(bounds) > cap)]
    next_id = int(lists.max()) + 1
    while stack:
        rows = stack.pop()
        x = part[rows].astype(np.float64)
        x -= x.mean(axis=0)
        axis = np.linalg.eigh(x.T @ x)[1][:, -1]
        proj = x @ axis
        half = np.lexsort((rows, proj))[len(rows) // 2:]  # ties by row: the same split on every run
        upper = rows[half]
        lists[upper] = next_id
        next_id += 1
        stack += [r for r in (np.setdiff1d(rows, upper, assume_unique=True), upper) if len(r) > cap]
    return lists


class WorkDir:
    """A directory holding a long step's intermediate arrays, each written once and marked done, so that a killed
    run resumes at the first unfinished part. Arrays are ``.npy`` files, opened memory-mapped."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def done(self, name: str) -> bool:
        return (self.path / f"{name}.done").exists()

    def mark(self, name: str) -> None:
        (self.path / f"{name}.done").write_text("ok\n")

    def file(self, name: str) -> Path:
        return self.path / f"{name}.npy"

    def array(self, name: str, shape: tuple[int, ...], dtype: type, fill: float | None = None) -> np.ndarray:
        """A writable memory-mapped array: the existing one if its shape and dtype match, else a new one."""
        from numpy.lib.format import open_memmap

        path = self.file(name)
        if path.exists():
            try:
                arr = open_memmap(path, mode="r+")
                if arr.shape == tuple(shape) and arr.dtype == np.dtype(dtype):
                    return arr
            except ValueError:
                pass
        arr = open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
        if fill is not None:
            arr[:] = fill
        return arr

    def load(self, name: str) -> np.ndarray:
        return np.load(self.file(name), mmap_mode="r")

    def save(self, name: str, arr: np.ndarray) -> None:
        from datafilter.common.files import atomic_path

        with atomic_path(self.file(name)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)

    def remove(self, *names: str) -> None:
        for name in names:
            self.file(name).unlink(missing_ok=True)


def work_array(state: WorkDir | None, name: str, shape: tuple[int, ...], dtype: type,
               fill: float | None = None) -> np.ndarray:
    """An array in memory, or in ``state`` on disk."""
    if state is not None:
        return state.array(name, shape, dtype, fill)
    return np.full(shape, fill, dtype) if fill is not None else np.empty(shape, dtype)


def write_in_order(src: Rows, order: np.ndarray, state: WorkDir, name: str, chunk: int = 65536,
                   bucket_bytes: int = 1 << 28) -> np.ndarray:
    """``src``'s rows as float16 in ``order`` (row ``j`` of the result is ``src`` row ``order[j]``), written to
    ``state`` and returned memory-mapped.

    An external bucket sort, so memory stays a chunk and a bucket: one sequential pass over ``src`` appends each
    row to the bucket of its destination range, then each bucket is placed into its contiguous range of the
    result. Buckets placed are recorded, so a killed run resumes with the next bucket."""
    from datafilter.common.files import read_json, write_json

    if state.done(name):
        return state.load(name)
    m, dim = len(order), src.dim
    check_disk(state.path, m * dim * 2 * 1.05, f"the list-ordered copy of {m:,} rows of width {dim}")
    per_bucket = max(1, bucket_bytes // (dim * 2))
    nb = -(-m // per_bucket)
    pos = np.empty(m, np.int64)
    pos[order] = np.arange(m)  # destination of each source row
    bucket_of = pos // per_bucket
    by_bucket = np.argsort(bucket_of, kind="stable")  # each bucket's source rows, in source order
    bb = np.searchsorted(bucket_of[by_bucket], np.arange(nb + 1))
    bdir = state.path / f"{name}.buckets"
    progress = state.path / f"{name}.progress.json"
    placed = read_json(progress)["placed"] if progress.exists() and bdir.is_dir() else -1
    if placed < 0:  # (re)do the scatter pass
        shutil.rmtree(bdir, ignore_errors=True)
        bdir.mkdir(parents=True)
        files = [open(bdir / f"{b}.bin", "wb") for b in range(nb)]
        try:
            for s in tqdm(range(0, m, chunk), desc="order rows", unit="chunk", disable=m <= 8 * chunk):
                block = src.get(slice(s, s + chunk), np.float16)
                b = bucket_of[s:s + len(block)]
                srt = np.argsort(b, kind="stable")
                edges = np.searchsorted(b[srt], np.arange(nb + 1))
                for j in np.flatnonzero(np.diff(edges)):
                    files[j].write(block[srt[edges[j]:edges[j + 1]]].tobytes())
        finally:
            for f in files:
                f.close()
        placed = 0
        write_json(progress, {"placed": 0, "buckets": nb})
    out = state.array(f"{name}.partial", (m, dim), np.float16)
    for b in tqdm(range(placed, nb), desc="place rows", unit="bucket", disable=nb < 8):
        data = np.fromfile(bdir / f"{b}.bin", np.float16).reshape(-1, dim)
        lo = b * per_bucket
        buf = np.empty_like(data)
        buf[pos[by_bucket[bb[b]:bb[b + 1]]] - lo] = data
        out[lo:lo + len(buf)] = buf
        out.flush()
        write_json(progress, {"placed": b + 1, "buckets": nb})
        (bdir / f"{b}.bin").unlink()
    del out
    os.replace(state.file(f"{name}.partial"), state.file(name))
    shutil.rmtree(bdir, ignore_errors=True)
    progress.unlink(missing_ok=True)
    state.mark(name)
    return state.load(name)


def clustered_knn(src: Rows, part: np.ndarray, sq: np.ndarray, k: int, *, nlist: int, nprobe: int, seed: int,
                  niter: int = 10, balance: float = 2.0, state: WorkDir | None = None, copy: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Approximate kNN by clusters with exact distances, computed with matrix products.

    k-means on ``part`` (a cheap projection of the rows, e.g. PCA) puts every row in one of about ``nlist`` lists
    (``kmeans_lists``: in two levels above ``FLAT_LISTS`` lists).
    Lists of more than ``balance`` times the mean size are bisected (``split_lists``; 0 keeps k-means' lists):
    halving bounds the time a dense region takes, and in a region without inner structure it costs some recall,
    since a row's neighbours may fall in a half that is not probed. The members of a list are compared, in the full
    space of ``src``, with the members of the ``nprobe`` lists whose centres are nearest to their own (their own
    list first). Only the partition is approximate: every distance is exact (``sq``: the rows' squared norms). One
    BLAS product per list replaces per-query index scans; lists run on a thread per free core with single-threaded
    BLAS (many small multi-threaded products are slow on a busy machine). Ties are broken by row, whatever the
    storage, so the graph is the same in memory and on disk.

    ``state``: keep the lists, the graph and its progress there, so a killed build resumes with the lists not yet
    done. ``copy``: also write the rows into ``state`` in list order first, so each list's candidates are a few
    contiguous ranges of one file (rows scattered over memory-mapped shards larger than memory would otherwise
    be read a page at a time, again for every list that probes them).
    Returns ``(ids, squared L2 distances)``; -1 / inf where a row has fewer than k candidates.
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    faiss = faiss_threads()
    m = len(src)
    nlist = max(1, min(nlist, m // 8 or 1))
    if state is not None and state.done("lists"):
        lists = np.asarray(state.load("lists"))
    else:
        lists = kmeans_lists(part, nlist, niter=niter, seed=seed)
        if balance > 0:
            lists = split_lists(part, lists, max(8, int(balance * m / nlist)))
        _, lists = np.unique(lists, return_inverse=True)  # number the non-empty lists 0..nlist-1
        if state is not None:
            state.save("lists", lists)
            state.mark("lists")
    nlist = int(lists.max()) + 1
    order = np.argsort(lists, kind="stable")
    bounds = np.searchsorted(lists[order], np.arange(nlist + 1))
    sizes = np.diff(bounds)
    sums = np.zeros((nlist, part.shape[1]), np.float64)
    for s in range(0, m, 65536):  # each list's mean, split lists included, a chunk of rows at a time
        np.add.at(sums, lists[s:s + 65536], np.asarray(part[s:s + 65536], np.float64))  # in row order: exact sums
    centres = (sums / sizes[:, None]).astype(np.float32)
    index = faiss.IndexFlatL2(part.shape[1])
    index.add(centres)
    _, near = index.search(centres, min(nprobe + 1, nlist))
    ids = work_array(state, "ids", (m, k), np.int64, -1)
    dist = work_array(state, "dist", (m, k), np.float32, np.inf)
    ordered = write_in_order(src, order, state, "ordered") if copy and state is not None else None
    done = (np.asarray(state.load("lists_done")).copy() if state is not None and state.file("lists_done").exists()
            else np.zeros(nlist, bool))

    def one_list(li: int) -> None:
        lo, hi = bounds[li], bounds[li + 1]
        probe = [li] + [int(j) for j in near[li] if j != li and j >= 0][:max(0, nprobe - 1)]
        rows = np.concatenate([order[bounds[j]:bounds[j + 1]] for j in probe])  # rows; own list first
        kk = min(k, len(rows) - 1)
        if kk <= 0:
            return
        nm = hi - lo
        if ordered is not None:  # the probed lists are contiguous ranges of the ordered copy
            xc = np.concatenate([ordered[bounds[j]:bounds[j + 1]] for j in probe]).astype(np.float32)
        else:
            xc = src.get(rows)
        # |a|^2 is the same for every candidate of row a: rank by |b|^2 - 2 a.b and add it to the k kept
        d = xc[:nm] @ xc.T
        d *= -2.0
        d += sq[rows][None, :]
        d[np.arange(nm), np.arange(nm)] = np.inf  # own list comes first: the diagonal is self
        sel = np.argpartition(d, kk - 1, axis=1)[:, :kk]
        sd = np.take_along_axis(d, sel, 1) + sq[rows[:nm], None]
        sid = rows[sel]
        srt = np.lexsort((sid, sd), axis=1)  # the k kept, by distance, ties by row
        own = rows[:nm]
        ids[own, :kk] = np.take_along_axis(sid, srt, 1)
        dist[own, :kk] = np.maximum(np.take_along_axis(sd, srt, 1), 0)

    if done.any():
        log.info("kNN graph in %s: resuming, %d of %d lists already done", state.path, int(done.sum()), nlist)
    # biggest lists first, so no long list is left for the end while the other threads idle
    work = [int(li) for li in np.argsort(-sizes, kind="stable") if not done[li]]
    # checkpoints: about 64 batches of equal cost (a list costs its size times its candidates')
    cost = np.array([sizes[li] * sizes[near[li][:nprobe]].sum() for li in work], np.float64)
    cut = np.searchsorted(np.cumsum(cost), np.linspace(0, cost.sum(), 65)[1:-1]) if len(work) else []
    with threadpool_limits(1), ThreadPoolExecutor(free_cores()) as pool, \
            tqdm(total=nlist, initial=nlist - len(work), desc="kNN", unit="list", disable=nlist < 256) as bar:
        for batch in np.split(np.array(work, np.int64), np.unique(cut)) if work else []:
            for _ in pool.map(one_list, batch.tolist()):
                bar.update()
            if state is not None:
                done[batch] = True
                ids.flush()
                dist.flush()
                state.save("lists_done", done)
    if state is not None:
        state.mark("graph")
    return ids, dist


class PCA:
    """Principal components of a sample (numpy: a covariance product and ``eigh``), applied chunk by chunk."""

    def __init__(self, sample: np.ndarray, dim: int):
        from threadpoolctl import threadpool_limits

        x = np.asarray(sample, np.float32)
        mean = x.mean(axis=0, dtype=np.float64)
        xc = x - mean.astype(np.float32)
        with threadpool_limits(1):  # a [d, d] eigh is quick on one core and slow on contended ones
            cov = (xc.T @ xc).astype(np.float64) / max(1, len(x) - 1)
            vals, vecs = np.linalg.eigh(cov)
        self.mean = mean
        self.components = np.ascontiguousarray(vecs[:, ::-1][:, :dim], np.float32)  # largest variance first
        self.mean = self.mean.astype(np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) @ self.components


# Rows per kNN list from about a million rows on (see knn_lists).
KNN_LIST_ROWS = 256


def knn_lists(m: int, nlist: int = 0) -> int:
    """Lists of a kNN graph over ``m`` rows: ``nlist``, or by default faiss's usual 4 sqrt(m), and from about a
    million rows on (where that reaches lists of 256 rows) one list per 256 rows. With 4 sqrt(m) the rows each
    row is compared with grow as sqrt(m), so the graph's time as m^1.5; finer lists keep the work per row fixed.
    On the scale benchmark's data finer lists raised recall rather than lowering it (at 1M rows, 4,000 lists
    against 2,000: recall@10 0.80 against 0.69)."""
    return nlist or max(1, int(4 * np.sqrt(m)), m // KNN_LIST_ROWS)


def knn_graph(x: np.ndarray | Rows, k: int, *, method: str = "auto", exact_max: int = 20000, pca_dim: int = 64,
              nlist: int = 0, nprobe: int = 6, balance: float = 2.0, seed: int = 0, chunk: int = 16384,
              workdir: str | os.PathLike | None = None, copy: bool = False
              ) -> tuple[np.ndarray, np.ndarray, str]:
    """The k nearest neighbours of every row of ``x`` (an array, or ``Rows`` over several arrays), itself excluded.

    Returns ``(ids [m, k] int64, squared L2 distances [m, k] float32, method used)``. Neighbour ids are row
    positions in ``x``: queries and index share one order, so row ``i``'s neighbours always belong to row ``i``.
    Distances are always exact.

    ``flat``: exhaustive search (``m <= exact_max`` under ``auto``). ``ivf``: ``clustered_knn`` with lists made by
    k-means on a ``pca_dim``-dimensional PCA projection (0: on the full vectors), ``nlist`` lists (0:
    ``knn_lists``) and ``nprobe`` lists searched per row; lists over ``balance`` times the mean size are halved
    (0: never).

    ``workdir`` (ivf): keep the projection, the lists and the graph there as memory-mapped files, so memory stays
    bounded and a killed build resumes where it stopped; ``copy`` also writes the rows there in list order
    (``clustered_knn``). A finished graph found there is returned as is.
    """
    faiss = faiss_threads()
    src = x if isinstance(x, Rows) else Rows([np.asarray(x)])
    m, d = len(src), src.dim
    k = min(k, m - 1)
    if k <= 0:
        return np.empty((m, 0), np.int64), np.empty((m, 0), np.float32), "none"
    if method == "auto":
        method = "flat" if m <= exact_max else "ivf"
    if method == "flat":
        full = src.get(slice(None))
        index = faiss.IndexFlatL2(d)  # ranks by L2 itself: equal to inner product only for equal norms
        index.add(full)
        ids = np.empty((m, k), np.int64)
        dist = np.empty((m, k), np.float32)
        for s in range(0, m, chunk):
            dq, iq = index.search(full[s:s + chunk], k + 1)
            iq, dq = _drop_self(iq, dq, np.arange(s, s + len(iq)), k)
            ids[s:s + len(iq)] = iq
            dist[s:s + len(iq)] = np.where(iq < 0, np.inf, np.maximum(dq, 0))
        return ids, dist, method
    if method != "ivf":
        raise ValueError(f"unknown kNN method {method!r} (auto, flat, ivf)")
    state = WorkDir(workdir) if workdir is not None else None
    if state is not None and state.done("graph"):
        return state.load("ids"), state.load("dist"), method
    width = pca_dim if 0 < pca_dim < d else d
    part = work_array(state, "part", (m, width), np.float32)
    sq = work_array(state, "sq", (m,), np.float32)
    if state is None or not state.done("part"):
        pca = PCA(src.get(sample_rows(np.arange(m), min(m, 20_000), seed)), pca_dim) if width < d else None
        for s in tqdm(range(0, m, chunk), desc="project", unit="chunk", disable=m <= 4 * chunk):
            block = src.get(slice(s, s + chunk))
            sq[s:s + len(block)] = np.einsum("ij,ij->i", block, block)
            part[s:s + len(block)] = pca.apply(block) if pca is not None else block
        if state is not None:
            part.flush()
            sq.flush()
            state.mark("part")
    ids, dist = clustered_knn(src, part, sq, k, nlist=knn_lists(m, nlist), nprobe=nprobe,
                              balance=balance, seed=seed, state=state, copy=copy)
    if state is not None:  # the graph is all a later run needs; the rest is large
        del part
        state.remove("part", "sq", "ordered", "lists", "lists_done")
    return ids, dist, method
