"""Contact sheets: a grid of samples with their captions (and, for a built pool, the hidden noise label), so a person
can see what a pool or an evaluation set looks like."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

TILE = 96  # image side in the sheet (samples are upscaled, pixelated on purpose)
TEXT_H = 44
COLS = 8
NOISE_COLOURS = {"clean": (30, 140, 60), "mismatched_caption": (200, 40, 40), "boilerplate_caption": (200, 120, 0),
                 "near_duplicate_spam": (150, 40, 170), "off_topic_image": (60, 60, 200),
                 "non_english_caption": (0, 130, 150)}


def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu where the system has it (accents, Cyrillic, Greek in captions), else Pillow's own font."""
    try:
        return ImageFont.truetype("DejaVuSansCondensed.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def grid_size(n: int, cols: int = COLS) -> tuple[int, int]:
    """(width, height) in pixels of a sheet with ``n`` tiles."""
    rows = max(1, (n + cols - 1) // cols)
    return max(1, min(n, cols)) * (TILE + 4) + 4, rows * (TILE + TEXT_H + 4) + 4


def contact_sheet(tiles: list[tuple[bytes | np.ndarray, str, str]], title: str = "", cols: int = COLS) -> Image.Image:
    """``tiles``: (image bytes or array, caption, label) -> a sheet; the PNG text chunk "tiles" records the count."""
    w, h = grid_size(len(tiles), cols)
    sheet = Image.new("RGB", (w, h), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    font = _font(10)
    for i, (img, caption, label) in enumerate(tiles):
        r, c = divmod(i, cols)
        x, y = 4 + c * (TILE + 4), 4 + r * (TILE + TEXT_H + 4)
        im = Image.open(io.BytesIO(img)) if isinstance(img, bytes) else Image.fromarray(img)
        sheet.paste(im.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST), (x, y))
        colour = NOISE_COLOURS.get(label, (60, 60, 60))
        if label:
            draw.text((x, y + TILE + 1), label[:18], fill=colour, font=font)
        lines = textwrap.wrap(caption.replace("\n", " | "), 18)[: 3 if label else 4]
        draw.multiline_text((x, y + TILE + (12 if label else 1)), "\n".join(lines), fill=(0, 0, 0), font=font,
                            spacing=0)
    sheet.info["tiles"] = str(len(tiles))
    sheet.info["title"] = title
    return sheet


def save_sheet(sheet: Image.Image, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = PngInfo()
    for k in ("tiles", "title"):
        meta.add_text(k, sheet.info.get(k, ""))
    sheet.save(out, format="PNG", pnginfo=meta)
    return out


def pool_sheet(pool_dir: str | Path, n: int = 48, seed: int = 0) -> Image.Image:
    """``n`` random samples of a pool with captions; noise labels come from the ground truth when there is one."""
    import pyarrow.parquet as pq

    from datafilter.pool import Pool

    pool = Pool(pool_dir)
    rng = np.random.default_rng(seed)
    rows = set(int(i) for i in rng.permutation(pool.num_samples)[: min(n, pool.num_samples)])
    gt_path = Path(pool_dir) / "ground_truth.parquet"
    noise = {}
    if gt_path.exists():
        gt = pq.read_table(gt_path, columns=["uid", "noise"]).to_pydict()
        noise = dict(zip(gt["uid"], gt["noise"]))
    tiles = []
    for i, s in enumerate(pool.iter_samples()):
        if i in rows:
            tiles.append((s.image, s.text, noise.get(s.uid, "")))
    return contact_sheet(tiles, title=f"{pool.path.name}: {len(tiles)} random samples")


def suite_sheets(suite_dir: str | Path, out_dir: str | Path, n: int = 32, seed: int = 0) -> list[Path]:
    """One sheet per task (class name or first caption under each image) and one for the reference set."""
    from datafilter.micro.suite import read_task

    suite_dir, out_dir = Path(suite_dir), Path(out_dir)
    meta = json.loads((suite_dir / "suite.json").read_text())
    todo = [(t["name"], suite_dir / t["path"], "test") for t in meta["tasks"]]
    todo += [(name, suite_dir / Path(p).parent, Path(p).name) for name, p in meta.get("reference_sets", {}).items()]
    written = []
    for name, d, split in todo:
        images, labels = read_task(d, split)
        names_file = d / "classnames.txt"
        classnames = names_file.read_text().splitlines() if names_file.exists() else []
        rng = np.random.default_rng(seed)
        pick = sorted(int(i) for i in rng.permutation(len(images))[:n])
        tiles = [(images[i], labels[i][0] if isinstance(labels[i], list) else classnames[labels[i]], "")
                 for i in pick]
        written.append(save_sheet(contact_sheet(tiles, title=name), out_dir / f"{name}.png"))
    return written
