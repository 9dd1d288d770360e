"""Training: the schedule, the recipe, resampling to a fixed budget, learning, resume after a kill, DDP equivalence.

The streamed data path has its own file (test_train_stream.py)."""

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
from datafilter.pool.pool import PoolError
from datafilter.train.data import StepBatches, decoded_pool, draw_rows, subset_rows, tokenized_pool
from datafilter.train.loop import RunMismatchError
from datafilter.train.transforms import JitterAugment
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
    assert replace(cfg, workers=3, checkpoint_every=7, grad_checkpointing=True).recipe() == cfg.recipe()


def test_datacomp_scales_train_with_datacomps_open_clip_settings():
    # train.py: --precision amp, --local-loss --gather-with-grad --grad-checkpointing, --dataset-resampled, 4 workers
    for name in ("small", "medium", "large", "xlarge"):
        cfg = scale_config(name)
        assert (cfg.augment, cfg.data, cfg.local_loss, cfg.gather_with_grad, cfg.grad_checkpointing, cfg.workers) == (
            "open_clip", "stream", True, True, True, 4), name
        assert cfg.resolved("cuda", 0).precision == "amp" and cfg.resolved("cpu", 0).precision == "fp32"
    # the CPU scales keep their own augmentation and decode small pools into memory
    micro = scale_config("micro")
    assert micro.augment == "jitter" and micro.resolved("cpu", 1 << 20).data == "memory"
    assert micro.resolved("cpu", micro.in_memory_max_bytes + 1).data == "stream"
    assert TrainConfig(precision="amp_bfloat16").precision == "amp_bf16"  # open_clip's alias
    with pytest.raises(ValueError, match="open_clip's names"):
        TrainConfig(precision="half")
    with pytest.raises(ValueError, match="does not keep"):
        TrainConfig(augment="open_clip", data="memory")


def test_open_clip_augment_is_open_clips_train_transform_for_vit_b_32():
    import io

    import open_clip
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    from datafilter.models import create_model
    from datafilter.train.transforms import make_augment

    model, train_tf, _, tokenizer = create_model("ViT-B-32", device="meta")  # the transforms, without the weights
    augment = make_augment("open_clip", model, train_tf, scale_config("small"))
    reference = open_clip.image_transform(224, is_train=True)  # open_clip's own, with OpenAI's mean and std
    crop = reference.transforms[0]
    assert crop.scale == (0.9, 1.0) and crop.interpolation == InterpolationMode.BICUBIC
    rng = np.random.default_rng(0)
    images = []
    for size, mode, fmt in (((320, 200), "RGB", "JPEG"), ((150, 260), "RGBA", "PNG"), ((224, 224), "L", "PNG")):
        buf = io.BytesIO()
        channels = len(mode)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze(),
                        mode).save(buf, fmt)
        images.append(buf.getvalue())
    x, _ = augment.batch([augment.decode(b) for b in images], ["a", "b", "c"], seed=123)
    torch.manual_seed(123)
    # webdataset's "pilrgb" decoder, then open_clip's transform, sample after sample from torch's generator
    expected = torch.stack([reference(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    assert x.shape == (3, 3, 224, 224) and torch.equal(x, expected)
    y, _ = augment.batch([augment.decode(b) for b in images], ["a", "b", "c"], seed=124)
    assert not torch.equal(x, y)  # the crops are random, and the seed decides them
    # the same tokenizer and context length as open_clip's trainer uses for the model
    text = ["a photo of a red circle"]
    assert torch.equal(tokenizer(text), open_clip.get_tokenizer("ViT-B-32")(text))
    assert tokenizer(text).shape == (1, 77)


# --- resampling ------------------------------------------------------------------------------------------------------
def _batches(pool_dir: Path, cfg: TrainConfig, rows: np.ndarray, world_size: int = 1, rank: int = 0) -> StepBatches:
    pool = Pool(pool_dir)
    from datafilter.models import create_model

    model, _, _, tok = create_model(cfg.model)
    images, valid = decoded_pool(pool, 32)
    augment = JitterAugment(32, model.visual.image_mean, model.visual.image_std, pad=cfg.jitter_pad,
                            colour=cfg.colour_jitter, templates=cfg.caption_templates)
    return StepBatches(rows=rows, texts=pool.column("text"), images=images, valid=valid, tokenizer=tok,
                       augment=augment, seed=cfg.seed, batch_size_at=cfg.batch_size_at, steps=cfg.steps, rank=rank,
                       world_size=world_size)


def test_resampling_gives_exactly_samples_seen_and_respects_repeats(toy_pool):
    pool = Pool(toy_pool)
    # uid 5 three times, uid 7 once: 5 must be drawn about three times as often; nothing else ever.
    subset = np.sort(pool.uids[[5, 5, 5, 7]])
    rows, missing = subset_rows(pool, subset)
    assert sorted(rows.tolist()) == [5, 5, 5, 7] and missing == 0
    cfg = nano(samples_seen=1000, batch_size=64)
    ds = _batches(toy_pool, cfg, rows)
    drawn = np.concatenate([ds[s].rows for s in range(len(ds))])
    assert len(drawn) == 1000 == cfg.samples_seen
    assert set(drawn.tolist()) == {5, 7}
    big = np.concatenate([draw_rows(rows, 0, s, 1000) for s in range(40)])
    assert (big == 5).mean() == pytest.approx(0.75, abs=0.01)
    # same step, same draws: the stream does not depend on the order of calls (resume)
    assert np.array_equal(ds[3].rows, ds[3].rows)
    # uids the pool lacks (DataComp's subsets list samples that failed to download) are counted; none found is an error
    unknown = pool.uids[:2].copy()
    unknown["f1"] += np.uint64(1)
    rows, missing = subset_rows(pool, np.sort(np.concatenate([unknown, pool.uids[[5]]])))
    assert rows.tolist() == [5] and missing == 2
    with pytest.raises(ValueError, match="none of its 2 uids is in the pool"):
        subset_rows(pool, np.sort(unknown))


def test_two_ranks_split_the_global_batch(toy_pool):
    cfg = nano(caption_templates=("a {c}", "{c} here"))
    rows, _ = subset_rows(Pool(toy_pool), None)
    one = _batches(toy_pool, cfg, rows)[2]
    halves = [_batches(toy_pool, cfg, rows, world_size=2, rank=r)[2] for r in (0, 1)]
    assert torch.equal(torch.cat([h.images for h in halves]), one.images)
    assert torch.equal(torch.cat([h.tokens for h in halves]), one.tokens)
    # augmentation really changes pixels: the same row drawn twice in a batch differs by its jitter
    assert one.images.std() > 0


def test_captions_tokenized_once_per_pool_give_the_batches_tokenized_per_step(toy_pool, tmp_path):
    pool = Pool(toy_pool)
    cfg = nano(samples_seen=64 * 3)
    rows, _ = subset_rows(pool, None)
    per_step = _batches(toy_pool, cfg, rows)
    tokens = tokenized_pool(pool, cfg.model, workers=2)
    assert tokens.dtype == np.int32 and tokens.shape == (pool.num_samples, 16)
    cached = StepBatches(rows=rows, texts=per_step.texts, images=per_step.images, valid=per_step.valid,
                         tokenizer=None, augment=per_step.augment, seed=cfg.seed, batch_size_at=cfg.batch_size_at,
                         steps=cfg.steps, rank=0, world_size=1, tokens=tokens)
    for step in range(cfg.steps):
        a, b = per_step[step], cached[step]
        assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens) and a.tokens.dtype == b.tokens.dtype
    # cached by pool and model: a second call reads the files, a changed file is not silently taken
    marker = next((tmp_path / "cache" / "tokens").glob("*/*.npy"))
    np.save(marker, np.load(marker)[:-1])
    with pytest.raises(PoolError, match="delete it to tokenize again"):
        tokenized_pool(pool, cfg.model)
    # templates change the caption per draw: no pre-tokenized captions then
    with pytest.raises(ValueError, match="caption templates"):
        StepBatches(rows=rows, texts=per_step.texts, images=per_step.images, valid=per_step.valid, tokenizer=None,
                    augment=JitterAugment(32, (0, 0, 0), (1, 1, 1), pad=2, colour=0.1, templates=("a {c}",)),
                    seed=0, batch_size_at=cfg.batch_size_at, steps=1, rank=0, world_size=1, tokens=tokens)


def test_prepare_data_fills_the_caches_the_in_memory_path_reads(toy_pool, tmp_path):
    from datafilter.train.loop import prepare_data

    cache = tmp_path / "cache"
    shards = len(Pool(toy_pool).shards)
    prepare_data(toy_pool, nano(data="stream"), workers=1)  # streamed runs read the shards: nothing to prepare
    assert not list(cache.glob("decoded/*/*")) and not list(cache.glob("tokens/*/*"))
    prepare_data(toy_pool, nano(caption_templates=("a {c}",)), workers=1)  # templates: images only
    assert len(list(cache.glob("decoded/*/*.npz"))) == shards and not list(cache.glob("tokens/*/*"))
    prepare_data(toy_pool, nano(), workers=2)
    assert len(list(cache.glob("tokens/*-datafilter-nano-vit-*/*.npy"))) == shards


def test_greyscale_and_low_resolution_augmentations():
    from datafilter.train.transforms import Jitter, augment

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
def test_the_nano_recipe_learns_well_below_chance_and_zero_shot_beats_chance(tmp_path):
    pool = write_toy_pool(tmp_path / "pool", n=96, shard_size=32)
    suite = load_suite(write_toy_suite(tmp_path / "suite"))
    cfg = scale_config("nano", decode_workers=1, log_every=1)  # the scale's own recipe, nothing overridden
    result = train(pool, tmp_path / "run", cfg, threads=1)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    chance = math.log(cfg.batch_size)  # the loss of embeddings that tell nothing apart
    assert np.mean(losses[-len(losses) // 4:]) < 0.6 * chance
    model = load_model(ModelSpec(cfg.model, checkpoint=str(result.checkpoint)))
    res = evaluate_suite(model, suite)
    things, colours, captions = (res["tasks"][t] for t in ("things", "colours", "captions"))
    assert things["main"] > 3 * things["chance"]  # 12-way colour+shape
    assert colours["main"] > 2 * colours["chance"]
    assert captions["main"] > 2 * captions["chance"]
    # a finished run is found again, not retrained; another recipe in the same folder is refused, saying what differs
    assert train(pool, tmp_path / "run", cfg).checkpoint_sha256 == result.checkpoint_sha256
    with pytest.raises(RunMismatchError, match=rf"lr: {cfg.lr!r} -> 0.001"):
        train(pool, tmp_path / "run", replace(cfg, lr=1e-3))


def test_open_clips_precisions_train_on_cpu_and_the_fp16_ones_need_a_gpu(tmp_path):
    pool = write_toy_pool(tmp_path / "pool", n=32, shard_size=16)
    for precision in ("amp_bf16", "bf16"):
        result = train(pool, tmp_path / precision, nano(samples_seen=64, precision=precision), threads=1, device="cpu")
        assert math.isfinite(result.final_loss)
    assert read_checkpoint(tmp_path / "amp_bf16" / "checkpoint.pt", "datafilter-nano-vit")[0][
        "visual.conv1.weight"].dtype == torch.float32  # autocast: fp32 weights
    assert read_checkpoint(tmp_path / "bf16" / "checkpoint.pt", "datafilter-nano-vit")[0][
        "visual.conv1.weight"].dtype == torch.bfloat16  # open_clip's bf16: the weights themselves
    for precision in ("amp", "fp16"):
        with pytest.raises(ValueError, match="needs a GPU"):
            train(pool, tmp_path / precision, nano(samples_seen=64, precision=precision), device="cpu")
    assert not (tmp_path / "amp").exists()


def test_a_refused_run_leaves_nothing_that_refuses_its_corrected_rerun(tmp_path):
    from datafilter.common.launch import LaunchEnv

    pool = write_toy_pool(tmp_path / "pool", n=32, shard_size=16)
    other = Pool(write_toy_pool(tmp_path / "other", n=8, seed=5))
    np.save(tmp_path / "other.npy", np.sort(other.uids))
    np.save(tmp_path / "good.npy", np.sort(Pool(pool).uids[:8]))
    run = tmp_path / "run"
    cfg = nano(samples_seen=64)
    with pytest.raises(ValueError, match="none of its 8 uids is in the pool"):
        train(pool, run, cfg, subset=tmp_path / "other.npy", threads=1)
    with pytest.raises(ValueError, match="does not split evenly across 3 ranks"):
        train(pool, run, cfg, subset=tmp_path / "good.npy", threads=1, env=LaunchEnv(0, 3, 0))
    assert not (run / "run.json").exists()
    train(pool, run, cfg, subset=tmp_path / "good.npy", threads=1)  # the corrected command runs
    with pytest.raises(RunMismatchError, match="subset_sha256: '[0-9a-f]+' -> '[0-9a-f]+'"):
        train(pool, run, cfg, subset=tmp_path / "other.npy", threads=1)


@pytest.mark.slow
def test_the_nano_recipe_leaves_chance_on_the_nano_pool(nano_builds, tmp_path):
    # The pool the benchmark's tests train on: 3,000 samples, half of them noise. Its old recipe (batch 64, lr 5e-3)
    # collapsed here, ending at exactly ln 64.
    cfg = scale_config("nano", decode_workers=1, log_every=1)
    train(nano_builds["pool"], tmp_path / "run", cfg, threads=1)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert np.mean(losses[-len(losses) // 4:]) < math.log(cfg.batch_size) - 0.15


def kill_during_step(monkeypatch, step: int, fn):
    """Run ``fn()`` with the optimiser raising KeyboardInterrupt in step ``step`` (0-based), as a kill would."""
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def dying_step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == step + 1:
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", dying_step)
        with pytest.raises(KeyboardInterrupt):
            fn()


def assert_same_weights(a_path: Path, b_path: Path, model: str) -> None:
    a, _ = read_checkpoint(a_path, model)
    b, _ = read_checkpoint(b_path, model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_kill_gives_the_same_weights(tmp_path, monkeypatch):
    pool = write_toy_pool(tmp_path / "pool", n=48, shard_size=16)
    cfg = nano(samples_seen=32 * 9, batch_size=32, checkpoint_every=3)
    full = train(pool, tmp_path / "full", cfg, threads=1)
    kill_during_step(monkeypatch, 5, lambda: train(pool, tmp_path / "killed", cfg, threads=1))  # after step 3's save
    assert not (tmp_path / "killed" / "checkpoint.pt").exists()
    assert read_checkpoint(tmp_path / "killed" / "checkpoints" / "latest.pt", cfg.model)[1]["step"] == 3
    resumed = train(pool, tmp_path / "killed", cfg, threads=1)
    assert_same_weights(full.checkpoint, resumed.checkpoint, cfg.model)
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

    from datafilter.models import create_model

    pool = write_toy_pool(tmp_path / "pool", n=48, shard_size=16)
    cfg = nano(samples_seen=32 * 4, batch_size=32, checkpoint_every=2)
    assert cfg.local_loss and cfg.gather_with_grad  # DataComp's loss: each rank computes only its rows
    single = train(pool, tmp_path / "one", cfg, threads=1, device="cpu")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(pool), str(tmp_path / "two"), cfg, str(tmp_path / "cache")),
             nprocs=2, join=True)
    one, _ = read_checkpoint(single.checkpoint, cfg.model)
    two, _ = read_checkpoint(tmp_path / "two" / "checkpoint.pt", cfg.model)
    init = create_model(cfg.model, seed=cfg.seed)[0].state_dict()
    # The logged loss is the mean of the ranks' local losses: the global batch's loss, as one process logs it.
    assert [m["loss"] for m in read_metrics(tmp_path / "two")] == pytest.approx(
        [m["loss"] for m in read_metrics(tmp_path / "one")], abs=1e-5)

    # The two runs differ only by the order of float sums. Compared with how far training moved each quantity, that
    # is tiny, except on the attention key biases: adding b to every key adds the same q.b to all of a query's logits,
    # which softmax ignores, so their true gradient is zero; Adam divides the float noise left there by its own
    # running size (plus eps 1e-6) and moves them by a good fraction of lr, differently in each run. Those moves
    # change nothing the model computes, so they are left out of the weight comparison and the embeddings, where
    # such moves cannot show, are compared as well.
    def comparable(k: str, t: torch.Tensor) -> torch.Tensor:
        if k.endswith("attn.in_proj_bias"):
            w = len(t) // 3
            return torch.cat([t[:w], t[2 * w:]])  # query and value biases; the key biases are t[w:2w]
        return t

    for k in one:
        a, b, a0 = (comparable(k, t[k]) for t in (one, two, init))
        moved = (a - a0).abs().max()
        assert (a - b).abs().max() <= 1e-2 * moved + 1e-7, k  # under 1% of training's own change
    models = [load_model(ModelSpec(cfg.model, checkpoint=str(p)))
              for p in (single.checkpoint, tmp_path / "two" / "checkpoint.pt")]
    fresh = load_model(ModelSpec(cfg.model), seed=cfg.seed)
    images = torch.randn(16, 3, 32, 32)
    captions = ["a red circle", "a blue bar", "a green square", "a yellow circle"]
    for encode in (lambda m: m.encode_images(images), lambda m: m.encode_texts(captions)):
        e1, e2, e0 = (encode(m) for m in (*models, fresh))
        assert (e1 - e2).abs().max() <= 1e-3 * (e1 - e0).abs().max()


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
