"""The fast image path used by ingest: area downscaling with reduced-scale JPEG decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from datafilter.pool.images import ImageConfig, process_image


def _photo(w: int, h: int, fmt: str = "JPEG") -> bytes:
    yy, xx = np.mgrid[:h, :w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8)
    arr[h // 3: h // 2, w // 4: w // 2] = (200, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("w, h", [(2000, 1000), (1100, 1500), (9000, 300)])
def test_area_path_gives_the_same_sizes_and_nearly_the_same_pixels_as_lanczos(w, h):
    data = _photo(w, h)
    fast = process_image(data, ImageConfig(max_side=256, resample="area"))
    slow = process_image(data, ImageConfig(max_side=256, resample="lanczos"))
    assert (fast.original_width, fast.original_height) == (slow.original_width, slow.original_height) == (w, h)
    assert (fast.width, fast.height) == (slow.width, slow.height)
    assert max(fast.width, fast.height) == 256
    a = np.asarray(Image.open(io.BytesIO(fast.data)), dtype=float)
    b = np.asarray(Image.open(io.BytesIO(slow.data)), dtype=float)
    assert np.abs(a - b).mean() < 3.0  # of 255: the same picture


def test_small_and_non_jpeg_images_are_not_reduced():
    png = process_image(_photo(900, 600, "PNG"), ImageConfig(max_side=256, resample="area"))
    assert (png.original_width, png.width, png.height) == (900, 256, 171)
    small = process_image(_photo(200, 100), ImageConfig(max_side=256, resample="area"))
    assert (small.width, small.height) == (200, 100)  # never upscaled


def test_unknown_resample_filter_is_refused():
    with pytest.raises(ValueError, match="resample"):
        ImageConfig(resample="nearest")
