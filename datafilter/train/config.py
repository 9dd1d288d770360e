"""The fixed training recipe: one frozen config per run, and the table of scales it is taken from.

DataComp fixes the model, the number of samples seen and the optimiser per scale, so that the only thing that differs
between two benchmark entries is the subset. ``TrainConfig.recipe()`` is that fixed part; the rest of the config
(worker counts, how often to checkpoint) changes how a run is executed, never what it computes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# Fields that change how a run executes but not its result; a resumed run may change them freely.
RUNTIME_FIELDS = ("workers", "decode_workers", "checkpoint_every", "log_every", "in_memory_max_bytes")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's result (plus a few execution knobs, see ``RUNTIME_FIELDS``)."""

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
    precision: str = "fp32"  # fp32 | bf16 (autocast) | amp (fp16 autocast with loss scaling, GPU only)
    # Caption templates with "{c}" for the caption; one is drawn per sample. Empty: the raw caption (DataComp).
    caption_templates: tuple[str, ...] = ()
    jitter_pad: int = 2  # pad-and-crop translation jitter, in pixels at the model's input size
    colour_jitter: float = 0.1  # brightness and contrast factors drawn from [1 - x, 1 + x]
    greyscale: float = 0.0  # probability of turning an image grey
    low_res: float = 0.0  # probability of shrinking an image to 8..S/2 pixels and blowing it up again
    # DDP options of open_clip's ClipLoss: gather features with their gradients, and compute only this rank's rows.
    gather_with_grad: bool = True
    local_loss: bool = False
    # Execution knobs (RUNTIME_FIELDS).
    workers: int = 0  # DataLoader workers; 0 decodes in the training process (right for in-memory images)
    decode_workers: int = 0  # processes decoding the pool into memory; 0: one per free core
    checkpoint_every: int = 100  # steps
    log_every: int = 10  # steps
    in_memory_max_bytes: int = 4 << 30  # decode the whole pool into memory once when its uint8 images fit in this

    def __post_init__(self) -> None:
        if self.samples_seen < 1 or self.batch_size < 1:
            raise ValueError("samples_seen and batch_size must be positive")
        if self.precision not in ("fp32", "bf16", "amp"):
            raise ValueError(f"precision must be fp32, bf16 or amp, not {self.precision!r}")
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
    caption_templates: tuple[str, ...] = ()

    def config(self, **overrides: Any) -> TrainConfig:
        base = TrainConfig(model=self.model, samples_seen=self.samples_seen, batch_size=self.batch_size, lr=self.lr,
                           warmup=self.warmup, beta2=self.beta2, caption_templates=self.caption_templates)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


SCALES: dict[str, Scale] = {s.name: s for s in (
    # DataComp's four scales (its paper, Table 2 and appendix); these need GPUs and the real pools.
    Scale("small", 12_800_000, "ViT-B-32", 12_800_000, 4096, 5e-4, 500),
    Scale("medium", 128_000_000, "ViT-B-32", 128_000_000, 4096, 5e-4, 500),
    Scale("large", 1_280_000_000, "ViT-B-16", 1_280_000_000, 8192, 5e-4, 500),
    Scale("xlarge", 12_800_000_000, "ViT-L-14", 12_800_000_000, 90112, 1e-3, 10000, beta2=0.95),
    # The project's CPU scales: the offline micro benchmark (about two minutes on two cores) and a seconds-long one
    # for tests and smoke runs.
    Scale("micro", 131_072, "datafilter-micro-vit", 131_072, 256, 2e-3, 50),
    Scale("nano", 4_096, "datafilter-nano-vit", 4_096, 64, 5e-3, 8),
)}


def scale_config(name: str, **overrides: Any) -> TrainConfig:
    """The recipe of scale ``name`` with ``overrides`` (``None`` values ignored) applied."""
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; known: {', '.join(SCALES)}")
    return SCALES[name].config(**overrides)
