"""What the speed benchmarks share: the synthetic pool (noisy discs on coloured backgrounds with short captions, written
through the project's own shard writer, PNG up to 64 pixels, JPEG above, as real pools of that size would be) and
the bare training step the training benchmarks compare their data paths with."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from datafilter.pool import ImageConfig, Pool, ShardWriter, make_uid

WORDS = ("red", "green", "blue", "yellow", "square", "circle", "bar", "small", "large", "icon", "photo", "drawing")


def disc_image(rng: np.random.Generator, side: int) -> np.ndarray:
    """A noisy disc of one random colour on a background of another: ``[side, side, 3]`` uint8."""
    yy, xx = np.mgrid[:side, :side]
    arr = rng.integers(0, 256, 3, dtype=np.uint8)[None, None] * np.ones((side, side, 1), np.uint8)
    cy, cx, r = rng.integers(side // 4, 3 * side // 4, 3)
    arr[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    return np.clip(arr.astype(int) + rng.integers(-10, 11, arr.shape), 0, 255).astype(np.uint8)


def make_pool(path: Path, samples: int, shard_size: int, side: int, seed: int = 0) -> Pool:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    fmt = "png" if side <= 64 else "jpg"
    for shard in range((samples + shard_size - 1) // shard_size):
        w = ShardWriter(path, shard, ImageConfig(max_side=side, encode_format=fmt, quality=90))
        for i in range(shard * shard_size, min(samples, (shard + 1) * shard_size)):
            buf = io.BytesIO()
            Image.fromarray(disc_image(rng, side)).save(buf, "PNG")
            caption = " ".join(rng.choice(WORDS, rng.integers(2, 8)))
            w.add(buf.getvalue(), caption, make_uid("bench", str(seed), str(i)))
        w.close()
    return Pool(path)


def bare_steps_per_s(cfg, device, steps: int) -> float:
    """The training loop's step alone (``Stepper``: same model, optimiser, loss, amp, checkpointing) on one batch
    already on ``device``, for a resolved ``TrainConfig``; the loss is read when the loop would log it."""
    import time

    import torch

    from datafilter.common.launch import LaunchEnv
    from datafilter.models import create_model, input_size
    from datafilter.train.loop import Stepper

    model, *_, tokenizer = create_model(cfg.model, seed=cfg.seed)
    step = Stepper.build(model, cfg, device, LaunchEnv())
    model.train()
    size = input_size(model)
    images = torch.randn(cfg.batch_size, 3, size, size, device=device)
    tokens = tokenizer(["a photo of a small red circle on a blue background"] * cfg.batch_size).to(device)
    for _ in range(3):  # allocations, kernel selection
        step(images, tokens)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for i in range(steps):
        loss = step(images, tokens)
        if i % cfg.log_every == 0:
            float(loss.detach())
    sync()
    return steps / (time.perf_counter() - t)
