"""Caption writers: clean captions from names, tags and templates, and the web-like noise captions.

Templates are deliberately varied (bare names, tag lists, "... icon", "... sticker") because web captions are; the
evaluation prompt templates in ``suite`` use the same kinds of phrases, as real zero-shot prompts match web text.
"""

from __future__ import annotations

import numpy as np

from datafilter.micro.catalog import Clipart, Concept, Icon
from datafilter.micro.compose import CELLS, COUNT_WORDS

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _tags(rng: np.random.Generator, tags, k: int = 2) -> str:
    if not tags:
        return ""
    idx = rng.permutation(len(tags))[:k]
    return ", ".join(tags[int(i)] for i in sorted(idx))


def emoji_caption(c: Concept, rng: np.random.Generator) -> str:
    label = c.label
    t = _tags(rng, c.tags)
    options = [label, f"{label} emoji", f"emoji of {label}", f"{label} sticker", f"{label} illustration",
               f"{label}, {t}" if t else f"{label} icon", f"{c.subgroup}: {label}", f"{c.group}: {label}"]
    return _pick(rng, options)


def icon_caption(i: Icon, rng: np.random.Generator) -> str:
    t = _tags(rng, i.tags)
    options = [f"{i.words} icon", i.words, f"{i.words} icon, {t}" if t else f"{i.words} symbol",
               f"{i.category.lower()} icon: {i.words}", f"{i.style} {i.words} icon", f"{i.words} line icon"]
    return _pick(rng, options)


def digit_caption(digit: int, rng: np.random.Generator) -> str:
    w = DIGIT_WORDS[digit]
    options = [f"handwritten digit {digit}", f"the number {w}", str(digit), f"a handwritten {w}",
               f"digit {digit} written by hand", f"{w}"]
    return _pick(rng, options)


def clipart_caption(a: Clipart, rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.5 or not a.keywords:
        return a.title
    if r < 0.8:
        return f"{a.title} {' '.join(a.keywords[:4])}"
    return a.title.lower()


def count_caption(c: Concept, n: int, rng: np.random.Generator) -> str:
    w = COUNT_WORDS[n - 1]
    return _pick(rng, [f"{w} {c.name} emojis", f"{w} emojis of {c.name}", f"{w} {c.name} stickers"]) if n > 1 \
        else _pick(rng, [f"one {c.name} emoji", f"a single {c.name}", f"one {c.name} sticker"])


def position_caption(c: Concept, cell: int, rng: np.random.Generator) -> str:
    where = CELLS[cell]
    return _pick(rng, [f"{c.name} emoji in the {where}", f"{c.name} at the {where}", f"an emoji in the {where}"])


def size_caption(c: Concept, large: bool, rng: np.random.Generator) -> str:
    size = "large" if large else "small"
    return _pick(rng, [f"a {size} {c.name} emoji", f"{size} {c.name}", f"a {size} emoji"])


def colour_caption(i: Icon, colour: str, rng: np.random.Generator) -> str:
    return _pick(rng, [f"a {colour} {i.words} icon", f"{colour} {i.words} icon", f"{i.words} icon in {colour}",
                       f"{colour} icon"])


BOILERPLATE = ("click to enlarge", "untitled", "image", "thumbnail", "no description available", "placeholder",
               "download", "stock image", "view larger image", "see more", "free vector", "clipart", "picture",
               "loading...", "default image", "click here", "more info", "image not available")


def boilerplate_caption(rng: np.random.Generator) -> str:
    r = rng.random()
    n = int(rng.integers(1, 10_000))
    if r < 0.2:
        return f"IMG_{n:04d}.{_pick(rng, ['png', 'jpg', 'JPG'])}"
    if r < 0.3:
        return f"DSC{n:05d}.JPG"
    if r < 0.4:
        return f"image {int(rng.integers(1, 30))} of {int(rng.integers(30, 60))}"
    if r < 0.5:
        return f"Screenshot 20{int(rng.integers(10, 25))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
    if r < 0.55:
        return f"untitled-{int(rng.integers(1, 20))}.svg"
    return _pick(rng, BOILERPLATE)


SPAM = ("{x} stickers cheap buy now free shipping", "BEST {x} deals!!! click here", "{x} {x} {x} download free",
        "buy {x} online best price", "{x} - shop now - limited offer")


def spam_caption(x: str, variant: int) -> str:
    return SPAM[variant % len(SPAM)].format(x=x)


def app_caption(app: str, rng: np.random.Generator) -> str:
    name = app.replace("-", " ").replace("_", " ")
    return _pick(rng, [name, f"{name} logo", f"{name} app icon", f"download {name}"])
