"""Shared fixtures: small pools written through the real writer, so every stage is tested on the real format."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datafilter.micro import sources
from datafilter.micro.recipe import load_recipe

from datafilter.pool import ImageConfig, ShardWriter, make_uid

ROOT = Path(__file__).resolve().parents[1]
NANO = ROOT / "pools" / "nano.yaml"

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40)}
SHAPES = ("square", "circle", "bar")


def shape_image(colour: str, shape: str, size: int = 32, seed: int = 0) -> bytes:
    """A coloured shape on a white background with a little noise: easy for a tiny model to tell apart."""
    rng = np.random.default_rng(seed)
    arr = np.full((size, size, 3), 255, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size // 2
    if shape == "square":
        mask = (abs(yy - c) < size // 3) & (abs(xx - c) < size // 3)
    elif shape == "circle":
        mask = (yy - c) ** 2 + (xx - c) ** 2 < (size // 3) ** 2
    else:
        mask = abs(yy - c) < size // 8
    arr[mask] = COLOURS[colour]
    arr = np.clip(arr.astype(int) + rng.integers(-12, 13, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def write_toy_pool(path: Path, n: int = 48, shard_size: int = 16, seed: int = 0) -> Path:
    """A pool of coloured shapes captioned "a red circle" etc., in ``ceil(n / shard_size)`` shards."""
    path.mkdir(parents=True, exist_ok=True)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    for shard in range((n + shard_size - 1) // shard_size):
        w = ShardWriter(path, shard, ImageConfig(max_side=32, encode_format="png"))
        for i in range(shard * shard_size, min(n, (shard + 1) * shard_size)):
            colour, shape = combos[i % len(combos)]
            w.add(shape_image(colour, shape, seed=seed + i), f"a {colour} {shape}", make_uid("toy", str(seed), str(i)),
                  {"colour": colour, "shape": shape})
        w.close()
    return path


@pytest.fixture
def toy_pool(tmp_path: Path) -> Path:
    return write_toy_pool(tmp_path / "pool")


def need_sources() -> None:
    missing = [s for s in sources.status() if not s.ok and s.source.name != "papirus-icon-theme"]
    if missing:
        pytest.fail("micro sources not installed (run `datafilter sources install`): "
                    + ", ".join(s.source.name for s in missing))


@pytest.fixture(scope="session")
def nano_builds(tmp_path_factory) -> dict[str, Path]:
    """nano's pool built twice (1 and 2 workers) and its suite, once per test session."""
    need_sources()
    from datafilter.micro.poolbuild import build_pool
    from datafilter.micro.suite import build_suite

    root = tmp_path_factory.mktemp("nano")
    recipe = load_recipe(NANO)
    build_pool(recipe, root / "pool_a", workers=2)
    build_pool(recipe, root / "pool_b", workers=1)
    build_suite(recipe, root / "suite", pool_dir=root / "pool_a", workers=2)
    return {"pool": root / "pool_a", "pool_b": root / "pool_b", "suite": root / "suite", "root": root}
