"""Turn stored image bytes into model input, in decoding workers, as cheaply as the model's own transform allows.

open_clip's evaluation transform is ``Resize -> CenterCrop -> convert RGB -> ToTensor -> Normalize``. Everything up to
``ToTensor`` works on PIL images and is done here, per image, in the decoding workers; the result is a ``uint8`` array
of the model's input size. ``ToTensor`` + ``Normalize`` are elementwise, so they run once per batch on the model's
device (``normalise_batch``), where they are cheap, and batches travel between processes at a quarter of the float32
size. The result is bit for bit what the full transform gives (``tests/test_embed.py`` checks it).

Images already stored at the model's input size skip the PIL steps entirely (Pillow would return a copy anyway).
A transform that does not have this shape is applied whole in the worker instead, and batches carry float tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torchvision import transforms as T

from datafilter.pool.images import SkipSample, open_image, to_rgb


@dataclass(frozen=True)
class SplitTransform:
    """The PIL part of an evaluation transform and the normalisation that follows ``ToTensor``."""

    pil_steps: tuple[Callable, ...]
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    skip_when_sized: bool  # the PIL steps are only resize / crop / RGB conversion: a no-op at the input size


def split_transform(transform: Callable, image_size: int) -> SplitTransform | None:
    """Split ``Compose([...PIL steps, ToTensor, Normalize])``; None when the transform has another shape."""
    steps = list(getattr(transform, "transforms", []))
    to_tensor = [i for i, t in enumerate(steps) if isinstance(t, T.ToTensor)]
    if len(to_tensor) != 1:
        return None
    i = to_tensor[0]
    tail = steps[i + 1 :]
    if len(tail) != 1 or not isinstance(tail[0], T.Normalize):
        return None
    norm = tail[0]
    mean, std = tuple(float(x) for x in norm.mean), tuple(float(x) for x in norm.std)
    if len(mean) != 3 or len(std) != 3:
        return None
    pil_steps = tuple(steps[:i])
    simple = all(_is_geometry_or_mode(t, image_size) for t in pil_steps)
    return SplitTransform(pil_steps, image_size, mean, std, simple)


def _is_geometry_or_mode(step: Callable, size: int) -> bool:
    if isinstance(step, T.Resize):
        s = step.size
        return (isinstance(s, int) and s == size) or (isinstance(s, (list, tuple)) and tuple(s) in ((size,), (size, size)))
    if isinstance(step, T.CenterCrop):
        return tuple(step.size) == (size, size)
    # open_clip's RGB conversion (a class in recent versions, a function in older ones)
    return type(step).__name__ == "MaybeConvertMode" or getattr(step, "__name__", "") == "_convert_to_rgb"


class ImageDecoder:
    """Bytes -> model input for one image; raises ``SkipSample`` with a reason for images that cannot be used.

    ``uint8`` mode (the transform could be split) returns ``[size, size, 3]`` uint8 arrays; otherwise float tensors
    ``[3, H, W]`` from the whole transform. ``rgb`` converts a decoded image that is not RGB before the transform
    (default: transparency flattened onto white); ``None`` leaves that to the transform, as a Hugging Face dataset
    feeds open_clip.
    """

    def __init__(self, transform: Callable, image_size: int, rgb: Callable | None = to_rgb):
        self.transform = transform
        self.split = split_transform(transform, image_size)
        self.rgb = rgb

    @property
    def uint8(self) -> bool:
        return self.split is not None

    def __call__(self, data: bytes) -> np.ndarray | torch.Tensor:
        img = open_image(data)
        if img.mode != "RGB" and self.rgb is not None:
            img = self.rgb(img)
        if self.split is None:
            return self._whole(img)
        sp = self.split
        if not (sp.skip_when_sized and img.size == (sp.size, sp.size)):
            try:
                for step in sp.pil_steps:
                    img = step(img)
            except (OSError, ValueError) as exc:
                raise SkipSample("transform_failed", str(exc)) from None
            if img.mode != "RGB":
                img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
        if arr.shape != (sp.size, sp.size, 3):
            raise SkipSample("transform_failed", f"transform gave shape {arr.shape}, expected ({sp.size}, {sp.size}, 3)")
        return arr

    def _whole(self, img) -> torch.Tensor:
        try:
            out = self.transform(img)
        except (OSError, ValueError) as exc:
            raise SkipSample("transform_failed", str(exc)) from None
        return out

    def stack(self, items: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """One batch tensor from decoded images (an empty batch keeps the right shape)."""
        if self.split is not None:
            s = self.split.size
            if not items:
                return torch.empty((0, s, s, 3), dtype=torch.uint8)
            return torch.from_numpy(np.stack(items))
        if not items:
            return torch.empty((0, 3, 1, 1))
        return torch.stack(items)

    def normaliser(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """The batched tail of the transform, on ``device``: uint8 NHWC -> normalised float NCHW."""
        if self.split is None:
            return lambda x: x.to(device, non_blocking=True)
        mean = torch.tensor(self.split.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.split.std, device=device).view(1, 3, 1, 1)

        def normalise_batch(x: torch.Tensor) -> torch.Tensor:
            # The same operations, in the same order and precision, as ToTensor followed by Normalize (in place on
            # the float copy: a fifth less time than fresh tensors on a CPU).
            return x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)

        return normalise_batch
