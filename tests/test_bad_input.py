"""Odd input a new user brings (photos from a phone, old Windows file names, hand-made tars and tables, a diverged
checkpoint): each case ingests, decodes or fails as documented, and every finished ingest reconciles.

Kept elsewhere, so not repeated here: plugin errors name the plugin (``test_filters.py``), checkpoints are read
weights-only (``test_scorer.py``), a killed ingest resumes without redoing finished shards and gives the bytes of an
uninterrupted one (``test_ingest_resume.py``), a killed in-place index resumes with the same uids
(``test_ingest_sources.py``), and the bench config checks (``test_bench_config.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datafilter.cli import main
from datafilter.pool import ImageConfig, Pool, make_uid
from datafilter.pool.images import to_rgb
from datafilter.pool.ingest import IngestConfig, ingest

from test_ingest_sources import _add, check_reconciles, config, image_bytes, make_img2dataset_folder, write

LATIN1 = b"caf\xe9"  # "café" in Latin-1: not valid UTF-8


def png_config(kind: str) -> IngestConfig:
    """Lossless storage, so that tests can read exact pixel values back."""
    return IngestConfig(kind=kind, workers=1, image=ImageConfig(max_side=32, encode_format="png"))


def _bytes_path(folder: Path, name: bytes) -> str:
    return os.fsdecode(os.path.join(os.fsencode(folder), name))


# --- names that are not UTF-8 ---------------------------------------------------------------------------------------
def test_a_folder_file_name_that_is_not_utf8_is_kept_under_its_escaped_name(tmp_path: Path):
    src = tmp_path / "src"
    write(src / "good.jpg", image_bytes(seed=1))
    write(src / "good.txt", "a good photo")
    image = image_bytes(seed=2)
    Path(_bytes_path(src, LATIN1 + b".jpg")).write_bytes(image)
    Path(_bytes_path(src, LATIN1 + b".txt")).write_text("a cafe")
    out = ingest(src, tmp_path / "pool", config("folder"))
    check_reconciles(out, expected_input=2)
    rows = {r["source_path"]: r for r in Pool(out).metadata().to_pylist()}
    assert sorted(rows) == ["caf\\xe9.jpg", "good.jpg"]
    # the uid hashes the name's own bytes, so it is stable and distinct from the escaped spelling
    assert rows["caf\\xe9.jpg"]["uid"] == make_uid("folder", os.fsdecode(LATIN1 + b".jpg"), "a cafe",
                                                   hashlib.sha256(image).digest())
    assert rows["caf\\xe9.jpg"]["uid"] != make_uid("folder", "caf\\xe9.jpg", "a cafe", hashlib.sha256(image).digest())
    assert len(list(Pool(out).iter_samples())) == 2


def test_a_table_path_that_is_not_utf8_finds_its_file(tmp_path: Path):
    Path(_bytes_path(tmp_path, LATIN1 + b".jpg")).write_bytes(image_bytes(seed=1))
    write(tmp_path / "b.jpg", image_bytes(seed=2))
    write(tmp_path / "t.csv", b"image,caption\n" + LATIN1 + b".jpg,a cafe\nb.jpg,fine\n")
    out = ingest(tmp_path / "t.csv", tmp_path / "pool", config("table"))
    check_reconciles(out, expected_input=2)
    assert list(Pool(out).column("source_path")) == ["caf\\xe9.jpg", "b.jpg"]


def test_a_tar_member_name_that_is_not_utf8_is_kept_under_its_escaped_key(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in ((b"ok.jpg", image_bytes(seed=1)), (b"ok.txt", b"fine"),
                           (LATIN1 + b".jpg", image_bytes(seed=2)), (LATIN1 + b".txt", b"a cafe")):
            _add(tf, os.fsdecode(name), data)
    out = ingest(src, tmp_path / "pool", config("shards"))
    check_reconciles(out, expected_input=2)
    assert [s.key for s in Pool(out).iter_samples()] == ["ok", "caf\\xe9"]  # tar and parquet agree


# --- uids -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,expected", [
    # the same image and caption up to trailing white space: one sample, one uid
    ('a.jpg,a cat\na.jpg,"a cat "\nb.jpg,a dog\n', ["a cat", "a dog"]),
    # a uid column that repeats a uid
    ("a.jpg,a cat,{u}\nb.jpg,a dog,{u}\nc.jpg,a cow,{v}\n", ["a cat", "a cow"]),
])
def test_a_repeated_uid_within_a_shard_is_skipped_and_rows_of_finds_each_row(tmp_path: Path, rows, expected):
    for i, name in enumerate("abc"):
        write(tmp_path / f"{name}.jpg", image_bytes(seed=i))
    header = "image,caption,uid\n" if "{u}" in rows else "image,caption\n"
    write(tmp_path / "t.csv", header + rows.format(u="ab" * 16, v="cd" * 16))
    out = ingest(tmp_path / "t.csv", tmp_path / "pool", config("table"))
    summary = check_reconciles(out, expected_input=3)
    assert summary["skipped"] == {"duplicate_uid": 1}
    pool = Pool(out)
    assert list(pool.column("text")) == expected
    assert pool.rows_of(pool.uids).tolist() == [0, 1]


# --- images -----------------------------------------------------------------------------------------------------------
def _grey16() -> bytes:
    arr = np.full((16, 16), 64000, np.uint16)  # 64000 / 65535 of white: 249 in 8 bits
    arr[:, :8] = 16384  # a quarter: 64
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped_to_white():
    img = Image.open(io.BytesIO(_grey16()))
    assert img.mode == "I;16"
    arr = np.asarray(to_rgb(img))
    assert arr.shape == (16, 16, 3) and arr[0, 0].tolist() == [64] * 3 and arr[0, 15].tolist() == [249] * 3
    floats = Image.fromarray(np.full((4, 4), 0.5, np.float32), "F")
    assert np.asarray(to_rgb(floats))[0, 0].tolist() == [128] * 3


def test_16_bit_greyscale_decodes_the_same_for_ingest_training_and_embedding(tmp_path: Path):
    from datafilter.embed.decode import ImageDecoder
    from datafilter.models import create_model
    from datafilter.train.data import decode_image

    data = _grey16()
    write(tmp_path / "src" / "g.png", data)
    write(tmp_path / "src" / "g.txt", "grey")
    out = ingest(tmp_path / "src", tmp_path / "pool", png_config("folder"))
    stored = np.asarray(Image.open(io.BytesIO(next(Pool(out).iter_samples()).image)))
    assert stored[0, 0].tolist() == [64] * 3 and stored[0, 15].tolist() == [249] * 3
    train = decode_image(data, 16)
    assert train[0, 0].tolist() == [64] * 3 and train[0, 15].tolist() == [249] * 3
    _, _, eval_tf, _ = create_model("datafilter-nano-vit")
    embed = ImageDecoder(eval_tf, 32)(data)
    assert embed[0, 0].tolist() == [64] * 3 and embed[0, 31].tolist() == [249] * 3


def _phone_photo() -> bytes:
    """A 40x20 JPEG (left half white) whose EXIF says: turn 90 degrees clockwise to view (a portrait photo)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["folder", "table"])
def test_exif_orientation_is_applied_for_folders_and_tables(tmp_path: Path, kind: str):
    write(tmp_path / "src" / "p.jpg", _phone_photo())
    write(tmp_path / "src" / "p.txt", "a portrait photo")
    write(tmp_path / "src" / "t.csv", "image,caption\np.jpg,a portrait photo\n")
    source = tmp_path / "src" / "t.csv" if kind == "table" else tmp_path / "src"
    out = ingest(source, tmp_path / "pool", png_config(kind))
    (row,) = Pool(out).metadata().to_pylist()
    assert (row["original_width"], row["original_height"], row["width"], row["height"]) == (20, 40, 16, 32)
    stored = np.asarray(Image.open(io.BytesIO(next(Pool(out).iter_samples()).image)).convert("L"))
    assert stored[2, 8] > 200 and stored[-3, 8] < 50  # the white half is now on top


def test_shards_keep_their_images_as_their_producer_stored_them(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    photo = _phone_photo()
    with tarfile.open(src / "00000.tar", "w") as tf:
        _add(tf, "0.jpg", photo)
        _add(tf, "0.txt", b"as downloaded")
    out = ingest(src, tmp_path / "pool", config("shards"))
    assert next(Pool(out).iter_samples()).image == photo  # DataComp's shards are not re-oriented either


# --- captions and skip lists ------------------------------------------------------------------------------------------
def test_a_byte_order_mark_is_not_part_of_the_caption(tmp_path: Path):
    write(tmp_path / "src" / "a.jpg", image_bytes(seed=1))
    write(tmp_path / "src" / "a.txt", "\ufeffa red bus\n".encode("utf-8"))
    write(tmp_path / "src" / "b.jpg", image_bytes(seed=2))
    write(tmp_path / "src" / "b.json", json.dumps({"caption": "\ufeff a blue bus"}))
    out = ingest(tmp_path / "src", tmp_path / "pool", config("folder"))
    assert list(Pool(out).column("text")) == ["a red bus", "a blue bus"]


def test_an_indexed_shard_keeps_its_bytes_and_every_stage_reads_the_clean_caption(tmp_path: Path):
    from datafilter.embed.shards import pool_shard_rows

    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tf:
        _add(tf, "0.jpg", image_bytes(seed=1))
        _add(tf, "0.txt", "\ufeffa red bus \n".encode("utf-8"))
    before = (src / "00000.tar").read_bytes()
    out = ingest(src, tmp_path / "pool", config("shards"))
    assert (out / "00000.tar").read_bytes() == before
    pool = Pool(out)
    assert list(pool.column("text")) == ["a red bus"]  # what filters and training read
    assert [text for _, _, text in pool_shard_rows(pool.shards[0])] == ["a red bus"]  # and what is embedded


def test_each_skipped_input_is_listed_beside_its_shard_and_shown_by_pool_info(tmp_path: Path, capsys):
    src = tmp_path / "src"
    write(src / "a.jpg", b"not an image")
    write(src / "a.txt", "garbage")
    write(src / "b.jpg", image_bytes(seed=1))
    write(src / "b.txt", "fine")
    write(src / "c.jpg", image_bytes(seed=2))  # no caption
    write(src / "d.jpg", image_bytes(seed=3))
    write(src / "d.txt", "fine too")
    out = ingest(src, tmp_path / "pool", config("folder", shard_size=2))
    check_reconciles(out, expected_input=4)
    listed = [json.loads(line) for line in (out / "00000000_skipped.jsonl").read_text().splitlines()]
    assert listed == [{"index": 0, "input": "a.jpg", "reason": "undecodable_image", "detail": ""}]
    (second,) = [json.loads(line) for line in (out / "00000001_skipped.jsonl").read_text().splitlines()]
    assert (second["index"], second["input"], second["reason"]) == (0, "c.jpg", "missing_caption")
    assert main(["pool", "info", str(out), "--skipped"]) == 0
    text = capsys.readouterr().out
    assert "undecodable_image" in text and "a.jpg" in text and "c.jpg" in text and "2 skipped input(s)" in text
    assert main(["pool", "info", str(out), "--skipped", "--reason", "missing_caption", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["input"] for e in report["skipped"]] == ["c.jpg"] and report["unlisted"] == 0


def test_shard_skip_lists_name_tar_keys_and_failed_downloads(tmp_path: Path):
    src = tmp_path / "src"
    make_img2dataset_folder(src)
    out = ingest(src, tmp_path / "pool", config("shards"))
    listed, unlisted = Pool(out).skipped()
    assert unlisted == 0 and len(listed) == Pool(out).summary()["skipped_total"]
    by_input = {e["input"]: e for e in listed}
    assert by_input["000000004"]["reason"] == "undecodable_image"
    assert by_input["http://example.com/2"]["reason"] == "download_http_404"
    assert by_input["http://example.com/2"]["detail"] == "HTTP Error 404: Not Found"


# --- checkpoints ------------------------------------------------------------------------------------------------------
def test_a_checkpoint_full_of_nan_is_refused(tmp_path: Path, nano_builds, caplog):
    import torch

    from datafilter.models import CheckpointError, ModelSpec, create_model, load_model, save_checkpoint

    model, *_ = create_model("datafilter-nano-vit")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    path = save_checkpoint(model, "datafilter-nano-vit", tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"nan.pt: \d+ of \d+ weight tensors hold NaN"):
        load_model(ModelSpec("datafilter-nano-vit", checkpoint=str(path)))
    assert main(["evaluate", "--model", "datafilter-nano-vit", "--checkpoint", str(path),
                 "--suite", str(nano_builds["suite"]), "--out", str(tmp_path / "eval.json")]) == 2
    assert "hold NaN" in caplog.text and not (tmp_path / "eval.json").exists()


def test_loading_a_checkpoint_does_not_warn_about_random_weights(tmp_path: Path, caplog):
    from datafilter.models import ModelSpec, create_model, load_model, save_checkpoint

    model, *_ = create_model("datafilter-nano-vit")
    path = save_checkpoint(model, "datafilter-nano-vit", tmp_path / "ok.pt")
    with caplog.at_level(logging.INFO):
        load_model(ModelSpec("datafilter-nano-vit", checkpoint=str(path)))
    assert "initialized randomly" not in caplog.text and "random weights" not in caplog.text
    with caplog.at_level(logging.INFO):
        load_model(ModelSpec("datafilter-nano-vit"))  # really random: said once, by us
    assert caplog.text.count("random weights") == 1


# --- configs are data, never code -------------------------------------------------------------------------------------
def test_yaml_tags_that_run_code_are_refused(tmp_path: Path):
    from datafilter.bench.config import BenchConfigError, load_bench_config
    from datafilter.micro.recipe import RecipeError, load_recipe

    marker = tmp_path / "ran"
    evil = f"name: !!python/object/apply:os.system ['touch {marker}']\n"
    (tmp_path / "evil.yaml").write_text(evil)
    with pytest.raises(BenchConfigError, match="not valid YAML"):
        load_bench_config(tmp_path / "evil.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "evil.yaml")
    assert main(["filter", "none", str(tmp_path), "--config", str(tmp_path / "evil.yaml"),
                 "--out", str(tmp_path / "x.npy")]) == 2
    assert not marker.exists()
