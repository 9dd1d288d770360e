"""Turn rendered artwork into the small RGB images stored in pools and suites.

An image is described by a short tuple (a "spec") that names the artwork and a seed, so a plan of 128k samples is
cheap to make, to hand to worker processes, and always yields the same pixels:
  ("art", collection, key, seed)           one drawing, randomly placed (seed < 0: centred, the suite's view)
  ("tint", collection, key, colour, seed)  an icon drawn in a named colour
  ("count", collection, key, n, seed)      n copies of a drawing
  ("pos", collection, key, cell, seed)     one drawing in one of nine places
  ("size", collection, key, large, seed)   one drawing, small or large
  ("spam", collection, key, seed)          a near-identical copy of a drawing (pixel-level jitter only)
  ("blank", seed) / ("static", seed)       a plain colour / random noise
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from datafilter.micro.recipe import Augment

INK_COLLECTIONS = ("mnist", "sklearn-digits")  # white ink drawn on black, as the digits come

COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (230, 200, 0), "green": (40, 160, 60),
    "blue": (40, 80, 220), "purple": (140, 60, 190), "pink": (240, 110, 180), "brown": (130, 80, 40),
}
COUNT_WORDS = ("one", "two", "three", "four", "five")
CELLS = ("top left corner", "top", "top right corner", "left", "centre", "right", "bottom left corner", "bottom",
         "bottom right corner")
SIZES = ("small", "large")


class Composer:
    """Makes images from specs, given the opened render sets and the output size."""

    def __init__(self, renders: dict, size: int, augment: Augment | None = None):
        self.renders = renders
        self.size = size
        self.augment = augment or Augment()

    def rgba(self, collection: str, key: str) -> Image.Image:
        return Image.fromarray(self.renders[collection].get(key), "RGBA")

    def _background(self, collection: str, rng: np.random.Generator | None) -> tuple[int, int, int]:
        if collection in INK_COLLECTIONS:
            return (0, 0, 0)
        if rng is not None and rng.random() < self.augment.coloured_background:
            return tuple(int(v) for v in rng.integers(0, 256, 3))
        return (255, 255, 255)

    def _paste(self, canvas: Image.Image, art: Image.Image, side: int, cx: float, cy: float, angle: float = 0.0):
        side = max(2, int(round(side)))
        im = art.resize((side, side), Image.Resampling.BILINEAR)
        if angle:
            im = im.rotate(angle, resample=Image.Resampling.BILINEAR)
        canvas.paste(im, (int(round(cx - side / 2)), int(round(cy - side / 2))), im)

    def make(self, spec: tuple) -> Image.Image:
        kind = spec[0]
        s = self.size
        if kind == "blank":
            rng = np.random.default_rng(spec[1])
            return Image.new("RGB", (s, s), tuple(int(v) for v in rng.integers(0, 256, 3)))
        if kind == "static":
            rng = np.random.default_rng(spec[1])
            arr = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
            if rng.random() < 0.5:  # smooth noise as often as pixel noise
                small = Image.fromarray(arr[: s // 8 + 1, : s // 8 + 1])
                return small.resize((s, s), Image.Resampling.BICUBIC)
            return Image.fromarray(arr)
        collection, key = spec[1], spec[2]
        seed = spec[-1]
        rng = np.random.default_rng(seed) if seed >= 0 else None
        art = self.rgba(collection, key)
        canvas = Image.new("RGB", (s, s), self._background(collection, rng))
        if kind == "tint":
            colour = COLOURS[spec[3]]
            tinted = Image.new("RGBA", art.size, colour + (255,))
            tinted.putalpha(art.getchannel("A"))
            art = tinted
            kind = "art"
        if kind == "art":
            if rng is None:
                self._paste(canvas, art, s * 0.9, s / 2, s / 2)
            else:
                a = self.augment
                side = s * rng.uniform(*a.scale)
                cx = s / 2 + rng.uniform(-a.shift, a.shift) * s
                cy = s / 2 + rng.uniform(-a.shift, a.shift) * s
                self._paste(canvas, art, side, cx, cy, rng.uniform(-a.rotate, a.rotate))
        elif kind == "spam":
            # Spam repeats one picture; copies differ by a pixel of shift and slight colour noise only.
            self._paste(canvas, art, s * 0.9, s / 2 + rng.integers(-1, 2), s / 2 + rng.integers(-1, 2))
            arr = np.asarray(canvas).astype(np.int16) + rng.integers(-6, 7, (s, s, 3))
            canvas = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        elif kind == "count":
            n = spec[3]
            cells = (rng or np.random.default_rng(0)).permutation(9)[:n]
            for c in cells:
                r, q = divmod(int(c), 3)
                self._paste(canvas, art, s * 0.3, s * (q + 0.5) / 3, s * (r + 0.5) / 3)
        elif kind == "pos":
            r, q = divmod(spec[3], 3)
            jit = rng.uniform(-0.04, 0.04, 2) * s if rng is not None else (0.0, 0.0)
            self._paste(canvas, art, s * 0.36, s * (0.2 + 0.3 * q) + jit[0], s * (0.2 + 0.3 * r) + jit[1])
        elif kind == "size":
            large = spec[3]
            lo, hi = (0.8, 1.0) if large else (0.3, 0.45)
            side = s * (rng.uniform(lo, hi) if rng is not None else (lo + hi) / 2)
            jit = rng.uniform(-0.05, 0.05, 2) * s if rng is not None else (0.0, 0.0)
            self._paste(canvas, art, side, s / 2 + jit[0], s / 2 + jit[1])
        else:
            raise ValueError(f"unknown image spec {spec!r}")
        return canvas


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
