"""The fixed training recipe: one frozen config per run, and the table of scales it is taken from.

DataComp fixes the model, the number of samples seen and the optimiser per scale, so that the only thing that differs
between two benchmark entries is the subset. ``TrainConfig.recipe()`` is that fixed part; the rest of the config
(worker counts, how often to checkpoint) changes how a run is executed, not what it computes, except that a streamed
run's sample order depends on its number of ranks and loader workers, as open_clip's does (a resume checks them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# Fields that change how a run executes but not its result; a resumed run may change them (a streamed run's workers
# only with fresh streams, see datafilter.train.stream).
RUNTIME_FIELDS = ("workers", "decode_workers", "checkpoint_every", "log_every", "in_memory_max_bytes",
                  "grad_checkpointing")

# open_clip's precision names (``--precision``): amp autocasts to fp16 with loss scaling, amp_bf16 autocasts to bf16,
# bf16 and fp16 run the weights themselves in that type. ``auto``: amp on a GPU, fp32 on CPU (DataComp trains with amp).
PRECISIONS = ("auto", "fp32", "amp", "amp_bf16", "bf16", "fp16")
PRECISION_ALIASES = {"amp_bfloat16": "amp_bf16"}
# How samples reach the model: decoded once into memory and drawn per step (small pools), or streamed from the shards
# as open_clip's resampled webdataset loader does (DataComp's scales, pools too large for memory). ``auto``: memory
# when the decoded pool fits in ``in_memory_max_bytes`` and the augmentation allows it, else stream.
DATA_PATHS = ("auto", "memory", "stream")
# Training augmentations (``datafilter.train.transforms``): the CPU scales' own, and open_clip's train transform.
AUGMENTS = ("jitter", "open_clip")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's result (plus a few execution knobs, see ``RUNTIME_FIELDS``).

    ``precision`` and ``data`` may be ``auto``; a run resolves them (``resolved``) before anything is recorded, so a
    run directory always names the concrete choice.
    """

    model: str = "datafilter-micro-vit"
    samples_seen: int = 131_072
    batch_size: int = 256  # global batch: split across ranks under DDP
    lr: float = 2e-3
    warmup: int = 50  # steps of linear warm-up before the cosine decay
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    seed: int = 0
    precision: str = "auto"
    augment: str = "jitter"  # jitter (the CPU scales') | open_clip (open_clip's train transform, DataComp's)
    # jitter's parameters. Caption templates with "{c}" for the caption; one is drawn per sample. Empty: the raw
    # caption (DataComp).
    caption_templates: tuple[str, ...] = ()
    jitter_pad: int = 2  # pad-and-crop translation jitter, in pixels at the model's input size
    colour_jitter: float = 0.1  # brightness and contrast factors drawn from [1 - x, 1 + x]
    greyscale: float = 0.0  # probability of turning an image grey
    low_res: float = 0.0  # probability of shrinking an image to 8..S/2 pixels and blowing it up again
    # open_clip's ClipLoss options, as DataComp trains: gather features with their gradients, and compute only this
    # rank's rows of the logit matrix (same gradients, 1/world_size of the memory).
    gather_with_grad: bool = True
    local_loss: bool = True
    data: str = "auto"
    # The streamed path's shuffle buffer (open_clip's sample shuffle: 5,000 samples, 1,000 before the first batch).
    shuffle_buffer: int = 5000
    shuffle_initial: int = 1000
    # Execution knobs (RUNTIME_FIELDS).
    # DataLoader workers. A streamed run cuts its batches from one stream per worker, so like the number of ranks
    # this decides its sample order (see datafilter.train.stream); a resume checks both.
    workers: int = 0
    decode_workers: int = 0  # processes decoding the pool into memory; 0: one per free core
    checkpoint_every: int = 100  # steps
    log_every: int = 10  # steps
    in_memory_max_bytes: int = 4 << 30  # decode the whole pool into memory once when its uint8 images fit in this
    grad_checkpointing: bool = False  # recompute activations in the backward pass (less memory; same result)

    def __post_init__(self) -> None:
        if self.samples_seen < 1 or self.batch_size < 1:
            raise ValueError("samples_seen and batch_size must be positive")
        if self.precision in PRECISION_ALIASES:
            object.__setattr__(self, "precision", PRECISION_ALIASES[self.precision])
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (open_clip's names), "
                             f"not {self.precision!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, not {self.augment!r}")
        if self.data not in DATA_PATHS:
            raise ValueError(f"data must be one of {', '.join(DATA_PATHS)}, not {self.data!r}")
        if self.augment == "open_clip" and self.data == "memory":
            raise ValueError("augment 'open_clip' crops the original images, which the in-memory path does not keep "
                             "(it holds them decoded at the model's size); use data 'stream'")
        if self.shuffle_buffer < 1 or not 1 <= self.shuffle_initial <= self.shuffle_buffer:
            raise ValueError("shuffle_buffer must be >= 1 and shuffle_initial in 1..shuffle_buffer")
        if self.workers < 0:
            raise ValueError("workers must be >= 0")
        if self.warmup < 0 or self.lr <= 0:
            raise ValueError("warmup must be >= 0 and lr > 0")
        for t in self.caption_templates:
            if "{c}" not in t:
                raise ValueError(f"caption template {t!r} has no '{{c}}' for the caption")
        if self.jitter_pad < 0 or not 0 <= self.colour_jitter < 1:
            raise ValueError("jitter_pad must be >= 0 and colour_jitter in [0, 1)")
        if not (0 <= self.greyscale <= 1 and 0 <= self.low_res <= 1):
            raise ValueError("greyscale and low_res are probabilities in [0, 1]")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be positive")

    @property
    def steps(self) -> int:
        """Optimiser steps; the last batch is smaller when ``samples_seen`` is not a multiple of the batch size."""
        return -(-self.samples_seen // self.batch_size)

    def batch_size_at(self, step: int) -> int:
        return min(self.batch_size, self.samples_seen - step * self.batch_size)

    def resolved(self, device_type: str, decoded_bytes: int) -> "TrainConfig":
        """``auto`` precision and data path made concrete for a run on ``device_type`` over a pool whose images
        decoded at the model's size would take ``decoded_bytes``."""
        precision = self.precision
        if precision == "auto":
            precision = "amp" if device_type == "cuda" else "fp32"
        data = self.data
        if data == "auto":
            data = "memory" if self.augment == "jitter" and decoded_bytes <= self.in_memory_max_bytes else "stream"
        return replace(self, precision=precision, data=data)

    def recipe(self) -> dict[str, Any]:
        """The fields that decide the result; two runs with equal recipes on equal data give equal weights."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RUNTIME_FIELDS}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["caption_templates"] = list(self.caption_templates)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training config fields: {', '.join(sorted(unknown))}")
        d = dict(d)
        if "caption_templates" in d:
            d["caption_templates"] = tuple(d["caption_templates"])
        return cls(**d)


@dataclass(frozen=True)
class Scale:
    """One row of the scale table: DataComp's (pool size = samples seen) or one of the project's CPU scales."""

    name: str
    pool_size: int
    model: str
    samples_seen: int
    batch_size: int
    lr: float
    warmup: int
    beta2: float = 0.98
    augment: str = "jitter"
    data: str = "auto"
    grad_checkpointing: bool = False
    workers: int = 0

    def config(self, **overrides: Any) -> TrainConfig:
        base = TrainConfig(model=self.model, samples_seen=self.samples_seen, batch_size=self.batch_size, lr=self.lr,
                           warmup=self.warmup, beta2=self.beta2, augment=self.augment, data=self.data,
                           grad_checkpointing=self.grad_checkpointing, workers=self.workers)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


# DataComp's scales train as its train.py calls open_clip: open_clip's train transform, shards streamed with
# resampling, amp on a GPU (precision auto), local loss with gathered gradients, gradient checkpointing, 4 loader
# workers per GPU (train.py's defaults).
_DATACOMP = dict(augment="open_clip", data="stream", grad_checkpointing=True, workers=4)
SCALES: dict[str, Scale] = {s.name: s for s in (
    # DataComp's four scales (scale_configs.py); these need GPUs and the real pools.
    Scale("small", 12_800_000, "ViT-B-32", 12_800_000, 4096, 5e-4, 500, **_DATACOMP),
    Scale("medium", 128_000_000, "ViT-B-32", 128_000_000, 4096, 5e-4, 500, **_DATACOMP),
    Scale("large", 1_280_000_000, "ViT-B-16", 1_280_000_000, 8192, 5e-4, 500, **_DATACOMP),
    Scale("xlarge", 12_800_000_000, "ViT-L-14", 12_800_000_000, 90112, 1e-3, 10000, beta2=0.95, **_DATACOMP),
    # The project's CPU scales: the offline micro benchmark and a seconds-long one for tests and smoke runs. Micro
    # keeps DataComp's rule that samples seen equal the pool size (its pool has 128k samples) and trains the
    # smallest project model, as DataComp's smallest scale trains its smallest (ViT-B/32): at the same compute,
    # datafilter-micro-vit for half the samples gave every filter a smaller lead over no filtering (one seed:
    # CLIP score 30% +2.9 points against +3.6, image-based ∩ CLIP score +1.3 against +2.4).
    Scale("micro", 131_072, "datafilter-nano-vit", 131_072, 256, 2e-3, 50),
    # nano's batch, learning rate and budget are what lets it leave chance on the nano pool: at batch 64 and lr 5e-3
    # the embeddings collapsed (loss ln 64 to the end), 64 steps at a lower rate barely moved, and 128 steps of 32
    # ended 0.08 below ln 32 on one nano pool and 0.29 on another; 256 steps end 0.35 below.
    Scale("nano", 8_192, "datafilter-nano-vit", 8_192, 32, 2e-3, 4),
)}


def scale_config(name: str, **overrides: Any) -> TrainConfig:
    """The recipe of scale ``name`` with ``overrides`` (``None`` values ignored) applied."""
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; known: {', '.join(SCALES)}")
    return SCALES[name].config(**overrides)
