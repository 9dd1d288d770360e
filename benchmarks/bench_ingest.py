"""Ingest throughput: ``datafilter pool ingest`` on a local folder vs img2dataset doing the same job on the same files.

Both resize to the same maximum side (ratio kept, never upscaled), encode JPEG at the same quality, hash the input with
sha256, write WebDataset shards of the same size, and use the same number of worker processes. img2dataset reads the
files through file:// URLs (its urllib fetcher accepts them), or through a local HTTP server with ``--http``.
Rounds alternate which tool goes first; the script prints samples/s per round and the median ratio (ours / theirs).

    python benchmarks/bench_ingest.py                 # 3,000 JPEGs, 3 rounds
    python benchmarks/bench_ingest.py --n 500 --rounds 1
"""

from __future__ import annotations

import argparse
import http.server
import io
import os
import shutil
import statistics
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, n: int, min_px: int, max_px: int, seed: int = 0) -> int:
    """Photo-like JPEGs (smooth colour fields, edges and grain) of varied sizes and ratios, with captions."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(n):
        w, h = (int(v) for v in rng.integers(min_px, max_px + 1, 2))
        base = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(base, dtype=np.int16)
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        arr[y0:y0 + h // 4, x0:x0 + w // 4] = rng.integers(0, 255, 3)
        arr += rng.integers(-8, 9, arr.shape, dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        (folder / f"{i:06d}.txt").write_text(f"a synthetic photo number {i}")
        total += len(buf.getvalue())
    return total


def run_ours(folder: Path, out: Path, args: argparse.Namespace) -> int:
    from datafilter.pool import ImageConfig, Pool
    from datafilter.pool.ingest import IngestConfig, ingest

    cfg = IngestConfig(kind="folder", shard_size=args.shard_size, workers=args.workers,
                       image=ImageConfig(max_side=args.max_side, quality=args.quality, resample="area"))
    ingest(folder, out, cfg)
    return Pool(out).num_samples


def run_img2dataset(url_table: Path, out: Path, args: argparse.Namespace) -> int:
    import img2dataset
    import pyarrow.parquet as pq

    img2dataset.download(
        url_list=str(url_table), input_format="parquet", url_col="url", caption_col="caption",
        output_folder=str(out), output_format="webdataset", image_size=args.max_side,
        resize_mode="keep_ratio_largest", resize_only_if_bigger=True, encode_format="jpg",
        encode_quality=args.quality, processes_count=args.workers, thread_count=args.threads,
        number_sample_per_shard=args.shard_size, timeout=30, retries=0, extract_exif=False,
        compute_hash="sha256", enable_wandb=False,
    )
    n = 0
    for p in out.glob("*.parquet"):
        t = pq.read_table(p, columns=["status"]).column("status").to_pylist()
        n += sum(s == "success" for s in t)
    return n


def serve(folder: Path) -> tuple[str, http.server.ThreadingHTTPServer]:
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}", httpd


def main() -> None:
    from datafilter.common.launch import free_cores

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="number of JPEGs (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=free_cores(), help="processes for both tools (default: all cores)")
    ap.add_argument("--threads", type=int, default=16, help="img2dataset threads per process (default: %(default)s)")
    ap.add_argument("--shard-size", type=int, default=500, help="samples per shard for both (default: %(default)s)")
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--min-px", type=int, default=300)
    ap.add_argument("--max-px", type=int, default=1200)
    ap.add_argument("--http", action="store_true", help="serve files over HTTP on 127.0.0.1 instead of file://")
    ap.add_argument("--tmp", default=None, help="scratch folder (default: the system's temporary folder)")
    args = ap.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    import pyarrow as pa
    import pyarrow.parquet as pq

    scratch = Path(tempfile.mkdtemp(prefix="bench_ingest_", dir=args.tmp))
    httpd = None
    try:
        folder = scratch / "images"
        t0 = time.perf_counter()
        nbytes = make_images(folder, args.n, args.min_px, args.max_px)
        print(f"made {args.n} JPEGs ({nbytes / 1e6:.0f} MB, {args.min_px}-{args.max_px} px) "
              f"in {time.perf_counter() - t0:.0f} s; workers={args.workers}, shard size={args.shard_size}")
        names = sorted(p.name for p in folder.glob("*.jpg"))
        if args.http:
            base, httpd = serve(folder)
            urls = [f"{base}/{n}" for n in names]
        else:
            urls = [(folder / n).resolve().as_uri() for n in names]
        captions = [(folder / n).with_suffix(".txt").read_text() for n in names]
        url_table = scratch / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": captions}), url_table)

        ratios = []
        for r in range(args.rounds):
            order = ["ours", "img2dataset"] if r % 2 == 0 else ["img2dataset", "ours"]
            speed = {}
            for tool in order:
                out = scratch / f"out_{tool}_{r}"
                t0 = time.perf_counter()
                n = run_ours(folder, out, args) if tool == "ours" else run_img2dataset(url_table, out, args)
                dt = time.perf_counter() - t0
                if n != args.n:
                    raise SystemExit(f"{tool} wrote {n} of {args.n} samples: not the same job")
                speed[tool] = n / dt
                shutil.rmtree(out)
            ratios.append(speed["ours"] / speed["img2dataset"])
            print(f"round {r + 1}: ours {speed['ours']:7.1f} samples/s   img2dataset {speed['img2dataset']:7.1f} "
                  f"samples/s   ratio {ratios[-1]:.2f}")
        print(f"median ratio (ours / img2dataset) over {args.rounds} rounds: {statistics.median(ratios):.2f}")
    finally:
        if httpd is not None:
            httpd.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
