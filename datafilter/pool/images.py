"""Decode, check, resize and re-encode one image, or say exactly why not.

Every rejection is a ``SkipSample`` with a short machine-readable reason; the shard writer counts reasons so that
input = written + skipped always holds.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must be rejected, not padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class SkipSample(Exception):
    """A sample that cannot be kept; ``reason`` is counted in the shard's stats."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "area": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class ImageConfig:
    """How images are stored in a pool (DataComp resizes to 512 on the longer side and keeps the aspect ratio)."""

    max_side: int = 512
    encode_format: str = "jpg"  # jpg | png | webp
    quality: int = 95
    max_pixels: int = 89_478_485  # Pillow's own decompression-bomb threshold
    min_side: int = 1
    # Downscaling filter. "area" averages source pixels (img2dataset's and so DataComp's INTER_AREA) and is about 4x
    # faster than "lanczos", which matters when ingesting millions of images.
    resample: str = "lanczos"  # lanczos | area | bicubic

    def __post_init__(self) -> None:
        if self.encode_format not in ("jpg", "png", "webp"):
            raise ValueError(f"encode_format must be jpg, png or webp, not {self.encode_format!r}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {', '.join(_RESAMPLE)}, not {self.resample!r}")
        if self.max_side < 1:
            raise ValueError("max_side must be positive")


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int


_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def open_image(data: bytes, max_pixels: int = ImageConfig.max_pixels, reduce_to: int = 0) -> Image.Image:
    """Decode ``data`` fully, rejecting empty, undecodable, truncated and oversized images.

    With ``reduce_to``, a JPEG at least twice that long on its longer side is decoded at 1/2, 1/4 or 1/8 scale (libjpeg
    averages in the DCT domain), never below ``reduce_to``: several times faster when a downscale follows anyway.
    ``img.info["original_size"]`` keeps the size before that.
    """
    if not data:
        raise SkipSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise SkipSample("image_too_large", f"{w}x{h}")
            if reduce_to and img.format == "JPEG" and max(w, h) >= 2 * reduce_to:
                scale = reduce_to / max(w, h)
                img.draft(img.mode, (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))))
            img.info["original_size"] = (w, h)
            img.load()
    except SkipSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SkipSample("image_too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise SkipSample("undecodable_image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = "truncated_image" if "truncated" in str(exc).lower() else "undecodable_image"
        raise SkipSample(reason, str(exc)) from None
    return img


# Pillow's modes for greyscale with more than 8 bits (16-bit PNG and TIFF decode to "I;16", older Pillow to "I")
# and for floating-point greyscale.
_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """Scale a 16-bit (or float) greyscale image to 8 bits.

    Pillow's ``convert("L")``/``convert("RGB")`` clips these values at 255 instead of scaling them, so almost every
    16-bit image comes out white. Integer modes are taken as 16-bit (0..65535), floats as 0..1 when they fit there.
    """
    arr = np.asarray(img, dtype=np.float64)
    top = 1.0 if img.mode == "F" and (arr.size == 0 or float(np.nanmax(arr)) <= 1.0) else 65535.0
    arr = np.nan_to_num(arr, nan=0.0)
    return Image.fromarray((np.clip(arr, 0, top) * (255.0 / top) + 0.5).astype(np.uint8), "L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Flatten transparency onto ``background`` (icons and clip art are mostly transparent) and convert to RGB.

    The one place where decoded images become RGB for every stage (ingest, embedding, training, evaluation), so a
    decoding rule (such as scaling 16-bit greyscale) is made once, here.
    """
    if img.mode in _WIDE_GREY:
        img = _wide_grey_to_l(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def encode_image(img: Image.Image, cfg: ImageConfig) -> bytes:
    buf = io.BytesIO()
    kwargs = {"quality": cfg.quality} if cfg.encode_format in ("jpg", "webp") else {"optimize": False}
    if cfg.encode_format == "webp" and cfg.quality >= 100:
        kwargs = {"lossless": True}
    img.save(buf, format=_PIL_FORMAT[cfg.encode_format], **kwargs)
    return buf.getvalue()


# EXIF orientations (tag 0x0112) that turn the stored image by 90 degrees one way or the other.
_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)


def upright(img: Image.Image) -> tuple[Image.Image, bool]:
    """The image as it is meant to be seen: turned and mirrored as its EXIF orientation says (phone cameras store
    pixels as the sensor saw them and record the rotation in EXIF). Returns the image and whether width and height
    swapped. Undecodable EXIF is ignored, as viewers ignore it."""
    try:
        orientation = int(img.getexif().get(_ORIENTATION, 1))
        if orientation == 1:
            return img, False
        return ImageOps.exif_transpose(img), orientation in _QUARTER_TURNS
    except Exception:  # malformed EXIF blocks raise all sorts of errors inside Pillow
        return img, False


def process_image(data: bytes, cfg: ImageConfig) -> EncodedImage:
    """Decode, validate, turn upright (EXIF orientation), downscale (never upscale) to ``cfg.max_side`` keeping the
    ratio, and re-encode. Sizes, original ones included, are those of the upright image."""
    # the fast path: "area" averages pixels, and so does decoding a large JPEG at reduced scale
    img = open_image(data, cfg.max_pixels, reduce_to=cfg.max_side if cfg.resample == "area" else 0)
    ow, oh = img.info.get("original_size", img.size)
    if min(ow, oh) < cfg.min_side:
        raise SkipSample("image_too_small", f"{ow}x{oh}")
    img, swapped = upright(img)
    if swapped:
        ow, oh = oh, ow
    img = to_rgb(img)
    scale = cfg.max_side / max(ow, oh)
    if scale < 1:
        size = (max(1, round(ow * scale)), max(1, round(oh * scale)))
        img = img.resize(size, _RESAMPLE[cfg.resample], reducing_gap=3.0)
    return EncodedImage(encode_image(img, cfg), cfg.encode_format, img.width, img.height, ow, oh)
