"""URL tables: img2dataset downloads from a local HTTP server that misbehaves in the usual ways."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datafilter.pool import ImageConfig, Pool, make_uid
from datafilter.pool.ingest import IngestConfig, ingest


def jpeg(w: int, h: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


IMAGES = {f"/img/{i}.jpg": jpeg(80 + 20 * i, 60, i) for i in range(3)}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the name http.server calls
        if self.path in IMAGES:
            body = IMAGES[self.path]
        elif self.path == "/slow.jpg":
            time.sleep(4)
            body = IMAGES["/img/0.jpg"]
        elif self.path == "/garbage.jpg":
            body = b"\x89PNG\r\n\x1a\n but then nonsense" * 20
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.handle_error = lambda request, address: None  # the client hanging up on /slow.jpg is expected
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_table_is_downloaded_by_img2dataset_and_failures_are_counted(server: str, tmp_path: Path):
    urls = [f"{server}/img/0.jpg", f"{server}/missing.jpg", f"{server}/img/1.jpg", f"{server}/slow.jpg",
            f"{server}/garbage.jpg", f"{server}/img/2.jpg", f"{server}/img/0.jpg", None]
    captions = ["zero", "gone", "one", "slow", "garbage", "two", "zero", "no url"]
    table = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"link": urls, "alt": captions, "license": [f"l{i}" for i in range(8)]}), table)
    cfg = IngestConfig(kind="urls", url_col="link", caption_col="alt", shard_size=5, workers=1, threads=8,
                       timeout=1.0, image=ImageConfig(max_side=64))
    out = ingest(table, tmp_path / "pool", cfg)
    summary = Pool(out).summary()
    assert summary["input"] == 8 and summary["samples"] == 3
    assert summary["skipped"] == {"download_http_404": 1, "download_timeout": 1, "undecodable_image": 1,
                                  "duplicate_row": 1, "missing_url": 1}
    # img2dataset writes samples in the order downloads finish; the pool keeps its tar order
    rows = sorted(Pool(out).metadata().to_pylist(), key=lambda r: r["source_row"])
    assert [r["text"] for r in rows] == ["zero", "one", "two"]
    assert [r["license"] for r in rows] == ["l0", "l2", "l5"] and [r["source_row"] for r in rows] == [0, 2, 5]
    assert rows[1]["uid"] == make_uid("url", urls[2], "one", hashlib.sha256(IMAGES["/img/1.jpg"]).hexdigest())
    assert (rows[2]["original_width"], rows[2]["width"]) == (120, 64)  # resized to the maximum side, ratio kept
    assert not (out / "_ingest" / "download").exists()  # staging is removed once every shard is indexed
