"""Training augmentations, one per name: DataComp's (open_clip's own train transform) and the CPU scales' own.

  * ``open_clip``: exactly what DataComp trains with. Each image is decoded the way webdataset's ``pilrgb``
    decoder does (PIL, ``convert("RGB")``) and passed through the model's open_clip train transform
    (``RandomResizedCrop(scale=(0.9, 1.0))``, bicubic, the model's mean and std), i.e. the ``preprocess_train``
    that ``open_clip.create_model_and_transforms`` returns and open_clip's trainer applies. Needs the original
    images, so it trains from shards streamed from disk.
  * ``jitter``: the CPU scales' augmentation for images decoded once at the model's tiny input size (an eval-style
    resize and centre crop): a pad-and-crop shift, brightness / contrast factors, optional grey and low-resolution
    copies and caption templates, all applied to a whole batch tensor at once (cheap enough for 32-pixel icons,
    where a per-sample PIL pipeline would cost more than the model).

Both are picklable, so DataLoader workers run them. Their random draws come from a seed the caller passes per
batch, so a batch is a pure function of its inputs (what makes resume and multi-process runs exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from datafilter.models import input_size
from datafilter.pool.images import open_image, to_rgb
from datafilter.train.config import AUGMENTS


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Bytes -> ``uint8 [size, size, 3]``: short side to ``size`` (bicubic), centre crop, as open_clip evaluates."""
    img = to_rgb(open_image(data))
    w, h = img.size
    if (w, h) != (size, size):
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        img = img.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


# --- jitter ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Jitter:
    """Per-sample augmentation draws for a whole batch (so any split of it across ranks sees the same ones)."""

    oy: torch.Tensor  # [n] crop offsets in 0..2*pad
    ox: torch.Tensor
    contrast: torch.Tensor  # [n] factors in [1 - colour, 1 + colour]
    bright: torch.Tensor
    template: torch.Tensor  # [n] caption template index
    grey: torch.Tensor  # [n] bool: convert to greyscale
    low_res: torch.Tensor  # [n] side to shrink to and blow up from; 0: keep the resolution

    @classmethod
    def draw(cls, gen: torch.Generator, n: int, pad: int, colour: float, templates: int, greyscale: float = 0.0,
             low_res: float = 0.0, low_res_min: int = 8, size: int = 32) -> "Jitter":
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        contrast = 1 + (torch.rand(n, generator=gen) * 2 - 1) * colour
        bright = 1 + (torch.rand(n, generator=gen) * 2 - 1) * colour
        template = torch.randint(0, max(templates, 1), (n,), generator=gen)
        # Drawn after the others, so recipes without these augmentations keep their exact random stream.
        grey = torch.rand(n, generator=gen) < greyscale if greyscale > 0 else torch.zeros(n, dtype=torch.bool)
        if low_res > 0:
            sides = torch.randint(low_res_min, max(low_res_min, size // 2) + 1, (n,), generator=gen)
            low = torch.where(torch.rand(n, generator=gen) < low_res, sides, torch.zeros_like(sides))
        else:
            low = torch.zeros(n, dtype=torch.long)
        return cls(oy, ox, contrast, bright, template, grey, low)

    def __getitem__(self, sl: slice) -> "Jitter":
        return Jitter(self.oy[sl], self.ox[sl], self.contrast[sl], self.bright[sl], self.template[sl],
                      self.grey[sl], self.low_res[sl])


def augment(images: torch.Tensor, jitter: Jitter, pad: int) -> torch.Tensor:
    """``uint8 [n, S, S, 3]`` -> float ``[n, 3, S, S]`` in [0, 1], shifted and colour-jittered per sample.

    Pad-and-crop shifts each image by up to ``pad`` pixels (edge pixels repeated, so a white icon background stays
    white); the chosen images are shrunk and blown up again (low resolution) or turned grey; contrast and brightness
    are scaled by the drawn factors.
    """
    x = images.permute(0, 3, 1, 2).float().div_(255)
    n, _, s, _ = x.shape
    if n == 0:
        return x
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
        x = torch.empty(x.shape)  # contiguous NCHW: the sums below add in that order whatever the input layout
        for oy, ox in torch.unique(torch.stack([jitter.oy, jitter.ox], 1), dim=0).tolist():  # at most (2 pad + 1)²
            idx = torch.nonzero((jitter.oy == oy) & (jitter.ox == ox)).flatten()
            x[idx] = padded[idx, :, oy : oy + s, ox : ox + s]
    for side in torch.unique(jitter.low_res[jitter.low_res > 0]).tolist():
        idx = torch.nonzero(jitter.low_res == side).flatten()
        small = torch.nn.functional.interpolate(x[idx], size=(side, side), mode="area")
        x[idx] = torch.nn.functional.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)
    if jitter.grey.any():
        luma = (x[jitter.grey] * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        x[jitter.grey] = luma.expand(-1, 3, -1, -1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast, bright = jitter.contrast.view(n, 1, 1, 1), jitter.bright.view(n, 1, 1, 1)
    return (((x - mean) * contrast + mean) * bright).clamp_(0, 1)


class JitterAugment:
    """The CPU scales' augmentation (see the module docstring); ``pixels`` are ``uint8 [n, S, S, 3]``."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], *, pad: int, colour: float,
                 templates: Sequence[str] = (), greyscale: float = 0.0, low_res: float = 0.0):
        self.size, self.pad, self.colour = size, pad, colour
        self.templates = tuple(templates)
        self.greyscale, self.low_res = greyscale, low_res
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def decode(self, data: bytes) -> np.ndarray:
        return decode_image(data, self.size)

    def draw(self, seed: int, n: int) -> Jitter:
        return Jitter.draw(torch.Generator().manual_seed(seed), n, self.pad, self.colour, len(self.templates),
                           self.greyscale, self.low_res, size=self.size)

    def apply(self, pixels: np.ndarray, jitter: Jitter, captions: list[str]) -> tuple[torch.Tensor, list[str]]:
        x = augment(torch.from_numpy(np.ascontiguousarray(pixels)), jitter, self.pad)
        if self.templates:
            captions = [self.templates[p].replace("{c}", c) for p, c in zip(jitter.template.tolist(), captions)]
        return (x - self.mean) / self.std, captions

    def batch(self, decoded: list[np.ndarray], captions: list[str], seed: int) -> tuple[torch.Tensor, list[str]]:
        pixels = np.stack(decoded) if decoded else np.zeros((0, self.size, self.size, 3), np.uint8)
        return self.apply(pixels, self.draw(seed, len(decoded)), captions)


# --- open_clip -------------------------------------------------------------------------------------------------------
def decode_rgb(data: bytes) -> Image.Image:
    """Decode as webdataset's ``pilrgb`` does (``convert("RGB")``), with the pool's checks on broken images."""
    return open_image(data).convert("RGB")


class OpenClipAugment:
    """open_clip's train transform, applied per sample in PIL, with torch's random draws seeded per batch."""

    def __init__(self, train_transform: Callable[[Image.Image], torch.Tensor]):
        self.transform = train_transform

    def decode(self, data: bytes) -> Image.Image:
        return decode_rgb(data)

    def batch(self, decoded: list[Image.Image], captions: list[str], seed: int) -> tuple[torch.Tensor, list[str]]:
        # RandomResizedCrop draws from torch's global generator, as in open_clip's loader workers; forking it keeps
        # the caller's stream untouched when this runs in the training process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            images = [self.transform(img) for img in decoded]
        return torch.stack(images) if images else torch.zeros(0), captions


def make_augment(kind: str, model: torch.nn.Module, train_transform: Callable, cfg: Any) -> JitterAugment | OpenClipAugment:
    """The augmentation ``kind`` for ``model`` with the recipe's parameters (``cfg`` is a ``TrainConfig``)."""
    if kind == "open_clip":
        return OpenClipAugment(train_transform)
    if kind == "jitter":
        visual = model.visual
        return JitterAugment(input_size(model), visual.image_mean, visual.image_std, pad=cfg.jitter_pad,
                             colour=cfg.colour_jitter, templates=cfg.caption_templates, greyscale=cfg.greyscale,
                             low_res=cfg.low_res)
    raise ValueError(f"unknown augmentation {kind!r}; known: {', '.join(AUGMENTS)}")
