"""The embed stage: row alignment, bad images, resume after a kill, workers and ranks, mismatched models, references."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shape_image, write_toy_pool
from datafilter.cli import main as cli_main
from datafilter.common.launch import LaunchEnv
from datafilter.embed.decode import ImageDecoder
from datafilter.embed.pipeline import EmbedConfig, default_space, embed_pool, score_column
from datafilter.embed.reference import embed_reference_sets
from datafilter.pool.tario import TarError, tar_members, tar_samples
from datafilter.embed.store import EmbeddingError, EmbeddingStore
from datafilter.models import CheckpointError, ModelSpec, create_model, load_model, save_checkpoint
from datafilter.pool import Pool, hex_to_uids
from datafilter.pool.images import to_rgb

torch.set_num_threads(1)

NANO = "datafilter-nano-vit"
CFG = EmbedConfig(batch_size=8, workers=0, threads=1, progress=False)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nano():
    return load_model(ModelSpec(NANO), seed=0)


def _space_files(store: EmbeddingStore) -> dict[str, bytes]:
    """Every file of a space except ``space.json`` (which records the pool path), by name."""
    return {p.name: p.read_bytes() for p in sorted(store.dir.iterdir()) if p.is_file() and p.name != "space.json"}


def _rewrite_tar(tar: Path, edit) -> None:
    """Rewrite a shard's tar, passing each (name, bytes) through ``edit`` (None drops the member)."""
    with tarfile.open(tar) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    tar.write_bytes(buf.getvalue())


def test_decoder_matches_the_models_transform(nano):
    decoder = ImageDecoder(nano.preprocess, nano.image_size)
    assert decoder.uint8  # open_clip's eval transform splits into PIL steps + ToTensor/Normalize
    normalise = decoder.normaliser(torch.device("cpu"))
    rng = np.random.default_rng(0)
    sized = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    other = Image.fromarray(rng.integers(0, 256, (40, 57, 4), dtype=np.uint8), "RGBA")  # resized, alpha flattened
    for img in (sized, other):
        buf = io.BytesIO()
        img.save(buf, "PNG")
        fast = normalise(decoder.stack([decoder(buf.getvalue())]))[0]
        direct = nano.preprocess(to_rgb(img))
        assert torch.equal(fast, direct)


def test_rows_aligned_with_metadata(tmp_path, nano):
    pool = Pool(write_toy_pool(tmp_path / "pool", n=40, shard_size=16))
    result = embed_pool(pool, nano, cfg=CFG)
    assert result.written == ("00000000", "00000001", "00000002") and result.samples == 40
    store = EmbeddingStore(pool, result.space)
    image, text, scores = store.all_image(), store.all_text(), store.all_scores()
    assert image.dtype == np.float16 and image.shape == (40, nano.embed_dim)
    assert scores.column("uid").to_pylist() == pool.metadata(["uid"]).column("uid").to_pylist()
    assert scores.column("valid").to_pylist() == [True] * 40
    assert store.info.score_column == "clip_score"
    np.testing.assert_allclose(np.linalg.norm(image.astype(np.float32), axis=1), 1, atol=2e-3)
    # Each row holds the embedding of that row's own sample, computed directly with the model.
    samples = list(pool.iter_samples())
    rows = pool.rows_of(hex_to_uids([s.uid for s in samples]))
    assert (rows >= 0).all()
    direct_img = nano.encode_images(torch.stack([nano.preprocess(Image.open(io.BytesIO(s.image)).convert("RGB"))
                                                 for s in samples])).numpy()
    direct_txt = nano.encode_texts([s.text for s in samples]).numpy()
    np.testing.assert_allclose(image[rows].astype(np.float32), direct_img, atol=2e-3)
    np.testing.assert_allclose(text[rows].astype(np.float32), direct_txt, atol=2e-3)
    score = scores.column("clip_score").to_numpy()
    np.testing.assert_allclose(score[rows], (direct_img * direct_txt).sum(1), atol=2e-3)
    # Captions differ between rows, so a shift by one row would be caught.
    assert not np.allclose(text[0].astype(np.float32), text[1].astype(np.float32), atol=1e-2)


def test_corrupt_image_is_marked_and_counted_never_zero(tmp_path, nano):
    pool_dir = write_toy_pool(tmp_path / "pool", n=16, shard_size=16)
    bad_key = "000000000005"
    _rewrite_tar(pool_dir / "00000000.tar",
                 lambda name, data: b"\x89PNG not really" if name == f"{bad_key}.png" else data)
    pool = Pool(pool_dir)
    result = embed_pool(pool, nano, cfg=CFG)
    assert result.invalid == {"undecodable_image": 1}
    store = EmbeddingStore(pool, result.space)
    row = pool.metadata(["key"]).column("key").to_pylist().index(bad_key)
    valid = store.all_scores().column("valid").to_numpy(zero_copy_only=False)
    assert not valid[row] and valid.sum() == 15
    assert np.isnan(store.all_image()[row]).all() and np.isnan(store.all_text()[row]).all()
    assert np.isnan(store.all_scores().column("clip_score").to_numpy()[row])
    assert np.isfinite(store.all_image()[valid]).all()
    shard = pool.shards[0]
    assert store.shard_stats(shard) == {"rows": 16, "valid": 15, "invalid": {"undecodable_image": 1}}


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import datafilter.embed.store as store
from datafilter.embed.pipeline import EmbedConfig, embed_pool
from datafilter.models import ModelSpec, load_model

calls = [0]
real = store.pq.write_table

def write_then_die(*args, **kwargs):
    # The third shard's vectors are on disk, its completion marker is not: the worst moment to be killed.
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

store.pq.write_table = write_then_die
embed_pool({pool!r}, load_model(ModelSpec({model!r}), seed=0), cfg=EmbedConfig(batch_size=8, workers=0, threads=1,
           progress=False))
"""


def test_resume_after_sigkill_gives_the_same_files(tmp_path, nano):
    pool_dir = write_toy_pool(tmp_path / "pool", n=80, shard_size=16)
    pool = Pool(pool_dir)
    store = EmbeddingStore(pool, default_space(NANO, nano.checkpoint_id))
    embed_pool(pool, nano, cfg=CFG)
    uninterrupted = _space_files(store)
    shutil.rmtree(store.dir)

    script = KILL_SCRIPT.format(tests=str(ROOT / "tests"), pool=str(pool_dir), model=NANO)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [s.name for s in pool.shards if store.done(s)] == ["00000000", "00000001"]
    assert store.paths(pool.shards[2])[0].exists()  # half-written shard: vectors without a marker
    finished = {p: p.stat().st_mtime_ns for s in pool.shards[:2] for p in store.paths(s)}

    result = embed_pool(pool, nano, cfg=CFG)
    assert result.already_done == 2 and result.written == ("00000002", "00000003", "00000004")
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished shards were not redone
    assert _space_files(store) == uninterrupted  # byte-identical, and no temporary files left behind


def test_worker_count_does_not_change_the_files(tmp_path, nano):
    pool = Pool(write_toy_pool(tmp_path / "pool", n=72, shard_size=16))
    files = {}
    for workers in (0, 1, 2):
        space = f"w{workers}"
        result = embed_pool(pool, nano, space=space, cfg=EmbedConfig(batch_size=8, workers=workers, threads=1,
                                                                     progress=False))
        assert len(result.written) == 5
        files[workers] = _space_files(EmbeddingStore(pool, space))
    assert files[0] == files[1] == files[2]


def test_ranks_split_shards_disjointly_and_cover_all(tmp_path, nano, monkeypatch):
    pool = Pool(write_toy_pool(tmp_path / "pool", n=80, shard_size=16))
    embed_pool(pool, nano, space="single", cfg=CFG)
    done = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        result = embed_pool(pool, nano, space="ranks", cfg=CFG)
        assert result.rank_shards == len(result.written)
        done.append(set(result.written))
    assert done[0] and done[1] and not done[0] & done[1]
    assert done[0] | done[1] == {s.name for s in pool.shards}
    assert _space_files(EmbeddingStore(pool, "ranks")) == _space_files(EmbeddingStore(pool, "single"))
    # A rerun of a rank finds its shards finished and does nothing.
    assert embed_pool(pool, nano, space="ranks", cfg=CFG, env=LaunchEnv(0, 2)).written == ()


def test_other_models_space_is_refused_and_kept(tmp_path, nano):
    pool = Pool(write_toy_pool(tmp_path / "pool", n=16, shard_size=16))
    embed_pool(pool, nano, space="shared", cfg=CFG)
    before = _space_files(EmbeddingStore(pool, "shared"))
    other = load_model(ModelSpec("datafilter-micro-vit"), seed=0)
    with pytest.raises(EmbeddingError, match=r"space\.json was written by model datafilter-nano-vit"):
        embed_pool(pool, other, space="shared", cfg=CFG)
    reseeded = load_model(ModelSpec(NANO), seed=1)  # same architecture, other weights
    with pytest.raises(EmbeddingError, match="refusing to mix"):
        embed_pool(pool, reseeded, space="shared", cfg=CFG)
    assert _space_files(EmbeddingStore(pool, "shared")) == before


def test_cli_with_checkpoint_and_a_mismatched_checkpoint(tmp_path, caplog):
    pool_dir = write_toy_pool(tmp_path / "pool", n=16, shard_size=16)
    model, *_ = create_model(NANO, seed=3)
    ckpt = save_checkpoint(model, NANO, tmp_path / "nano.pt")
    assert cli_main(["embed", str(pool_dir), "--model", NANO, "--checkpoint", str(ckpt), "--workers", "0",
                     "--threads", "1", "--no-progress"]) == 0
    spaces = [p.name for p in (pool_dir / "embeddings").iterdir()]
    assert len(spaces) == 1 and spaces[0].startswith(f"{NANO}__")
    info = EmbeddingStore(Pool(pool_dir), spaces[0]).info
    assert info.model == NANO and len(info.checkpoint) == 64  # the checkpoint file's sha256

    with pytest.raises(CheckpointError, match=rf"{ckpt}.*'{NANO}' model, not 'datafilter-micro-vit'"):
        load_model(ModelSpec("datafilter-micro-vit", checkpoint=str(ckpt)))
    caplog.clear()
    assert cli_main(["embed", str(pool_dir), "--model", "datafilter-micro-vit", "--checkpoint", str(ckpt),
                     "--workers", "0", "--no-progress"]) == 2
    assert str(ckpt) in caplog.text
    assert [p.name for p in (pool_dir / "embeddings").iterdir()] == spaces  # nothing new written


def test_tar_disagreeing_with_parquet_names_the_file_and_keeps_the_rest(tmp_path, nano):
    pool_dir = write_toy_pool(tmp_path / "pool", n=48, shard_size=16)
    _rewrite_tar(pool_dir / "00000001.tar", lambda name, data: None if name.startswith("000000010003.") else data)
    pool = Pool(pool_dir)
    with pytest.raises(EmbeddingError, match=r"00000001\.tar: 15 samples in the tar but 16 rows"):
        embed_pool(pool, nano, space="s", cfg=CFG)
    store = EmbeddingStore(pool, "s")
    assert [s.name for s in pool.shards if store.done(s)] == ["00000000", "00000002"]


def test_missing_tar_is_a_clear_error(tmp_path, caplog):
    pool_dir = write_toy_pool(tmp_path / "pool", n=32, shard_size=16)
    (pool_dir / "00000001.tar").unlink()
    assert cli_main(["embed", str(pool_dir), "--model", NANO, "--no-progress"]) == 2
    assert "00000001.tar" in caplog.text


def _write_reference(folder: Path, per_shard: list[list[tuple[bytes, int]]]) -> None:
    folder.mkdir(parents=True)
    (folder / "nshards.txt").write_text(f"{len(per_shard)}\n")
    for i, samples in enumerate(per_shard):
        with tarfile.open(folder / f"{i}.tar", "w") as tf:
            for j, (image, label) in enumerate(samples):
                for ext, data in (("png", image), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"s{i}_{j:03d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


def test_reference_sets_embedded_into_the_pools_space(tmp_path, nano):
    pool = Pool(write_toy_pool(tmp_path / "pool", n=16, shard_size=16))
    suite = tmp_path / "suite"
    images = [shape_image(c, s, seed=100 + k) for k, (c, s) in enumerate(
        [("red", "circle"), ("blue", "bar"), ("green", "square"), ("yellow", "circle"), ("red", "bar")])]
    _write_reference(suite / "ref" / "train", [[(images[0], 3), (b"broken", 1), (images[1], 0)],
                                               [(images[2], 2), (images[3], 1)], [(images[4], 4)]])
    suite.joinpath("suite.json").write_text(json.dumps({"reference_sets": {"shapes_train": "ref/train"}}))
    out = embed_reference_sets(pool, nano, suite, cfg=CFG)
    store = EmbeddingStore(pool, default_space(NANO, nano.checkpoint_id))
    assert out == {"shapes_train": store.reference_paths("shapes_train")[0]}
    emb, labels = store.reference("shapes_train")
    assert emb.dtype == np.float16 and labels.dtype == np.int64
    assert labels.tolist() == [3, 0, 2, 1, 4]  # shard order, then row order; the broken image left out
    direct = nano.encode_images(torch.stack([nano.preprocess(Image.open(io.BytesIO(b)).convert("RGB"))
                                             for b in images])).numpy()
    np.testing.assert_allclose(emb.astype(np.float32), direct, atol=2e-3)
    stats = json.loads(store.reference_paths("shapes_train")[2].read_text())
    assert stats["images"] == 5 and stats["invalid"] == {"undecodable_image": 1}
    mtime = out["shapes_train"].stat().st_mtime_ns
    embed_reference_sets(pool, nano, suite, cfg=CFG)  # already there: not redone
    assert out["shapes_train"].stat().st_mtime_ns == mtime
    # Other images under the same name (a rebuilt suite) are embedded again, not silently reused.
    other = tmp_path / "suite2"
    _write_reference(other / "ref" / "train", [[(images[4], 4), (images[0], 3)]])
    other.joinpath("suite.json").write_text(json.dumps({"reference_sets": {"shapes_train": "ref/train"}}))
    embed_reference_sets(pool, nano, other, cfg=CFG)
    assert store.reference("shapes_train")[1].tolist() == [4, 3]


def test_score_column_and_space_names():
    assert score_column("ViT-B-32", "pretrained:openai") == "clip_b32_similarity_score"
    assert score_column("ViT-L-14", "pretrained:openai") == "clip_l14_similarity_score"
    assert score_column("ViT-B-32", "pretrained:laion2b_s34b_b79k") == "clip_score"
    assert score_column(NANO, "ab" * 32) == "clip_score"
    assert default_space("ViT-B-32", "pretrained:openai") == "ViT-B-32__openai"
    assert default_space(NANO, "0123456789abcdef" * 4) == f"{NANO}__0123456789ab"
    assert default_space(NANO, "random:0") == f"{NANO}__random0"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_reads_what_tarfile_reads(tmp_path, fmt):
    path = tmp_path / "x.tar"
    long_dir = "d" * 120  # beyond the 100-character name field: a prefix, a GNU long name or a pax path
    members = [(f"{long_dir}/k{i}.{ext}", f"{ext}{i}".encode() * (i * 70 + 1)) for i in range(4) for ext in ("png", "txt")]
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert list(tar_members(path)) == members
    assert [k for k, _ in tar_samples(path)] == ["k0", "k1", "k2", "k3"]


def test_tar_reader_rejects_damage_naming_the_file(tmp_path):
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("a.txt")
        info.size = 2000
        tf.addfile(info, io.BytesIO(b"x" * 2000))
    raw = path.read_bytes()
    path.write_bytes(raw[:1200])
    with pytest.raises(TarError, match=r"x\.tar: truncated tar"):
        list(tar_members(path))
    path.write_bytes(raw[:10] + b"Z" + raw[11:])
    with pytest.raises(TarError, match=r"x\.tar: corrupt tar header \(bad checksum"):
        list(tar_members(path))


def test_embedding_file_from_another_model_is_refused(tmp_path, nano):
    pool = Pool(write_toy_pool(tmp_path / "pool", n=32, shard_size=16))
    result = embed_pool(pool, nano, cfg=CFG)
    store = EmbeddingStore(pool, result.space)
    path = store.paths(pool.shards[1])[0]
    np.save(path, np.zeros((16, 128), np.float16))  # e.g. copied over from a 128-wide model's space
    with pytest.raises(EmbeddingError, match=rf"{path.name}: float16 vectors of width 128, but space .* width 64"):
        store.all_image()
    assert store.all_text().shape == (32, 64)  # the other files still read
