"""The training loop: open_clip's contrastive loss and models, DataComp's optimiser recipe, DDP, checkpoints, resume.

A run directory holds::

    RUN_DIR/run.json                 what is being trained: recipe, pool id, subset file and its hash
    RUN_DIR/checkpoints/latest.pt    model weights at the last checkpoint step (``meta.step``)
    RUN_DIR/checkpoints/optim-NNNNNNNN.pt  optimiser (and loss-scaler) state of that step
    RUN_DIR/checkpoints/stream-NNNNNNNN-rRRRRR.json  a streamed run's positions in its streams at that step, per rank
    RUN_DIR/stream/                  a streamed run's subset index (repeat count of every pool row)
    RUN_DIR/metrics.jsonl            step, samples seen, loss, lr, logit scale, samples/s, seconds so far and of them
                                     waiting for data, every ``log_every`` steps
    RUN_DIR/checkpoint.pt            the final model (``datafilter.models.save_checkpoint`` format)
    RUN_DIR/train.json               summary, written last: its presence means the run is complete

``run.json`` is written only once every check has passed (recipe, subset, world size, resume layout), so a refused
run leaves nothing that would refuse its corrected rerun. Every write is atomic. The optimiser state and stream
positions are written before the model checkpoint that names their step, and older ones are deleted after it. Since
the learning rate is a function of the step and every batch a function of ``(seed, step)`` (in-memory path) or of
the stream positions saved with the checkpoint (streamed path), a resumed run ends with exactly the weights an
uninterrupted run would have.

The training step is open_clip's (``open_clip_train.train.train_one_epoch``) as DataComp's ``train.py`` configures
it: autocast in the chosen precision with a loss scaler for ``amp``, ``ClipLoss`` with ``local_loss`` and
``gather_with_grad``, DDP with a static graph, optional gradient checkpointing, the logit scale clamped at 100.
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
from typing import Any, Callable

import numpy as np
import torch

from datafilter.common.files import atomic_path, read_json, sha256_file, write_json
from datafilter.common.launch import LaunchEnv, ddp_env, free_cores
from datafilter.pool.pool import Pool
from datafilter.train.config import TrainConfig
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


def differences(stored: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """What differs between a stored run's identity and this one's, one ``name: stored -> now`` line per field (the
    recipe's fields one by one); empty when they are the same run."""
    now = json.loads(json.dumps(identity))
    out = []
    for key in now:
        a, b = stored.get(key), now[key]
        if key == "recipe" and isinstance(a, dict):
            out += [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _mismatch(what: str, path: Path, diff: list[str]) -> RunMismatchError:
    return RunMismatchError(f"{path} {what} ({'; '.join(diff)}); choose another output directory, or delete "
                            f"{path.parent} to start over")


class _Distributed:
    """Process-group set-up and the few collectives the loop needs; no-ops for a single process."""

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

    def mean(self, value: torch.Tensor) -> float:
        """The mean over ranks of a scalar (each rank's local loss, with ``local_loss``)."""
        value = value.detach()
        if self.env.distributed:
            import torch.distributed as dist

            value = value.clone()
            dist.all_reduce(value)
            value /= self.env.world_size
        return float(value)

    def gather(self, obj: Any) -> list[Any]:
        if not self.env.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run by rank 0 only; every rank gets its result, or raises its error (none waits at a barrier for
        a rank that gave up)."""
        result = error = None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:
                error = exc
        if self.env.distributed:
            import torch.distributed as dist

            box = [(result, error)]
            dist.broadcast_object_list(box, src=0)
            result, error = box[0]
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        if self.env.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


@dataclass
class Stepper:
    """One optimiser step of open_clip's trainer (``train_one_epoch``) as DataComp's ``train.py`` configures it.

    Shared by the loop and the benchmarks' bare loops, so that those time exactly the step the loop runs.
    """

    model: torch.nn.Module  # the model itself (its state is what checkpoints hold)
    train_model: torch.nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # amp's loss scaler
    autocast: Any
    loss_fn: torch.nn.Module
    device: torch.device
    input_dtype: torch.dtype | None  # bf16 / fp16: the images are cast, like the weights

    @classmethod
    def build(cls, model: torch.nn.Module, cfg: TrainConfig, dev: torch.device, env: LaunchEnv) -> "Stepper":
        """The device's settings, gradient checkpointing, low-precision weights, AdamW, the loss scaler, DDP and
        ClipLoss."""
        from open_clip.loss import ClipLoss

        if dev.type == "cuda":  # as open_clip's trainer sets them: TF32 matmuls, cuDNN autotuning
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        if input_dtype is not None:  # open_clip's pure low-precision modes: the weights themselves in that type
            from open_clip.model import convert_weights_to_lp

            convert_weights_to_lp(model, dtype=input_dtype)
        model = model.to(dev)
        # The same AdamW update in every case. On the CPU, torch's default implementation loops over the parameters
        # with a temporary tensor per operation; its fused kernel makes one pass. The token embedding (49,408 rows)
        # is most of a small model's parameters, so at the micro scale that is 7% of a step.
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                      betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                      fused=True if dev.type == "cpu" else None)
        scaler = torch.amp.GradScaler("cuda") if cfg.precision == "amp" else None
        amp_dtype = {"amp": torch.float16, "amp_bf16": torch.bfloat16}.get(cfg.precision)
        autocast = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        train_model: torch.nn.Module = model
        if env.distributed:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[dev.index] if dev.type == "cuda" else None, static_graph=True)
        loss_fn = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, cache_labels=True,
                           rank=env.rank, world_size=env.world_size)
        return cls(model, train_model, optimizer, scaler, autocast, loss_fn, dev, input_dtype)

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Forward, loss, backward, optimiser step, the logit scale clamped at ln 100; returns this rank's loss."""
        images = images.to(self.device, dtype=self.input_dtype, non_blocking=True)
        tokens = tokens.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            image_f, text_f, logit_scale = self.train_model(images, tokens)[:3]
            loss = self.loss_fn(image_f, text_f, logit_scale)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        return loss


def _streams(cfg: TrainConfig) -> int:
    return max(1, cfg.workers)


def _check_runnable(cfg: TrainConfig, env: LaunchEnv, dev: torch.device, ckpt_dir: Path, fresh_stream: bool) -> None:
    """Everything about the launch that can be refused before any work: batch split, precision, resume layout."""
    for size in {cfg.batch_size, cfg.batch_size_at(cfg.steps - 1)}:  # the last batch may be smaller
        if size % env.world_size:
            ok = [w for w in range(1, min(cfg.batch_size, 1024) + 1) if cfg.batch_size % w == 0 and size % w == 0]
            raise ValueError(f"a global batch of {size} does not split evenly across {env.world_size} ranks (batch "
                             f"size {cfg.batch_size}, {cfg.samples_seen:,} samples seen); run on a world size that "
                             f"divides it (e.g. {', '.join(map(str, ok[-6:]))}) or change --batch-size")
    if cfg.precision in ("amp", "fp16") and dev.type != "cuda":
        raise ValueError(f"precision {cfg.precision!r} (fp16) needs a GPU; use amp_bf16, bf16 or fp32 on CPU")
    if cfg.data == "stream" and (ckpt_dir / "latest.pt").exists() and not fresh_stream:
        from datafilter.train.stream import layout_of

        saved = layout_of(ckpt_dir)
        now = {"world_size": env.world_size, "streams": _streams(cfg)}
        if saved is not None and saved != now:
            raise ValueError(
                f"{ckpt_dir} holds stream positions for {saved['world_size']} rank(s) x {saved['streams']} stream(s) "
                f"(loader workers) each, but this launch has {now['world_size']} x {now['streams']}. Relaunch with "
                f"that layout to continue the exact sample order, or pass --fresh-stream to continue from the "
                f"checkpoint with new streams (samples seen stay exact; the order after it differs from an "
                f"uninterrupted run)")


def train(pool_dir: str | Path, out_dir: str | Path, cfg: TrainConfig, subset: str | Path | None = None, *,
          threads: int | None = None, device: str = "auto", env: LaunchEnv | None = None,
          fresh_stream: bool = False) -> TrainResult:
    """Train ``cfg.model`` on the pool (or the subset of it) for exactly ``cfg.samples_seen`` samples.

    Resumes from ``out_dir``'s last checkpoint; returns at once when ``out_dir`` already holds the finished run.
    ``fresh_stream`` lets a streamed run resume under another number of ranks or loader workers, with new streams.
    """
    from datafilter.models import create_model, input_size, pick_device

    out = Path(out_dir)
    env = env or ddp_env()
    pool = Pool(pool_dir)
    dev = pick_device(device, env.local_rank)
    model, train_tf, _, tokenizer = create_model(cfg.model, seed=cfg.seed, device="cpu")  # checks the name too
    size = input_size(model)
    cfg = cfg.resolved(dev.type, pool.num_samples * size * size * 3)
    identity = {"recipe": cfg.recipe(), "pool_id": pool.pool_id,
                "subset_sha256": sha256_file(subset) if subset is not None else None}
    done = out / DONE_FILE
    if done.exists():
        summary = read_json(done)
        diff = differences(summary.get("identity", {}), identity)
        if diff:
            raise _mismatch("holds a finished run of another recipe, pool or subset", done, diff)
        log.info("%s: already trained (%s)", out, done)
        return TrainResult.from_summary(out, summary)
    run_file = out / RUN_FILE
    # Every rank checks (so none waits at a barrier for a rank that gave up); rank 0 writes, once all checks passed.
    if run_file.exists():
        diff = differences(read_json(run_file), identity)
        if diff:
            raise _mismatch("describes another run", run_file, diff)
    _check_runnable(cfg, env, dev, out / "checkpoints", fresh_stream)

    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)) if env.distributed else 1
    loader_cores = cfg.workers if cfg.data == "stream" else 0
    torch.set_num_threads(threads or max(1, free_cores() // local_world - loader_cores))
    dist = _Distributed(env, dev)
    try:
        return _train(pool, out, cfg, subset, identity, env, dev, dist, model, train_tf, tokenizer, fresh_stream)
    finally:
        dist.close()


def prepare_data(pool_dir: str | Path, cfg: TrainConfig, workers: int, device: str = "auto") -> None:
    """Fill the caches that runs of ``cfg`` on this pool read, if they take the in-memory path: the decoded images
    and the tokenized captions, made with ``workers`` processes. Runs started side by side on a new pool would each
    make them, on one core each; a benchmark calls this once before its runs."""
    import open_clip

    from datafilter.models import pick_device
    from datafilter.models.loading import tokenizer_for
    from datafilter.train.data import fill_caches

    pool = Pool(pool_dir)
    tokenizer_for(cfg.model)  # registers the project's model configs
    size = open_clip.get_model_config(cfg.model)["vision_cfg"]["image_size"]
    cfg = cfg.resolved(pick_device(device).type, pool.num_samples * size * size * 3)
    if cfg.data == "memory" and cfg.augment == "jitter":
        fill_caches(pool, size, None if cfg.caption_templates else cfg.model, workers)


@dataclass
class _Data:
    """A data path made ready: its dataset for the loop and what the summary reports about it."""

    dataset: torch.utils.data.Dataset
    info: dict[str, Any]
    stream_states: dict[int, dict[str, Any]] | None = None  # streamed: the positions to continue from
    origin: int = 0


def _memory_data(pool: Pool, cfg: TrainConfig, subset: str | Path | None, env: LaunchEnv, dist: _Distributed,
                 augment: Any, tokenizer: Callable, run_file: Callable[[], None]) -> _Data:
    from datafilter.filters.subset import load_subset
    from datafilter.train.data import StepBatches, decoded_pool, subset_rows, tokenized_pool

    uids = load_subset(subset)[0] if subset is not None else None
    rows, missing = subset_rows(pool, uids, str(subset or "pool"))
    run_file()  # the subset is fine: from here on the run directory is this run's
    workers = cfg.decode_workers or max(1, free_cores() // env.world_size)
    images, valid = decoded_pool(pool, augment.size, workers=workers, env=env, sync=dist.barrier)
    keep = valid[rows]
    if not keep.any():
        raise ValueError(f"no decodable image among the training rows of {pool.path}")
    if not keep.all():
        log.warning("%d of %d training rows have undecodable images; batches replace them", int((~keep).sum()),
                    len(rows))
    tokens = None if augment.templates else tokenized_pool(pool, cfg.model, workers=workers, env=env,
                                                           sync=dist.barrier)
    dataset = StepBatches(rows=rows, texts=pool.column("text"), images=images, valid=valid, tokenizer=tokenizer,
                          augment=augment, seed=cfg.seed, batch_size_at=cfg.batch_size_at, steps=cfg.steps,
                          rank=env.rank, world_size=env.world_size, tokens=tokens)
    entries = len(rows) + missing
    return _Data(dataset, {"subset_entries": entries, "found": len(rows), "missing": missing,
                           "unique_rows": int(len(np.unique(rows)))})


def _stream_data(pool: Pool, out: Path, cfg: TrainConfig, subset: str | Path | None, identity: dict[str, Any],
                 env: LaunchEnv, dist: _Distributed, augment: Any, tokenizer: Callable, start: int,
                 fresh_stream: bool, run_file: Callable[[], None]) -> _Data:
    from datafilter.train.stream import StreamBatches, prepare_source, stream_file

    source = dist.on_main(lambda: prepare_source(pool, subset, identity["subset_sha256"], out / "stream"))
    run_file()
    states: dict[int, dict[str, Any]] = {}
    origin = 0
    if start and fresh_stream:
        origin = start
        log.info("resuming at step %d with fresh streams (--fresh-stream)", start)
    elif start:
        path = stream_file(out / "checkpoints", start, env.rank)
        if not path.exists():
            raise FileNotFoundError(f"{path} (the stream positions of the checkpoint at step {start}) is missing; "
                                    f"pass --fresh-stream to continue with new streams")
        saved = read_json(path)
        origin = int(saved["origin"])
        states = {int(k): v for k, v in saved["states"].items()}
    dataset = StreamBatches(source, augment=augment, tokenizer=tokenizer, seed=cfg.seed, origin=origin,
                            rank=env.rank, world_size=env.world_size, streams=_streams(cfg), start=start,
                            steps=cfg.steps, batch_size_at=cfg.batch_size_at, buffer=cfg.shuffle_buffer,
                            initial=cfg.shuffle_initial, states=states)
    return _Data(dataset, dict(source.info), dict(states), origin)


def _train(pool: Pool, out: Path, cfg: TrainConfig, subset: str | Path | None, identity: dict[str, Any],
           env: LaunchEnv, dev: torch.device, dist: _Distributed, model: torch.nn.Module, train_tf: Callable,
           tokenizer: Callable, fresh_stream: bool) -> TrainResult:
    from tqdm.auto import tqdm

    from datafilter.models import read_checkpoint, save_checkpoint
    from datafilter.train.transforms import make_augment

    ckpt_dir = out / "checkpoints"
    latest = ckpt_dir / "latest.pt"
    start = 0
    if latest.exists():
        state, meta = read_checkpoint(latest, cfg.model)
        start = int(meta["step"])
        model.load_state_dict(state)

    def write_run_file() -> None:
        if dist.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if not (out / RUN_FILE).exists():
                write_json(out / RUN_FILE, {**identity, "pool": str(pool.path),
                                            "subset": str(subset) if subset else None})
        dist.barrier()

    augment = make_augment(cfg.augment, model, train_tf, cfg)
    if cfg.data == "memory":
        data = _memory_data(pool, cfg, subset, env, dist, augment, tokenizer, write_run_file)
    else:
        data = _stream_data(pool, out, cfg, subset, identity, env, dist, augment, tokenizer, start, fresh_stream,
                            write_run_file)
    log.info("training %s on %s of %s (%s path) for %d samples (%d steps of %d)", cfg.model,
             f"{data.info['found']:,} subset entries" if subset else "every sample", pool.path, cfg.data,
             cfg.samples_seen, cfg.steps, cfg.batch_size)

    stepper = Stepper.build(model, cfg, dev, env)
    optimizer, scaler = stepper.optimizer, stepper.scaler
    if start:
        opt_state = torch.load(ckpt_dir / f"optim-{start:08d}.pt", map_location=dev, weights_only=True)
        optimizer.load_state_dict(opt_state["optimizer"])
        if scaler is not None and opt_state.get("scaler"):
            scaler.load_state_dict(opt_state["scaler"])
        log.info("resuming %s from step %d of %d", out, start, cfg.steps)
    if dist.is_main:  # lines logged after the last checkpoint (or before the first) are logged again
        _truncate_metrics(out / METRICS_FILE, start)

    if cfg.data == "memory":
        loader = torch.utils.data.DataLoader(data.dataset, batch_size=None, sampler=range(start, cfg.steps),
                                             num_workers=cfg.workers, collate_fn=_identity,
                                             prefetch_factor=4 if cfg.workers else None, pin_memory=dev.type == "cuda")
    else:
        loader = torch.utils.data.DataLoader(data.dataset, batch_size=None, num_workers=cfg.workers,
                                             collate_fn=_identity, prefetch_factor=2 if cfg.workers else None,
                                             pin_memory=dev.type == "cuda")
    stream_states = data.stream_states
    layout = {"world_size": env.world_size, "streams": _streams(cfg)}

    def save_state(step: int) -> None:
        """Stream positions and optimiser state first, then the model checkpoint naming their step; then old ones go."""
        from datafilter.train.stream import stream_file

        if stream_states is not None:
            with atomic_path(stream_file(ckpt_dir, step, env.rank)) as tmp:
                tmp.write_text(json.dumps({"step": step, "layout": layout, "origin": data.origin,
                                           "states": stream_states}))
        dist.barrier()
        if dist.is_main:
            opt_path = ckpt_dir / f"optim-{step:08d}.pt"
            with atomic_path(opt_path) as tmp:
                torch.save({"step": step, "optimizer": optimizer.state_dict(),
                            "scaler": scaler.state_dict() if scaler is not None else None}, tmp)
            save_checkpoint(model, cfg.model, latest, meta={"step": step})
            for old in [*ckpt_dir.glob("optim-*.pt"), *ckpt_dir.glob("stream-*.json")]:
                if not old.name.startswith((f"optim-{step:08d}", f"stream-{step:08d}-")):
                    old.unlink()
        dist.barrier()

    model.train()
    t0 = time.time()
    waited = 0.0  # seconds spent waiting for the loader (open_clip's data_time)
    ready = time.time()
    seen_here = 0
    loss_value = float("nan")
    # Only other ranks are silenced here, so that TQDM_DISABLE (set for runs side by side) still applies to rank 0.
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.model}", unit="step",
               **({} if dist.is_main else {"disable": True}))
    metrics = open(out / METRICS_FILE, "a") if dist.is_main else None
    try:
        for step, batch in zip(range(start, cfg.steps), loader):
            waited += time.time() - ready
            if batch.step != step:
                raise RuntimeError(f"the loader delivered step {batch.step} where step {step} was due")
            lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = stepper(batch.images, batch.tokens)
            if stream_states is not None:
                stream_states[batch.stream] = batch.state
            seen_here += cfg.batch_size_at(step)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                # Reading the loss waits for the device; open_clip does it only when it logs, and so does this.
                loss_value = dist.mean(loss)
                if not math.isfinite(loss_value):
                    raise RuntimeError(f"loss is {loss_value} at step {step}; lower the learning rate or use fp32")
                elapsed = time.time() - t0
                rate = seen_here / max(elapsed, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.3f}", samples_s=f"{rate:.0f}")
                if metrics is not None:
                    metrics.write(json.dumps({
                        "step": step, "samples_seen": min((step + 1) * cfg.batch_size, cfg.samples_seen),
                        "loss": loss_value, "lr": lr, "logit_scale": float(model.logit_scale.detach().exp()),
                        "samples_per_s": rate, "seconds": elapsed, "data_seconds": waited}) + "\n")
                    metrics.flush()
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                save_state(step + 1)
            ready = time.time()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    seconds = time.time() - t0
    stream_stats = _stream_stats(dist.gather(stream_states)) if stream_states is not None else None
    final = out / FINAL_CHECKPOINT
    summary: dict[str, Any] = {}
    if dist.is_main:
        save_checkpoint(model, cfg.model, final, meta={
            "step": cfg.steps, "samples_seen": cfg.samples_seen, "pool_id": pool.pool_id,
            "subset_sha256": identity["subset_sha256"], "recipe": cfg.recipe()})
        summary = {
            "identity": identity, "model": cfg.model, "config": cfg.to_json(), "pool": str(pool.path),
            "subset": str(subset) if subset is not None else None, "data": data.info,
            "steps": cfg.steps, "samples_seen": cfg.samples_seen, "final_loss": loss_value, "seconds": seconds,
            "world_size": env.world_size, "device": str(dev),
            "checkpoint": FINAL_CHECKPOINT, "checkpoint_sha256": sha256_file(final)}
        if "unique_rows" in data.info:
            summary["unique_rows"] = data.info["unique_rows"]
        if stream_stats is not None:
            summary["stream"] = stream_stats
        write_json(out / DONE_FILE, summary)
        log.info("trained %s: final loss %.4f, %s", cfg.model, loss_value, final)
    dist.barrier()
    if not summary:
        summary = read_json(out / DONE_FILE)
    return TrainResult.from_summary(out, summary)


def _stream_stats(per_rank: list[dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Counts over every stream of every rank: shards drawn, shards cut short, samples skipped by reason."""
    total: dict[str, int] = {"shard_draws": 0}
    for states in per_rank:
        for state in states.values():
            total["shard_draws"] += int(state.get("draws", 0))
            for reason, n in state.get("stats", {}).items():
                total[reason] = total.get(reason, 0) + int(n)
    cut = ("truncated_shard_reads", "mismatched_shard_reads")
    skipped = {k: v for k, v in total.items() if k != "shard_draws" and k not in cut}
    if skipped:
        log.warning("streamed samples skipped: %s", ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    if any(total.get(k) for k in cut):
        log.warning("shard reads cut short: %d by a truncated tar, %d by a tar that disagrees with its parquet",
                    total.get(cut[0], 0), total.get(cut[1], 0))
    return total


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
