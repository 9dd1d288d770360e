"""The training loop: open_clip's contrastive loss and models, DataComp's optimiser recipe, DDP, checkpoints, resume.

A run directory holds::

    RUN_DIR/run.json                 what is being trained: recipe, pool id, subset file and its hash
    RUN_DIR/checkpoints/latest.pt    model weights at the last checkpoint step (``meta.step``)
    RUN_DIR/checkpoints/optim-NNNNNNNN.pt  optimiser (and loss-scaler) state of that step
    RUN_DIR/metrics.jsonl            step, samples seen, loss, lr, logit scale, samples/s every ``log_every`` steps
    RUN_DIR/checkpoint.pt            the final model (``datafilter.models.save_checkpoint`` format)
    RUN_DIR/train.json               summary, written last: its presence means the run is complete

Every write is atomic. The optimiser state is written before the model checkpoint that names its step, and older
states are removed only after, so a kill at any moment leaves a consistent pair to resume from. Since the learning
rate is a function of the step and every batch a function of ``(seed, step)``, a resumed run ends with exactly the
weights an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datafilter.common.files import atomic_path, read_json, sha256_file, write_json
from datafilter.common.launch import LaunchEnv, ddp_env, free_cores
from datafilter.pool.pool import Pool
from datafilter.train.config import TrainConfig
from datafilter.train.data import StepBatches, StreamedImages, decoded_pool, subset_rows
from datafilter.train.schedule import lr_at

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
DONE_FILE = "train.json"
FINAL_CHECKPOINT = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"


class RunMismatchError(ValueError):
    """A run directory that already holds a different run."""


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    checkpoint: Path
    checkpoint_sha256: str
    model: str
    steps: int
    samples_seen: int
    final_loss: float
    seconds: float

    @classmethod
    def from_summary(cls, run_dir: Path, d: dict[str, Any]) -> "TrainResult":
        return cls(run_dir, run_dir / FINAL_CHECKPOINT, d["checkpoint_sha256"], d["model"], d["steps"],
                   d["samples_seen"], d["final_loss"], d["seconds"])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's split: no weight decay on gains, biases, norms, the logit scale and other 1-d parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _identity(x):
    return x


def _same(stored: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Whether a stored run is this one: same recipe, pool content and subset content (paths may differ)."""
    return {k: stored.get(k) for k in identity} == json.loads(json.dumps(identity))


def _load_subset(path: str | Path) -> np.ndarray:
    # The filters package owns the subset format (sidecar checks included); a bare DataComp .npy loads as well.
    from datafilter.filters.subset import load_subset

    return load_subset(path)[0]


class _Distributed:
    """Process-group set-up and the few collectives the loop needs; a no-op for a single process."""

    def __init__(self, env: LaunchEnv, device: torch.device):
        self.env = env
        if env.distributed:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank,
                                        world_size=env.world_size)
        self.is_main = env.rank == 0

    def barrier(self) -> None:
        if self.env.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.env.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def train(pool_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, subset: str | Path | None = None, *,
          threads: int | None = None, device: str = "auto", env: LaunchEnv | None = None) -> TrainResult:
    """Train ``cfg.model`` on the pool (or the subset of it) for exactly ``cfg.samples_seen`` samples.

    Resumes from ``out_dir``'s last checkpoint; returns at once when ``out_dir`` already holds the finished run.
    """
    out = Path(out_dir)
    env = env or ddp_env()
    pool = Pool(pool_dir)
    identity = {"recipe": cfg.recipe(), "pool_id": pool.pool_id,
                "subset_sha256": sha256_file(subset) if subset is not None else None}
    done = out / DONE_FILE
    if done.exists():
        summary = read_json(done)
        if not _same(summary.get("identity", {}), identity):
            raise RunMismatchError(f"{out} holds a finished run of another recipe, pool or subset ({done}); "
                                   f"choose another output directory")
        log.info("%s: already trained (%s)", out, done)
        return TrainResult.from_summary(out, summary)
    for size in {cfg.batch_size, cfg.batch_size_at(cfg.steps - 1)}:  # the last batch may be smaller
        if size % env.world_size:
            raise ValueError(f"a batch of {size} does not split evenly across {env.world_size} ranks (batch size "
                             f"{cfg.batch_size}, {cfg.samples_seen} samples seen); choose values that do")

    from datafilter.models import pick_device

    dev = pick_device(device, env.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)) if env.distributed else 1
    torch.set_num_threads(threads or max(1, free_cores() // local_world))
    dist = _Distributed(env, dev)
    try:
        return _train(pool, out, cfg, subset, identity, env, dev, dist)
    finally:
        dist.close()


def _train(pool: Pool, out: Path, cfg: TrainConfig, subset: str | Path | None, identity: dict[str, Any],
           env: LaunchEnv, dev: torch.device, dist: _Distributed) -> TrainResult:
    from open_clip.loss import ClipLoss
    from tqdm.auto import tqdm

    from datafilter.models import create_model, read_checkpoint, save_checkpoint

    ckpt_dir = out / "checkpoints"
    run_file = out / RUN_FILE
    # Every rank checks (so none waits at a barrier for a rank that gave up); rank 0 writes.
    if run_file.exists() and not _same(read_json(run_file), identity):
        raise RunMismatchError(f"{run_file} describes another run (recipe, pool or subset differ); "
                               f"choose another output directory or delete {out}")
    if dist.is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if not run_file.exists():
            write_json(run_file, {**identity, "pool": str(pool.path), "subset": str(subset) if subset else None})
    dist.barrier()

    model, _, _, tokenizer = create_model(cfg.model, seed=cfg.seed, device="cpu")
    visual = model.visual
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]

    rows = subset_rows(pool, _load_subset(subset) if subset is not None else None, str(subset or "pool"))
    texts = pool.column("text")
    decoded_bytes = pool.num_samples * size * size * 3
    if decoded_bytes <= cfg.in_memory_max_bytes:
        workers = cfg.decode_workers or max(1, free_cores() // env.world_size)
        images, valid = decoded_pool(pool, size, workers=workers, env=env, sync=dist.barrier)
        keep = valid[rows]
        if not keep.any():
            raise ValueError(f"no decodable image among the training rows of {pool.path}")
        if not keep.all():
            # Kept in ``rows`` so that draws match the streamed path exactly; each batch replaces them.
            log.warning("%d of %d training rows have undecodable images; batches replace them", int((~keep).sum()),
                        len(rows))
        source: np.ndarray | StreamedImages = images
    else:
        log.info("decoded pool would take %.1f GiB (> in_memory_max_bytes); streaming images from the tars",
                 decoded_bytes / 2**30)
        source, valid = StreamedImages(pool, size), None
    log.info("training %s on %d rows (%d unique) of %s for %d samples (%d steps of %d)", cfg.model, len(rows),
             len(np.unique(rows)), pool.path, cfg.samples_seen, cfg.steps, cfg.batch_size)

    model = model.to(dev)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps)
    use_amp = cfg.precision == "amp"
    if use_amp and dev.type != "cuda":
        raise ValueError("precision 'amp' (fp16 with loss scaling) needs a GPU; use bf16 or fp32 on CPU")
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    # Resume.
    start = 0
    latest = ckpt_dir / "latest.pt"
    if latest.exists():
        state, meta = read_checkpoint(latest, cfg.model)
        start = int(meta["step"])
        model.load_state_dict(state)
        opt_state = torch.load(ckpt_dir / f"optim-{start:08d}.pt", map_location=dev, weights_only=True)
        optimizer.load_state_dict(opt_state["optimizer"])
        if scaler is not None and opt_state.get("scaler"):
            scaler.load_state_dict(opt_state["scaler"])
        log.info("resuming %s from step %d of %d", out, start, cfg.steps)
    if dist.is_main:  # lines logged after the last checkpoint (or before the first) are logged again
        _truncate_metrics(out / METRICS_FILE, start)

    train_model: torch.nn.Module = model
    if env.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    loss_fn = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, cache_labels=True,
                       rank=env.rank, world_size=env.world_size)

    dataset = StepBatches(
        rows=rows, texts=texts, images=source, valid=valid, tokenizer=tokenizer, seed=cfg.seed,
        batch_size_at=cfg.batch_size_at, steps=cfg.steps, rank=env.rank, world_size=env.world_size,
        templates=cfg.caption_templates, jitter_pad=cfg.jitter_pad, colour_jitter=cfg.colour_jitter,
        mean=visual.image_mean, std=visual.image_std, greyscale=cfg.greyscale, low_res=cfg.low_res)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, cfg.steps),
                                         num_workers=cfg.workers, collate_fn=_identity,
                                         persistent_workers=False, prefetch_factor=4 if cfg.workers else None)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else torch.autocast(dev.type, dtype=torch.float16) if use_amp else contextlib.nullcontext())

    def save_state(step: int) -> None:
        """Optimiser state first, then the model checkpoint naming its step, then old states go."""
        if dist.is_main:
            opt_path = ckpt_dir / f"optim-{step:08d}.pt"
            with atomic_path(opt_path) as tmp:
                torch.save({"step": step, "optimizer": optimizer.state_dict(),
                            "scaler": scaler.state_dict() if scaler is not None else None}, tmp)
            save_checkpoint(model, cfg.model, latest, meta={"step": step})
            for old in ckpt_dir.glob("optim-*.pt"):
                if old != opt_path:
                    old.unlink()
        dist.barrier()

    model.train()
    t0 = time.time()
    seen_here = 0
    loss_value = float("nan")
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.model}", unit="step", disable=not dist.is_main)
    metrics = open(out / METRICS_FILE, "a") if dist.is_main else None
    try:
        for step, batch in zip(range(start, cfg.steps), loader):
            lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images_b = batch.images.to(dev, non_blocking=True)
            tokens_b = batch.tokens.to(dev, non_blocking=True)
            with autocast:
                image_f, text_f, logit_scale = train_model(images_b, tokens_b)[:3]
                loss = loss_fn(image_f, text_f, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise RuntimeError(f"loss is {loss_value} at step {step}; lower the learning rate or use fp32")
            seen_here += cfg.batch_size_at(step)
            rate = seen_here / max(time.time() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", samples_s=f"{rate:.0f}")
            if metrics is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
                metrics.write(json.dumps({
                    "step": step, "samples_seen": min((step + 1) * cfg.batch_size, cfg.samples_seen),
                    "loss": loss_value, "lr": lr, "logit_scale": float(model.logit_scale.detach().exp()),
                    "samples_per_s": rate}) + "\n")
                metrics.flush()
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_state(step + 1)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    seconds = time.time() - t0
    final = out / FINAL_CHECKPOINT
    summary: dict[str, Any] = {}
    if dist.is_main:
        save_checkpoint(model, cfg.model, final, meta={
            "step": cfg.steps, "samples_seen": cfg.samples_seen, "pool_id": pool.pool_id,
            "subset_sha256": identity["subset_sha256"], "recipe": cfg.recipe()})
        summary = {
            "identity": identity, "model": cfg.model, "config": cfg.to_json(), "pool": str(pool.path),
            "subset": str(subset) if subset is not None else None,
            "steps": cfg.steps, "samples_seen": cfg.samples_seen, "unique_rows": int(len(np.unique(rows))),
            "final_loss": loss_value, "seconds": seconds, "world_size": env.world_size, "device": str(dev),
            "checkpoint": FINAL_CHECKPOINT, "checkpoint_sha256": sha256_file(final)}
        write_json(out / DONE_FILE, summary)
        log.info("trained %s: final loss %.4f, %s", cfg.model, loss_value, final)
    dist.barrier()
    if not summary:
        summary = read_json(out / DONE_FILE)
    return TrainResult.from_summary(out, summary)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps that will be trained again after a resume."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in lines))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
