"""Ingest from local folders, tables and existing tar shards: every source kind and every kind of bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datafilter.pool import ImageConfig, Pool, make_uid
from datafilter.pool.ingest import IngestConfig, IngestError, ingest


def image_bytes(w: int = 64, h: int = 48, seed: int = 0, fmt: str = "JPEG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def config(kind: str, **kw) -> IngestConfig:
    return IngestConfig(kind=kind, workers=1, image=ImageConfig(max_side=32, resample="area"), **kw)


def shard_stats(pool_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(pool_dir.glob("*_stats.json")) if ".source" not in p.name]


def check_reconciles(pool_dir: Path, expected_input: int) -> dict:
    stats = shard_stats(pool_dir)
    for st in stats:
        assert st["input"] == st["written"] + sum(st["skipped"].values()), st
    summary = Pool(pool_dir).summary()
    assert summary["input"] == expected_input == summary["samples"] + summary["skipped_total"]
    assert len(set(Pool(pool_dir).column("uid"))) == summary["samples"]
    return summary


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Good pairs in three caption styles plus one of each bad input a scraped folder has."""
    root = tmp_path / "src"
    outside = tmp_path / "outside"
    write(outside / "secret.jpg", image_bytes(seed=9))
    write(outside / "d" / "x.jpg", image_bytes(seed=10))
    good = image_bytes(100, 60, seed=1)
    write(root / "a.jpg", good)
    write(root / "a.txt", "  a red bus \n")
    write(root / "copy.jpg", good)  # same bytes and caption under another name: a distinct sample
    write(root / "copy.txt", "a red bus")
    write(root / "sub" / "b.png", image_bytes(40, 80, seed=2, fmt="PNG"))
    write(root / "sub" / "b.caption", "a tall thing")
    write(root / "sub" / "deep" / "c.webp", image_bytes(20, 20, seed=3, fmt="WEBP"))
    write(root / "sub" / "deep" / "c.json", json.dumps({"caption": "a small square", "license": "cc0"}))
    write(root / "zero.jpg", b"")
    write(root / "zero.txt", "empty file")
    write(root / "garbage.jpg", b"this is not an image" * 10)
    write(root / "garbage.txt", "garbage")
    write(root / "trunc.jpg", image_bytes(64, 64, seed=4)[:600])
    write(root / "trunc.txt", "truncated")
    bomb = io.BytesIO()
    Image.new("1", (9500, 9500)).save(bomb, "PNG")  # 90M pixels in a few kB: over Pillow's bomb threshold
    write(root / "bomb.png", bomb.getvalue())
    write(root / "bomb.txt", "a bomb")
    write(root / "nocap.jpg", image_bytes(seed=5))
    write(root / "blank.jpg", image_bytes(seed=6))
    write(root / "blank.txt", " \n\t ")
    write(root / "latin.jpg", image_bytes(seed=7))
    write(root / "latin.txt", "caf\xe9 cr\xe8me".encode("latin-1"))
    write(root / "dup.jpg", image_bytes(seed=8))
    write(root / "dup.png", image_bytes(seed=8, fmt="PNG"))
    write(root / "dup.txt", "two files one caption")
    os.symlink(outside / "secret.jpg", root / "leak.jpg")
    write(root / "leak.txt", "a leaked file")
    os.symlink(outside / "d", root / "linkdir")
    os.symlink("a.jpg", root / "alias.jpg")  # inside the folder (relative, so it moves with it): kept
    write(root / "alias.txt", "an alias")
    write(root / "orphan.txt", "a caption without an image is not a sample")
    return root


def test_folder_ingest_keeps_good_pairs_and_counts_each_bad_input(messy_folder: Path, tmp_path: Path):
    out = ingest(messy_folder, tmp_path / "pool", config("folder", shard_size=5))
    summary = check_reconciles(out, expected_input=16)
    assert summary["skipped"] == {
        "duplicate_name": 1, "empty_caption": 1, "empty_image": 1, "image_too_large": 1, "missing_caption": 1,
        "non_utf8_caption": 1, "symlink_outside_source": 2, "truncated_image": 1, "undecodable_image": 1,
    }
    rows = {r["source_path"]: r for r in Pool(out).metadata().to_pylist()}
    assert sorted(rows) == ["a.jpg", "alias.jpg", "copy.jpg", "dup.jpg", "sub/b.png", "sub/deep/c.webp"]
    assert rows["a.jpg"]["text"] == "a red bus" and rows["sub/deep/c.webp"]["text"] == "a small square"
    assert (rows["a.jpg"]["original_width"], rows["a.jpg"]["width"], rows["a.jpg"]["height"]) == (100, 32, 19)
    assert (rows["sub/b.png"]["width"], rows["sub/b.png"]["height"]) == (16, 32)
    assert (rows["sub/deep/c.webp"]["width"], rows["sub/deep/c.webp"]["height"]) == (20, 20)  # never upscaled
    # identical bytes and caption under two names stay two samples with two uids
    assert rows["a.jpg"]["uid"] != rows["copy.jpg"]["uid"] != rows["alias.jpg"]["uid"]
    sha = hashlib.sha256((messy_folder / "a.jpg").read_bytes()).digest()
    assert rows["a.jpg"]["uid"] == make_uid("folder", "a.jpg", "a red bus", sha)
    # every stored image is re-encoded the same way
    for s in Pool(out).iter_samples():
        assert s.ext == "jpg" and Image.open(io.BytesIO(s.image)).format == "JPEG"
    assert not list(out.rglob("secret*")) and not list(out.rglob("x.jpg"))


def test_uids_do_not_depend_on_machine_location_workers_or_shard_size(messy_folder: Path, tmp_path: Path):
    a = ingest(messy_folder, tmp_path / "a", config("folder", shard_size=3))
    moved = tmp_path / "elsewhere" / "copy_of_src"
    shutil.copytree(messy_folder, moved, symlinks=True)
    b = ingest(moved, tmp_path / "b", IngestConfig(kind="folder", shard_size=100, workers=2,
                                                    image=ImageConfig(max_side=32, resample="area")))
    ua, ub = Pool(a).column("uid"), Pool(b).column("uid")
    assert len(ua) == 6 and sorted(ua) == sorted(ub)
    assert list(ua) == list(ub)  # same pool order too: items are sorted by relative path


def test_rerun_with_other_options_is_refused_and_same_options_is_a_no_op(messy_folder: Path, tmp_path: Path):
    out = ingest(messy_folder, tmp_path / "pool", config("folder", shard_size=5))
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("0*")}
    ingest(messy_folder, out, config("folder", shard_size=5))
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.glob("0*")}
    with pytest.raises(IngestError, match="shard_size 5 -> 7"):
        ingest(messy_folder, out, config("folder", shard_size=7))
    with pytest.raises(IngestError, match="max_side"):
        ingest(messy_folder, out, IngestConfig(kind="folder", shard_size=5, image=ImageConfig(max_side=64)))
    write(messy_folder / "new.jpg", image_bytes(seed=11))
    with pytest.raises(IngestError, match="contents changed"):
        ingest(messy_folder, out, config("folder", shard_size=5))


# --- tables ---------------------------------------------------------------------------------------------------------
def _write_table(table: pa.Table, path: Path, fmt: str) -> None:
    if fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    elif fmt == "parquet":
        pq.write_table(table, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_table_source(tmp_path: Path, fmt: str):
    imgs = tmp_path / "data" / "imgs"
    write(imgs / "0.jpg", image_bytes(seed=0))
    write(imgs / "1.png", image_bytes(50, 70, seed=1, fmt="PNG"))
    write(tmp_path / "abs.jpg", image_bytes(seed=2))
    table = pa.table({
        "file": ["imgs/0.jpg", "imgs/1.png", str(tmp_path / "abs.jpg"), "imgs/missing.jpg", "", "imgs/0.jpg",
                 "imgs/1.png"],
        "alt": ["zero", "one", "absolute", "gone", "no path", "zero", None],
        "license": ["a", "b", "c", "d", "e", "f", "g"],
    })
    path = tmp_path / "data" / f"pairs.{fmt}"
    _write_table(table, path, fmt)
    out = ingest(path, tmp_path / "pool", config("table", image_col="file", caption_col="alt", shard_size=4))
    summary = check_reconciles(out, expected_input=7)
    assert summary["skipped"] == {"duplicate_row": 1, "missing_caption": 1, "missing_image": 1,
                                  "missing_image_path": 1}
    meta = Pool(out).metadata(["source_path", "text", "license", "width"]).to_pylist()
    assert [(m["text"], m["license"]) for m in meta] == [("zero", "a"), ("one", "b"), ("absolute", "c")]
    assert meta[1]["width"] == 23  # 50x70 -> longer side 32


def test_table_with_a_missing_column_fails_at_once_naming_file_and_columns(tmp_path: Path):
    path = tmp_path / "t.csv"
    path.write_text("path,text\na.jpg,hello\n")
    with pytest.raises(IngestError) as exc:
        ingest(path, tmp_path / "pool", config("table"))
    msg = str(exc.value)
    assert str(path) in msg and "'image'" in msg and "--image-col" in msg and "path, text" in msg
    assert not (tmp_path / "pool").exists()


def test_unreadable_table_fails_naming_the_file(tmp_path: Path):
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(IngestError, match=r"t\.parquet: unreadable as parquet"):
        ingest(path, tmp_path / "pool", config("table"))
    with pytest.raises(IngestError, match="--format"):
        ingest(tmp_path / "t.xlsx", tmp_path / "pool", config("table"))


# --- existing shards ------------------------------------------------------------------------------------------------
def _add(tf: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.linkname = link
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_img2dataset_folder(root: Path) -> dict:
    """Three shards as img2dataset leaves them (written with webdataset and tarfile), with known defects."""
    import webdataset as wds

    root.mkdir(parents=True)
    good = {k: image_bytes(40, 30, seed=i) for i, k in enumerate(["000000000", "000000001", "000000003"])}
    rows = []
    with wds.TarWriter(str(root / "00000.tar")) as tw:
        for key, data in good.items():
            url = f"http://example.com/{key}.jpg"
            meta = {"url": url, "caption": f"photo {key}", "key": key, "status": "success", "error_message": None}
            if key == "000000003":
                meta["uid"] = "0123456789abcdef0123456789abcdef"  # DataComp ships uids: kept as they are
            tw.write({"__key__": key, "jpg": data, "txt": f"photo {key}", "json": json.dumps(meta).encode()})
            rows.append(meta)
        tw.write({"__key__": "000000004", "jpg": b"\xff\xd8 garbage", "txt": "broken",
                  "json": json.dumps({"url": "http://example.com/4"}).encode()})
        rows.append({"url": "http://example.com/4", "caption": "broken", "key": "000000004", "status": "success",
                     "error_message": None})
    rows.insert(2, {"url": "http://example.com/2", "caption": "x", "key": "000000002", "status": "failed_to_download",
                    "error_message": "HTTP Error 404: Not Found"})
    rows.append({"url": "http://example.com/5", "caption": "y", "key": "000000005", "status": "failed_to_download",
                 "error_message": "<urlopen error timed out>"})
    rows = [{k: r.get(k) for k in ("url", "caption", "key", "status", "error_message")} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), root / "00000.parquet")
    (root / "00000_stats.json").write_text(json.dumps({"count": 6, "successes": 4}))
    with tarfile.open(root / "00001.tar", "w") as tf:
        _add(tf, "../evil.jpg", image_bytes(seed=20))
        _add(tf, "../evil.txt", b"escape")
        _add(tf, "/abs.jpg", image_bytes(seed=21))
        _add(tf, "/abs.txt", b"absolute")
        _add(tf, "100000000.jpg", image_bytes(seed=22))
        _add(tf, "100000000.txt", b"fine")
        _add(tf, "100000001.jpg", b"", tarfile.SYMTYPE, "/etc/passwd")
        _add(tf, "100000001.txt", b"link")
        _add(tf, "100000002.jpg", image_bytes(seed=23))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        _add(tf, "200000000.jpg", image_bytes(seed=30))
        _add(tf, "200000000.txt", b"complete")
        _add(tf, "200000001.jpg", image_bytes(200, 200, seed=31))
        _add(tf, "200000001.txt", b"cut off")
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        cut = tf.getmember("200000001.jpg").offset_data + 100
    (root / "00002.tar").write_bytes(buf.getvalue()[:cut])  # ends inside the second image
    with tarfile.open(root / "00003.tar", "w") as tf:
        _add(tf, "300000000.png", image_bytes(seed=40, fmt="PNG"))
        _add(tf, "300000000.txt", b"all good")
    return good


def test_index_copy_keeps_source_untouched_and_counts_failures(tmp_path: Path):
    src = tmp_path / "src"
    good = make_img2dataset_folder(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = ingest(src, tmp_path / "pool", config("shards"))
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    summary = check_reconciles(out, expected_input=6 + 5 + 2 + 1)
    assert summary["skipped"] == {
        "unsafe_member_name": 2, "undecodable_image": 1, "download_http_404": 1, "download_timeout": 1,
        "unsupported_member_type": 1, "missing_caption": 1, "truncated_tar": 1,
    }
    assert not (tmp_path / "evil.jpg").exists() and not list(tmp_path.rglob("evil*"))
    samples = list(Pool(out).iter_samples())
    assert [s.key for s in samples] == ["000000000", "000000001", "000000003", "100000000", "200000000",
                                        "300000000"]
    assert [s.image for s in samples[:3]] == list(good.values())  # original bytes, not re-encoded
    rows = Pool(out).metadata().to_pylist()
    assert rows[2]["uid"] == "0123456789abcdef0123456789abcdef"
    assert rows[0]["uid"] == make_uid("url", "http://example.com/000000000.jpg", "photo 000000000",
                                      hashlib.sha256(good["000000000"]).hexdigest())
    assert rows[0]["url"] == "http://example.com/000000000.jpg" and "status" not in rows[0]
    # a shard with nothing to drop is copied byte for byte
    assert (out / "00003.tar").read_bytes() == before["00003.tar"]


def test_index_in_place_keeps_producer_files_and_rewrites_only_shards_with_drops(tmp_path: Path):
    src = tmp_path / "src"
    good = make_img2dataset_folder(src)
    untouched = (src / "00003.tar").stat().st_mtime_ns
    producer_parquet = (src / "00000.parquet").read_bytes()
    assert ingest(src, None, config("shards")) == src
    assert (src / "00000.source.parquet").read_bytes() == producer_parquet
    assert json.loads((src / "00000.source_stats.json").read_text()) == {"count": 6, "successes": 4}
    assert (src / "00003.tar").stat().st_mtime_ns == untouched
    assert not list(src.glob("*.source.tar"))  # originals kept during rewrites are gone once complete
    check_reconciles(src, expected_input=14)
    pool = Pool(src)
    assert [s.image for s in pool.iter_samples(pool.shards[:1])] == list(good.values())
    with tarfile.open(src / "00001.tar") as tf:  # the rewritten tar holds only safe, valid samples
        assert tf.getnames() == ["100000000.jpg", "100000000.txt", "100000000.json"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    ingest(src, None, config("shards"))  # rerun: complete, nothing touched
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in src.iterdir()}


def test_csv_caption_that_is_not_utf8_skips_one_row_not_the_table(tmp_path: Path):
    write(tmp_path / "a.jpg", image_bytes(seed=0))
    write(tmp_path / "b.jpg", image_bytes(seed=1))
    write(tmp_path / "t.csv", b"image,caption\na.jpg,caf\xe9\nb.jpg,fine\n")
    out = ingest(tmp_path / "t.csv", tmp_path / "pool", config("table"))
    summary = check_reconciles(out, expected_input=2)
    assert summary["skipped"] == {"non_utf8_caption": 1} and list(Pool(out).column("text")) == ["fine"]


def test_files_over_the_size_limit_are_skipped_unread(tmp_path: Path):
    write(tmp_path / "src" / "big.png", image_bytes(200, 200, seed=0, fmt="PNG"))
    write(tmp_path / "src" / "big.txt", "large")
    write(tmp_path / "src" / "small.jpg", image_bytes(8, 8, seed=1))
    write(tmp_path / "src" / "small.txt", "small")
    out = ingest(tmp_path / "src", tmp_path / "pool", config("folder", max_file_bytes=20_000))
    assert check_reconciles(out, expected_input=2)["skipped"] == {"file_too_large": 1}


def test_in_place_rewrite_killed_after_replacing_the_tar_resumes_from_the_kept_original(tmp_path: Path):
    clean = tmp_path / "clean"
    make_img2dataset_folder(clean)
    ingest(clean, None, config("shards"))
    src = tmp_path / "src"
    make_img2dataset_folder(src)
    # the state a kill leaves between "new tar in place" and "stats written": the original waits as .source.tar
    os.link(src / "00001.tar", src / "00001.source.tar")
    with tarfile.open(tmp_path / "new.tar", "w") as tf:
        _add(tf, "100000000.jpg", image_bytes(seed=22))
        _add(tf, "100000000.txt", b"fine")
    os.replace(tmp_path / "new.tar", src / "00001.tar")  # a new file, as the atomic writer makes it
    ingest(src, None, config("shards"))
    stats = json.loads((src / "00001_stats.json").read_text())
    assert (stats["input"], stats["written"]) == (5, 1)  # counted from the original, not the half-done rewrite
    assert not (src / "00001.source.tar").exists()
    check_reconciles(src, expected_input=14)
    # uids hash the tar's own name, not that of the original kept aside: the same as an uninterrupted index
    assert list(Pool(src).column("uid")) == list(Pool(clean).column("uid"))


def test_a_producer_uid_repeated_across_shards_is_reported(tmp_path: Path, caplog):
    import webdataset as wds

    src = tmp_path / "src"
    src.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(src / f"{shard:05d}.tar")) as tw:
            tw.write({"__key__": f"{shard}0000", "jpg": image_bytes(seed=shard), "txt": "same uid",
                      "json": json.dumps({"uid": "ab" * 16}).encode()})
    with caplog.at_level("WARNING"):
        out = ingest(src, tmp_path / "pool", config("shards"))
    assert Pool(out).num_samples == 2 and "1 sample(s) repeat the uid" in caplog.text


def test_csv_paths_that_look_like_numbers_stay_paths(tmp_path: Path):
    write(tmp_path / "0001", image_bytes(seed=1))  # a file name without an extension, all digits
    write(tmp_path / "pairs.csv", "image,caption\n0001,a small photo\n")
    out = ingest(tmp_path / "pairs.csv", tmp_path / "pool", config("table"))
    assert list(Pool(out).column("text")) == ["a small photo"]
