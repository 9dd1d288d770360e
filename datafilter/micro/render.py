"""The render cache: every source image rasterised once, as square RGBA at a chosen size, keyed by source version.

Layout: ``$DATAFILTER_CACHE/render/<collection>-<version>-<size>-r<format>/pack-<hash>.npy`` (N x size x size x 4 uint8) with
``pack-<hash>.json`` beside it (the N keys in row order, and the keys that failed with why). A request renders only
the keys no pack has yet and adds one pack, so a small recipe renders little and a larger one later adds the rest.
Packs are opened memory-mapped, so many worker processes share one copy in the page cache.
A pack's ``.json`` is written after its ``.npy``: a killed render leaves at most an unindexed array, redone next time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import multiprocessing as mp
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from datafilter.common.files import atomic_path, cache_root, write_json

log = logging.getLogger(__name__)

CHUNK = 256  # renders per task handed to a worker
RENDER_FORMAT = 2  # bumped whenever the rasterisers change, so no stale render is reused


def render_root() -> Path:
    return cache_root() / "render"


# --- rasterisers ----------------------------------------------------------------------------------------------------
_UNITS = {"pt": 4 / 3, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0, "px": 1.0, "pc": 16.0, "": 1.0}
_SVG_TAG = re.compile(r"<svg\b[^>]*>", re.S)
_SIZE_ATTR = re.compile(r"\s(width|height)\s*=\s*[\"']\s*([0-9.eE+-]+)\s*(pt|mm|cm|in|px|pc|%|)\s*[\"']")


def _px_sizes(svg: str) -> str:
    """Rewrite the root's width/height in pixels (resvg rejects some unit forms old clip art uses); drop percents."""
    m = _SVG_TAG.search(svg)
    if m is None:
        return svg

    def rep(a: re.Match) -> str:
        if a.group(3) == "%":
            return ""
        return f' {a.group(1)}="{float(a.group(2)) * _UNITS[a.group(3)]:.3f}"'

    return svg[:m.start()] + _SIZE_ATTR.sub(rep, m.group(0)) + svg[m.end():]


def _letterbox(img: Image.Image, size: int) -> np.ndarray:
    """Fit inside size x size keeping the aspect ratio, centred on a transparent square (never stretched)."""
    img = img.convert("RGBA")
    w, h = img.size
    if (w, h) != (size, size):
        s = size / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
        canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
        img = canvas
    return np.asarray(img, dtype=np.uint8)


def _crop_to_content(img: Image.Image) -> Image.Image:
    """Clip art often sits small on a large page: cut the page down to what is drawn (with a 2% margin)."""
    img = img.convert("RGBA")
    box = img.getchannel("A").getbbox()
    if box is None:
        return img
    m = max(1, round(0.02 * max(img.size)))
    return img.crop((max(0, box[0] - m), max(0, box[1] - m), min(img.width, box[2] + m), min(img.height, box[3] + m)))


def render_svg(svg: str, size: int, crop: bool = False) -> np.ndarray:
    import resvg_py

    def draw(text: str, **kw) -> Image.Image:
        return Image.open(io.BytesIO(bytes(resvg_py.svg_to_bytes(svg_string=text, skip_system_fonts=True, **kw))))

    # Cropped drawings are rendered larger first, so the part that is kept still has enough pixels.
    target = size * 2 if crop else size
    try:
        img = draw(svg, width=target)
    except ValueError:
        svg = _px_sizes(svg)
        img = draw(svg, width=target)
    if img.height > target:
        img = draw(svg, height=target)
    arr = _letterbox(_crop_to_content(img) if crop else img, size)
    if arr[..., 3].max() == 0:
        raise ValueError("renders to nothing (fully transparent)")
    return arr


_FONTS: dict[tuple[str, int], ImageFont.FreeTypeFont] = {}


def render_glyph(font_path: str, char: str, size: int) -> np.ndarray:
    """Black glyph on transparent; a character the font lacks (drawn like an unassigned code point) is an error."""
    pt = size * 4
    key = (font_path, pt)
    if key not in _FONTS:
        _FONTS[key] = ImageFont.truetype(font_path, pt)
    font = _FONTS[key]

    def mask(c: str) -> np.ndarray:
        im = Image.new("L", (pt * 2, pt * 2), 0)
        ImageDraw.Draw(im).text((pt // 2, pt // 4), c, fill=255, font=font)
        return np.asarray(im)

    m = mask(char)
    if not m.any() or np.array_equal(m, mask("\U0010fffd")):
        raise ValueError(f"font has no glyph for U+{ord(char):04X}")
    ys, xs = np.nonzero(m)
    crop = Image.fromarray(m[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    rgba = Image.new("RGBA", crop.size, (0, 0, 0, 0))
    rgba.putalpha(crop)
    return _letterbox(rgba, size)


def render_ink(ink: np.ndarray, size: int) -> np.ndarray:
    """Digit pixels (ink in [0, 1]) as white ink whose alpha is the ink, so the digit can go on any background."""
    a = Image.fromarray(np.clip(ink * 255, 0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    out = np.full((size, size, 4), 255, np.uint8)
    out[..., 3] = np.asarray(a)
    return out


def rasterise(kind: str, payload, size: int) -> np.ndarray:
    if kind == "svg":
        return render_svg(payload, size)
    if kind == "svgfile":  # clip art and app icons: files drawn on pages of any size
        return render_svg(Path(payload).read_bytes().decode("utf-8", "replace"), size, crop=True)
    if kind == "glyph":
        font, char = payload.split("\0", 1)
        return render_glyph(font, char, size)
    if kind == "ink":
        return render_ink(payload, size)
    raise ValueError(f"unknown drawing kind {kind!r}")


def _render_chunk(args: tuple[list[tuple[str, str, object]], int]) -> tuple[list[str], np.ndarray, dict[str, str]]:
    items, size = args
    keys, arrs, failed = [], [], {}
    for key, kind, payload in items:
        try:
            arrs.append(rasterise(kind, payload, size))
            keys.append(key)
        except Exception as exc:  # a broken drawing is counted and skipped, whatever the renderer raised
            failed[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
    arr = np.stack(arrs) if arrs else np.zeros((0, size, size, 4), np.uint8)
    return keys, arr, failed


class MissingRender(KeyError):
    """The drawing is not in the render set (it failed to render, or was never asked for)."""


# --- the cache --------------------------------------------------------------------------------------------------------
@dataclass
class RenderSet:
    """All rendered images of one collection at one size: ``get(key)`` -> RGBA array, or KeyError."""

    directory: Path
    size: int
    index: dict[str, tuple[int, int]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    packs: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def open(cls, directory: Path, size: int) -> "RenderSet":
        rs = cls(directory, size)
        for meta in sorted(directory.glob("pack-*.json")):
            info = json.loads(meta.read_text())
            arr = np.load(meta.with_suffix(".npy"), mmap_mode="r")
            if arr.shape[0] != len(info["keys"]):
                raise RuntimeError(f"{meta}: {len(info['keys'])} keys but {arr.shape[0]} images; delete the pack")
            p = len(rs.packs)
            rs.packs.append(arr)
            for i, k in enumerate(info["keys"]):
                rs.index[k] = (p, i)
            rs.failed.update(info.get("failed", {}))
        return rs

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str) -> np.ndarray:
        if key not in self.index:
            raise MissingRender(f"{key} not rendered in {self.directory}"
                                + (f" ({self.failed[key]})" if key in self.failed else ""))
        p, i = self.index[key]
        return np.asarray(self.packs[p][i])


def render_dir(collection: str, version: str, size: int) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{collection}-{version}-{size}-r{RENDER_FORMAT}")
    return render_root() / safe


def ensure_rendered(collection: str, version: str, size: int, keys: Sequence[str],
                    drawing: Callable[[str], tuple[str, object]], workers: int = 2) -> RenderSet:
    """Render the keys not yet in the cache (in ``workers`` processes, with a progress bar) and open the set."""
    d = render_dir(collection, version, size)
    rs = RenderSet.open(d, size) if d.exists() else RenderSet(d, size)
    todo = sorted({k for k in keys if k not in rs.index and k not in rs.failed})
    if not todo:
        return rs
    d.mkdir(parents=True, exist_ok=True)
    items = [(k, *drawing(k)) for k in todo]
    chunks = [(items[i:i + CHUNK], size) for i in range(0, len(items), CHUNK)]
    results = []
    bar = tqdm(total=len(items), desc=f"render {collection}@{size}", unit="img")
    try:
        if workers > 1 and len(chunks) > 1:
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
                for r in ex.map(_render_chunk, chunks):
                    results.append(r)
                    bar.update(len(r[0]) + len(r[2]))
        else:
            for c in chunks:
                r = _render_chunk(c)
                results.append(r)
                bar.update(len(r[0]) + len(r[2]))
    finally:
        bar.close()
    keys_out = [k for r in results for k in r[0]]
    arr = np.concatenate([r[1] for r in results]) if results else np.zeros((0, size, size, 4), np.uint8)
    failed = {k: v for r in results for k, v in r[2].items()}
    name = "pack-" + hashlib.sha256("\n".join(todo).encode()).hexdigest()[:16]
    with atomic_path(d / f"{name}.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)
    write_json(d / f"{name}.json", {"keys": keys_out, "failed": failed})
    if failed:
        log.warning("render %s: %d of %d failed (skipped), e.g. %s: %s", collection, len(failed), len(todo),
                    *next(iter(failed.items())))
    return RenderSet.open(d, size)
