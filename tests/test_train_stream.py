"""The streamed data path: resampled shards read in order, the subset applied by uid, exact resume, bad shards."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_toy_pool
from datafilter.common.files import sha256_file
from datafilter.pool import Pool
from datafilter.train import read_metrics, scale_config, train
from datafilter.train.stream import StreamBatches, prepare_source
from datafilter.train.transforms import JitterAugment
from test_train import assert_same_weights, kill_during_step

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAFILTER_CACHE", str(tmp_path / "cache"))


def _tokens(captions: list[str]) -> torch.Tensor:
    return torch.tensor([[len(c)] for c in captions])


def _batches(pool_dir: Path, tmp: Path, *, subset: Path | None = None, steps: int = 12, batch: int = 16,
             start: int = 0, states=None, seed: int = 0, streams: int = 1, buffer: int = 40,
             initial: int = 10) -> StreamBatches:
    pool = Pool(pool_dir)
    source = prepare_source(pool, subset, sha256_file(subset) if subset else None, tmp / "stream")
    augment = JitterAugment(32, (0.5,) * 3, (0.25,) * 3, pad=2, colour=0.1)
    return StreamBatches(source, augment=augment, tokenizer=_tokens, seed=seed, origin=0, rank=0, world_size=1,
                         streams=streams, start=start, steps=steps, batch_size_at=lambda s: batch, buffer=buffer,
                         initial=initial, states=states)


def test_exact_batches_a_reproducible_order_and_shards_read_in_order(tmp_path):
    pool = write_toy_pool(tmp_path / "pool", n=60, shard_size=10)
    batches = list(_batches(pool, tmp_path, steps=12, batch=16))
    assert [b.step for b in batches] == list(range(12))
    assert all(len(b.rows) == 16 and b.images.shape == (16, 3, 32, 32) for b in batches)  # samples seen: exact
    again = list(_batches(pool, tmp_path, steps=12, batch=16))
    assert all(np.array_equal(a.rows, b.rows) and torch.equal(a.images, b.images) for a, b in zip(batches, again))
    other = list(_batches(pool, tmp_path, steps=12, batch=16, seed=1))
    assert not all(np.array_equal(a.rows, b.rows) for a, b in zip(batches, other))
    # every sample of the pool is reachable, and shards are resampled (more draws than shards)
    seen = np.concatenate([b.rows for b in batches])
    assert len(np.unique(seen)) > 40 and batches[-1].state["draws"] > 6


def test_the_subset_applies_by_uid_with_repeats_and_missing_uids_counted(tmp_path):
    pool_dir = write_toy_pool(tmp_path / "pool", n=40, shard_size=10)
    pool = Pool(pool_dir)
    unknown = pool.uids[:3].copy()
    unknown["f1"] += np.uint64(1)
    # row 5 listed three times, rows 17 and 33 (other shards) once each, and three uids the pool lacks
    subset = np.sort(np.concatenate([pool.uids[[5, 5, 5, 17, 33]], unknown]))
    np.save(tmp_path / "subset.npy", subset)
    ds = _batches(pool_dir, tmp_path, subset=tmp_path / "subset.npy", steps=80, batch=20)
    assert ds.source.info == {"subset_entries": 8, "found": 5, "missing": 3}
    assert sorted(ds.source.candidates.tolist()) == [0, 1, 3]  # shard 2 holds none: never read
    rows = np.concatenate([b.rows for b in ds])
    assert set(rows.tolist()) == {5, 17, 33}
    counts = {r: int((rows == r).sum()) for r in (5, 17, 33)}
    assert counts[5] / counts[17] == pytest.approx(3, rel=0.2) and counts[5] / counts[33] == pytest.approx(3, rel=0.2)
    np.save(tmp_path / "none.npy", np.sort(unknown))
    with pytest.raises(ValueError, match="none of its 3 uids is in the shards"):
        _batches(pool_dir, tmp_path, subset=tmp_path / "none.npy")


def test_a_stream_resumes_exactly_where_its_saved_position_says(tmp_path):
    pool = write_toy_pool(tmp_path / "pool", n=60, shard_size=10)
    full = list(_batches(pool, tmp_path, steps=14, batch=16))
    k = 7  # the buffer is full of samples from several shards by now, and a shard is half read
    state = json.loads(json.dumps(full[k - 1].state))  # as a checkpoint stores it
    assert state["buffer"] and 0 < state["position"] < 10
    resumed = list(_batches(pool, tmp_path, steps=14, batch=16, start=k, states={0: state}))
    assert [b.step for b in resumed] == list(range(k, 14))
    for a, b in zip(full[k:], resumed):
        assert np.array_equal(a.rows, b.rows) and torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)


def test_loader_workers_carry_their_streams_across_a_resume(tmp_path):
    pool = write_toy_pool(tmp_path / "pool", n=60, shard_size=10)

    def run(**kw):
        loader = torch.utils.data.DataLoader(_batches(pool, tmp_path, steps=9, batch=8, streams=2, **kw),
                                             batch_size=None, num_workers=2, collate_fn=lambda x: x)
        return list(loader)

    full = run()
    assert [b.step for b in full] == list(range(9)) and [b.stream for b in full] == [0, 1] * 4 + [0]
    # resume at an odd step: the first worker now carries stream 1
    states = {b.stream: b.state for b in full[:5]}
    resumed = run(start=5, states=states)
    assert [b.step for b in resumed] == [5, 6, 7, 8] and [b.stream for b in resumed] == [1, 0, 1, 0]
    assert all(np.array_equal(a.rows, b.rows) and torch.equal(a.images, b.images) for a, b in zip(full[5:], resumed))


def test_open_files_stay_bounded_over_many_tiny_shards(tmp_path):
    pool = write_toy_pool(tmp_path / "pool", n=240, shard_size=2)  # 120 shards of 2 samples
    ds = _batches(pool, tmp_path, steps=60, batch=8, buffer=16, initial=4)
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = fds()
    peak = 0
    for b in ds:
        peak = max(peak, fds())
    assert b.state["draws"] > 120  # every shard drawn about once or more
    assert peak - before <= 3  # the current tar and the subset index, whatever the number of shards


def test_training_streamed_resumes_after_a_kill_with_the_same_weights(tmp_path, monkeypatch):
    pool = write_toy_pool(tmp_path / "pool", n=48, shard_size=8)
    np.save(tmp_path / "subset.npy", np.sort(Pool(pool).uids[np.r_[0:20, 3, 3]]))
    cfg = scale_config("nano", samples_seen=16 * 9, batch_size=16, checkpoint_every=3, data="stream", workers=2,
                       shuffle_buffer=32, shuffle_initial=8)
    subset = tmp_path / "subset.npy"
    full = train(pool, tmp_path / "full", cfg, subset=subset, threads=1)
    summary = json.loads((tmp_path / "full" / "train.json").read_text())
    assert summary["samples_seen"] == 144 and summary["data"] == {"subset_entries": 22, "found": 22, "missing": 0}
    assert summary["config"]["data"] == "stream" and summary["stream"]["shard_draws"] > 0
    kill_during_step(monkeypatch, 7, lambda: train(pool, tmp_path / "killed", cfg, subset=subset, threads=1))
    ckpts = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("stream-*")) == ["stream-00000006-r00000.json"]
    relaunch = shutil.copytree(tmp_path / "killed", tmp_path / "relaunch")
    resumed = train(pool, tmp_path / "killed", cfg, subset=subset, threads=1)
    assert_same_weights(full.checkpoint, resumed.checkpoint, cfg.model)

    # Another number of loader workers would change the streams: refused before training, unless asked for fresh ones.
    lines = len(read_metrics(relaunch))
    with pytest.raises(ValueError, match=r"1 rank\(s\) x 2 stream\(s\).*this launch has 1 x 1.*--fresh-stream"):
        train(pool, relaunch, replace(cfg, workers=0), subset=subset, threads=1)
    assert len(read_metrics(relaunch)) == lines
    done = train(pool, relaunch, replace(cfg, workers=0), subset=subset, threads=1, fresh_stream=True)
    assert done.samples_seen == 144 and done.steps == 9


def test_shards_truncated_mid_run_are_skipped_and_counted(tmp_path):
    pool = write_toy_pool(tmp_path / "pool", n=40, shard_size=10)
    for name, cut in (("00000001.tar", 20480 + 100), ("00000002.tar", 20480)):  # inside a member; at a boundary
        tar = pool / name
        tar.write_bytes(tar.read_bytes()[:cut])
    rows = np.concatenate([b.rows for b in _batches(pool, tmp_path, steps=40, batch=8)])
    assert np.isin(rows, np.r_[11:13, 21:23]).any()  # the cut shards give the samples before the cut ...
    assert not np.isin(rows, np.r_[16:20, 26:30]).any()  # ... and none after it
    cfg = scale_config("nano", samples_seen=16 * 8, batch_size=16, data="stream", shuffle_buffer=20,
                       shuffle_initial=5)
    result = train(pool, tmp_path / "run", cfg, threads=1)  # the run goes on
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert result.samples_seen == 128 and summary["stream"]["truncated_shard_reads"] >= 2
