"""Training: the schedule, resampling to a fixed budget, learning, resume after a kill, DDP equivalence."""

from __future__ import annotations

import json
import math
import socket
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_toy_pool
from datafilter.evaluate import evaluate_suite, load_suite
from datafilter.models import ModelSpec, load_model, read_checkpoint
from datafilter.pool import Pool
from datafilter.train import SCALES, TrainConfig, lr_at, read_metrics, scale_config, train
from datafilter.train.data import StepBatches, StreamedImages, decoded_pool, draw_rows, subset_rows
from datafilter.train.loop import RunMismatchError
from test_evaluate import write_toy_suite

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAFILTER_CACHE", str(tmp_path / "cache"))


def nano(**kw) -> TrainConfig:
    base = dict(samples_seen=64 * 12, batch_size=64, warmup=3, checkpoint_every=4, decode_workers=1)
    return scale_config("nano", **{**base, **kw})


# --- schedule and config ---------------------------------------------------------------------------------------------
def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_zero():
    lrs = [lr_at(s, 1.0, 4, 20) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)  # cosine starts at the peak
    assert lrs[12] == pytest.approx(0.5)  # half way through the 16 decay steps
    assert lrs[19] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lr_at(0, 3e-4, 0, 10) == pytest.approx(3e-4)
    with pytest.raises(ValueError):
        lr_at(20, 1.0, 4, 20)


def test_scale_table_has_datacomp_rows_and_overrides():
    assert (SCALES["small"].model, SCALES["small"].batch_size, SCALES["small"].lr) == ("ViT-B-32", 4096, 5e-4)
    assert SCALES["xlarge"].beta2 == 0.95 and SCALES["large"].model == "ViT-B-16"
    cfg = scale_config("micro", samples_seen=1000, lr=None)
    assert cfg.samples_seen == 1000 and cfg.lr == SCALES["micro"].lr
    assert cfg.steps == 4 and [cfg.batch_size_at(s) for s in range(4)] == [256, 256, 256, 232]
    with pytest.raises(ValueError, match="unknown scale"):
        scale_config("tiny")
    with pytest.raises(ValueError, match="no '\\{c\\}'"):
        TrainConfig(caption_templates=("a photo",))
    # execution knobs are not part of the recipe
    assert replace(cfg, workers=3, checkpoint_every=7).recipe() == cfg.recipe()


# --- resampling ------------------------------------------------------------------------------------------------------
def _batches(pool_dir: Path, cfg: TrainConfig, rows: np.ndarray, world_size: int = 1, rank: int = 0,
             streamed: bool = False) -> StepBatches:
    pool = Pool(pool_dir)
    from datafilter.models import create_model

    model, _, _, tok = create_model(cfg.model)
    if streamed:
        images, valid = StreamedImages(pool, 32), None
    else:
        images, valid = decoded_pool(pool, 32)
    return StepBatches(rows=rows, texts=pool.column("text"), images=images, valid=valid, tokenizer=tok,
                       seed=cfg.seed, batch_size_at=cfg.batch_size_at, steps=cfg.steps, rank=rank,
                       world_size=world_size, templates=cfg.caption_templates, jitter_pad=cfg.jitter_pad,
                       colour_jitter=cfg.colour_jitter, mean=model.visual.image_mean, std=model.visual.image_std)


def test_resampling_gives_exactly_samples_seen_and_respects_repeats(toy_pool):
    pool = Pool(toy_pool)
    # uid 5 three times, uid 7 once: 5 must be drawn about three times as often; nothing else ever.
    subset = np.sort(pool.uids[[5, 5, 5, 7]])
    rows = subset_rows(pool, subset)
    assert sorted(rows.tolist()) == [5, 5, 5, 7]
    cfg = nano(samples_seen=1000, batch_size=64)
    ds = _batches(toy_pool, cfg, rows)
    drawn = np.concatenate([ds[s].rows for s in range(len(ds))])
    assert len(drawn) == 1000 == cfg.samples_seen
    assert set(drawn.tolist()) == {5, 7}
    big = np.concatenate([draw_rows(rows, 0, s, 1000) for s in range(40)])
    assert (big == 5).mean() == pytest.approx(0.75, abs=0.01)
    # same step, same draws: the stream does not depend on the order of calls (resume)
    assert np.array_equal(ds[3].rows, ds[3].rows)
    unknown = pool.uids[:2].copy()
    unknown["f1"] += np.uint64(1)
    with pytest.raises(ValueError, match="not in the pool"):
        subset_rows(pool, unknown)


def test_two_ranks_split_the_global_batch_and_streaming_equals_memory(toy_pool):
    cfg = nano(caption_templates=("a {c}", "{c} here"))
    rows = subset_rows(Pool(toy_pool), None)
    one = _batches(toy_pool, cfg, rows)[2]
    halves = [_batches(toy_pool, cfg, rows, world_size=2, rank=r)[2] for r in (0, 1)]
    assert torch.equal(torch.cat([h.images for h in halves]), one.images)
    assert torch.equal(torch.cat([h.tokens for h in halves]), one.tokens)
    streamed = _batches(toy_pool, cfg, rows, streamed=True)[2]
    assert torch.equal(streamed.images, one.images) and torch.equal(streamed.tokens, one.tokens)
    # augmentation really changes pixels: the same row drawn twice in a batch differs by its jitter
    assert one.images.std() > 0


def test_greyscale_and_low_resolution_augmentations():
    from datafilter.train.data import Jitter, augment

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 32, 32, 3), dtype=torch.uint8)
    jitter = Jitter.draw(gen, 200, 0, 0.0, 0, greyscale=0.5, low_res=0.5, size=32)
    assert 60 < int(jitter.grey.sum()) < 140 and 60 < int((jitter.low_res > 0).sum()) < 140
    assert int(jitter.low_res[jitter.low_res > 0].min()) >= 8 and int(jitter.low_res.max()) <= 16
    x = augment(images, jitter, pad=0)
    plain = images.permute(0, 3, 1, 2).float() / 255
    grey, low = jitter.grey, jitter.low_res > 0
    assert torch.equal(x[grey][:, 0], x[grey][:, 1]) and torch.equal(x[grey][:, 1], x[grey][:, 2])
    untouched = ~grey & ~low
    torch.testing.assert_close(x[untouched], plain[untouched])
    # shrinking removes the pixel noise: neighbouring pixels of low-resolution copies are much closer
    def roughness(t):
        return (t[..., 1:] - t[..., :-1]).abs().mean()
    assert roughness(x[low & ~grey]) < 0.5 * roughness(plain[low & ~grey])
    # without these augmentations the random stream of the other draws is unchanged
    a = Jitter.draw(torch.Generator().manual_seed(1), 50, 2, 0.1, 3)
    b = Jitter.draw(torch.Generator().manual_seed(1), 50, 2, 0.1, 3, greyscale=0.3, low_res=0.3)
    assert torch.equal(a.oy, b.oy) and torch.equal(a.template, b.template) and not a.grey.any()


# --- the loop --------------------------------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_zero_shot_beats_chance(tmp_path):
    pool = write_toy_pool(tmp_path / "pool", n=96, shard_size=32)
    suite = load_suite(write_toy_suite(tmp_path / "suite"))
    cfg = nano(samples_seen=64 * 60, warmup=5, checkpoint_every=1000)
    result = train(pool, tmp_path / "run", cfg, threads=1)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert np.mean(losses[-2:]) < losses[0] - 1.0
    model = load_model(ModelSpec(cfg.model, checkpoint=str(result.checkpoint)))
    res = evaluate_suite(model, suite)
    things, colours, captions = (res["tasks"][t] for t in ("things", "colours", "captions"))
    assert things["main"] > 3 * things["chance"]  # 12-way colour+shape
    assert colours["main"] > 2 * colours["chance"]
    assert captions["main"] > 2 * captions["chance"]
    # a finished run is found again, not retrained; another recipe in the same folder is refused
    assert train(pool, tmp_path / "run", cfg).checkpoint_sha256 == result.checkpoint_sha256
    with pytest.raises(RunMismatchError):
        train(pool, tmp_path / "run", replace(cfg, lr=1e-3))


def test_resume_after_kill_gives_the_same_weights(tmp_path, monkeypatch):
    pool = write_toy_pool(tmp_path / "pool", n=48, shard_size=16)
    cfg = nano(samples_seen=32 * 9, batch_size=32, checkpoint_every=3)
    full = train(pool, tmp_path / "full", cfg, threads=1)

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # killed during step 5, after the checkpoint at step 3
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(pool, tmp_path / "killed", cfg, threads=1)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()
    assert read_checkpoint(tmp_path / "killed" / "checkpoints" / "latest.pt", cfg.model)[1]["step"] == 3
    resumed = train(pool, tmp_path / "killed", cfg, threads=1)
    a, _ = read_checkpoint(full.checkpoint, cfg.model)
    b, _ = read_checkpoint(resumed.checkpoint, cfg.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in read_metrics(tmp_path / "killed")]
    assert steps == sorted(set(steps))  # metrics of the replayed steps are not duplicated


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, pool: str, out: str, cfg: TrainConfig, cache: str) -> None:
    import os

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "DATAFILTER_CACHE": cache})
    train(pool, out, cfg, threads=1, device="cpu")


@pytest.mark.slow
def test_two_process_gloo_ddp_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    pool = write_toy_pool(tmp_path / "pool", n=48, shard_size=16)
    cfg = nano(samples_seen=32 * 4, batch_size=32, checkpoint_every=2)
    single = train(pool, tmp_path / "one", cfg, threads=1, device="cpu")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(pool), str(tmp_path / "two"), cfg, str(tmp_path / "cache")),
             nprocs=2, join=True)
    a, _ = read_checkpoint(single.checkpoint, cfg.model)
    b, _ = read_checkpoint(tmp_path / "two" / "checkpoint.pt", cfg.model)
    # Equal up to float summation order. Parameters with a mathematically zero gradient (attention key biases) move
    # by lr * noise / eps under Adam, so the tolerance is absolute; a different batch would differ by ~1e-2.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=lambda m: f"{k}: {m}")


def test_train_and_evaluate_commands(tmp_path, capsys):
    from datafilter.cli import main

    pool = write_toy_pool(tmp_path / "pool", n=32, shard_size=16)
    suite = write_toy_suite(tmp_path / "suite", per_combo=1)
    uids = Pool(pool).uids
    np.save(tmp_path / "subset.npy", np.sort(uids[:8]))
    run = tmp_path / "run"
    assert main(["train", str(pool), "--scale", "nano", "--samples-seen", "100", "--batch-size", "32",
                 "--subset", str(tmp_path / "subset.npy"), "--threads", "1", "--out", str(run)]) == 0
    summary = json.loads((run / "train.json").read_text())
    assert summary["samples_seen"] == 100 and summary["steps"] == 4 and summary["unique_rows"] <= 8
    assert main(["evaluate", "--model", "datafilter-nano-vit", "--checkpoint", str(run / "checkpoint.pt"),
                 "--suite", str(suite), "--out", str(tmp_path / "results.json")]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["tasks"]) == {"things", "colours", "captions"}
    assert results["checkpoint_id"] == summary["checkpoint_sha256"]
    assert "ImageNet" in capsys.readouterr().out
    # a checkpoint of another architecture is refused with a clear error (exit code 2)
    assert main(["evaluate", "--model", "datafilter-micro-vit", "--checkpoint", str(run / "checkpoint.pt"),
                 "--suite", str(suite), "--out", str(tmp_path / "x.json")]) == 2
