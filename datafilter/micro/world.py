"""The items a recipe uses and where each one goes (pool or which evaluation set), plus their renders.

The split between pool and suite never depends on the seed: held-out icons, digits and clip art are chosen by a fixed
hash of their key, and emoji are split by style. So any pool built from a recipe, with any seed, is disjoint from the
suite built from the same recipe.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from datafilter.micro import catalog
from datafilter.micro.recipe import Recipe
from datafilter.micro.render import RenderSet, ensure_rendered
from datafilter.micro.sources import check, source

log = logging.getLogger(__name__)

# Collection name -> the source package whose version keys its render cache.
COLLECTION_SOURCES = {
    "tabler": "@tabler/icons",
    "mnist": "mnist",
    "sklearn-digits": "scikit-learn",
    "openclipart": "openclipart-svg",
    "papirus": "papirus-icon-theme",
}


def emoji_collection(style: str) -> str:
    return f"emoji-{style}"


def _title_key(title: str) -> str:
    return " ".join(re.sub(r"[^a-z ]+", " ", title.lower()).split())


@dataclass
class World:
    recipe: Recipe
    workers: int = 2
    _renders: dict[str, RenderSet] = field(default_factory=dict)

    # --- emoji --------------------------------------------------------------------------------------------------
    @cached_property
    def art(self) -> dict[str, dict[str, tuple[str, str]]]:
        """Drawings per style. Pool and test styles are required; a missing reference or shift style only loses
        its own evaluation set, with a warning that names the source."""
        st = self.recipe.styles
        out = {s: catalog.emoji_art(s) for s in sorted(set(st.pool) | {st.imagenet_test})}
        for s in sorted({st.imagenet_train} | {x for x in st.shift if x != "clipart"}):
            try:
                out[s] = catalog.emoji_art(s)
            except RuntimeError as exc:
                log.warning("style %s unavailable, its evaluation set is left out: %s", s, exc)
                out[s] = {}
        return out

    @cached_property
    def concepts(self) -> dict[str, catalog.Concept]:
        """The concept universe: every concept with artwork in a pool style (a fixed subset under limits.concepts)."""
        allc = catalog.concepts()
        keys = [h for h in allc if any(h in self.art[s] for s in self.recipe.styles.pool)]
        n = self.recipe.limits.concepts
        if n:
            keys = sorted(sorted(keys, key=catalog.split_fraction)[:n], key=lambda h: allc[h].order)
        return {h: allc[h] for h in keys}

    @property
    def imagenet_icon_count(self) -> int:
        return int(round(self.recipe.imagenet_classes * self.recipe.imagenet_icon_share))

    @cached_property
    def imagenet(self) -> list[str]:
        """The emoji "ImageNet" classes: concepts drawn in the test style and in at least two pool styles (one if
        the pool has a single style), flags aside, preferring those the shift styles also draw; in emoji order."""
        st = self.recipe.styles
        need = min(2, len(st.pool))
        shift = [s for s in st.shift if s != "clipart"]
        cands = [h for h, c in self.concepts.items() if c.group != "flags" and h in self.art[st.imagenet_test]
                 and sum(h in self.art[s] for s in st.pool) >= need]
        cands = self._distinct_in_test_style(cands)
        ranked = sorted(cands, key=lambda h: (-sum(h in self.art[s] for s in shift), self.concepts[h].order))
        chosen = set(ranked[: self.recipe.imagenet_classes - self.imagenet_icon_count])
        return [h for h in cands if h in chosen]

    @cached_property
    def imagenet_icons(self) -> list[str]:
        """The icon "ImageNet" classes (tabler names): icons the pool holds in its icon styles and that have a
        drawing in the ImageNet icon style, which the pool never holds; never a held-out icon, never a name that
        is also an emoji class or has a number in it, and never one whose ImageNet-style drawing is a near-copy of
        its pool drawing.
        Chosen by a fixed hash of the name, so the choice does not depend on the seed."""
        st = self.recipe.styles
        emoji_names = {self.concepts[h].name.lower() for h in self.imagenet}
        pool_names = {self.icons[k].name for k in self.icons_pool}
        # Names with a number are variants of another icon ("lemon-2", "crop-7-5"), not concepts of their own.
        cands = sorted({i.name for k, i in self.icons.items() if i.style == st.icon_imagenet and i.name in pool_names
                        and i.words.lower() not in emoji_names and not any(ch.isdigit() for ch in i.name)},
                       key=lambda n: catalog.split_fraction("inet:" + n))
        cands = self._distinct_icon_style(cands)
        return cands[: self.imagenet_icon_count]

    @property
    def imagenet_keys(self) -> list[str]:
        """Every "ImageNet" class in label order: emoji hexcodes, then ``icon:NAME``."""
        return list(self.imagenet) + [f"icon:{n}" for n in self.imagenet_icons]

    def imagenet_name(self, key: str) -> str:
        return key[len("icon:"):].replace("-", " ") if key.startswith("icon:") else self.concepts[key].name

    def imagenet_spec(self, key: str, style: str, seed: int) -> tuple:
        """The image spec of class ``key`` drawn in emoji ``style`` (icon classes: in the ImageNet icon style)."""
        if key.startswith("icon:"):
            return ("art", "tabler", f"{key[len('icon:'):]}/{self.recipe.styles.icon_imagenet}", seed)
        return ("art", emoji_collection(style), key, seed)

    def _distinct_icon_style(self, names: list[str]) -> list[str]:
        """Drop icons whose ImageNet-style drawing is a near-copy of one of their pool-style drawings."""
        from datafilter.micro.compose import Composer
        from datafilter.micro.overlap import fingerprints

        st = self.recipe.styles
        keys = {n: [f"{n}/{s}" for s in (st.icon_imagenet, *st.icon_pool) if f"{n}/{s}" in self.icons] for n in names}
        rs = self.render("tabler", sorted({k for ks in keys.values() for k in ks}))
        comp = Composer({"tabler": rs}, self.recipe.image_size)
        ok = [n for n in names if f"{n}/{st.icon_imagenet}" in rs]
        if not ok:
            return []
        test = fingerprints([np.asarray(comp.make(("art", "tabler", f"{n}/{st.icon_imagenet}", -1))) for n in ok])
        best = np.zeros(len(ok), np.float32)
        for s in st.icon_pool:
            idx = [i for i, n in enumerate(ok) if f"{n}/{s}" in rs]
            if idx:
                fp = fingerprints([np.asarray(comp.make(("art", "tabler", f"{ok[i]}/{s}", -1))) for i in idx])
                best[idx] = np.maximum(best[idx], (test[idx] * fp).sum(axis=1))
        return [n for n, b in zip(ok, best) if b < self.recipe.suite.near_duplicate_threshold]

    def _distinct_in_test_style(self, cands: list[str]) -> list[str]:
        """Drop concepts whose test-style drawing is a near-copy of one of their pool-style drawings (simple symbols
        every artist draws alike: a red circle, a black square), which the suite's overlap check would remove."""
        from datafilter.micro.compose import Composer
        from datafilter.micro.overlap import fingerprints

        st = self.recipe.styles
        styles = [st.imagenet_test] + list(st.pool)
        rs = {s: self.render(emoji_collection(s), [h for h in cands if h in self.art[s]]) for s in styles}
        comp = Composer({emoji_collection(s): r for s, r in rs.items()}, self.recipe.image_size)
        ok = [h for h in cands if h in rs[st.imagenet_test]]
        test = fingerprints([np.asarray(comp.make(("art", emoji_collection(st.imagenet_test), h, -1))) for h in ok])
        best = np.zeros(len(ok), np.float32)
        for s in st.pool:
            idx = [i for i, h in enumerate(ok) if h in rs[s]]
            fp = fingerprints([np.asarray(comp.make(("art", emoji_collection(s), ok[i], -1))) for i in idx])
            if idx:
                best[idx] = np.maximum(best[idx], (test[idx] * fp).sum(axis=1))
        return [h for h, b in zip(ok, best) if b < self.recipe.suite.near_duplicate_threshold]

    @cached_property
    def pool_emoji(self) -> list[tuple[str, str]]:
        """(style, hexcode) of every emoji drawing the pool may use."""
        return [(s, h) for h in self.concepts for s in self.recipe.styles.pool if h in self.art[s]]

    # --- icons, digits, clip art, apps ---------------------------------------------------------------------------
    @cached_property
    def icons(self) -> dict[str, catalog.Icon]:
        allv = catalog.icons()
        names = sorted({i.name for i in allv.values()}, key=catalog.split_fraction)
        if self.recipe.limits.icons:
            names = names[: self.recipe.limits.icons]
        keep = set(names)
        return {k: v for k, v in sorted(allv.items()) if v.name in keep}

    def icon_held_out(self, icon: catalog.Icon) -> bool:
        return catalog.split_fraction("icon:" + icon.name) < self.recipe.icon_test_fraction

    @cached_property
    def icons_pool(self) -> list[str]:
        """Icons the pool may contain: not held out, and drawn in one of the pool's icon styles."""
        styles = set(self.recipe.styles.icon_pool)
        return [k for k, v in self.icons.items() if not self.icon_held_out(v) and v.style in styles]

    @cached_property
    def icons_test(self) -> list[str]:
        return [k for k, v in self.icons.items() if self.icon_held_out(v)]

    @cached_property
    def digits(self) -> list[str]:
        keys = sorted(catalog.mnist(), key=catalog.split_fraction)
        if self.recipe.limits.digits:
            keys = keys[: self.recipe.limits.digits]
        return sorted(keys)

    @cached_property
    def digits_pool(self) -> list[str]:
        return [k for k in self.digits if catalog.split_fraction("mnist:" + k) >= self.recipe.mnist_test_fraction]

    @cached_property
    def digits_test(self) -> list[str]:
        return [k for k in self.digits if catalog.split_fraction("mnist:" + k) < self.recipe.mnist_test_fraction]

    @cached_property
    def all_clipart(self) -> dict[str, catalog.Clipart]:
        try:
            return catalog.clipart()
        except RuntimeError as exc:
            log.warning("no clip art (pool clip art, clip-art shift and retrieval sets left out): %s", exc)
            return {}

    @cached_property
    def clipart(self) -> dict[str, catalog.Clipart]:
        allv = self.all_clipart
        keys = sorted(allv, key=catalog.split_fraction)
        if self.recipe.limits.clipart:
            # The clip art that shows an ImageNet concept always stays in (the clip-art shift set needs it).
            shift = set(self.clipart_shift_all)
            keys = [k for k in keys if k in shift] + [k for k in keys if k not in shift][: self.recipe.limits.clipart]
        return {k: allv[k] for k in sorted(keys)}

    @cached_property
    def clipart_shift_all(self) -> dict[str, str]:
        """Clip art whose title names an ImageNet class -> that class's key: the clip-art shift set, never pooled."""
        if "clipart" not in self.recipe.styles.shift:
            return {}
        names = {}
        for key in self.imagenet_keys:
            names.setdefault(_title_key(self.imagenet_name(key)), key)
        out = {}
        for k, a in self.all_clipart.items():
            t = _title_key(a.title)
            for cand in (t, t[:-1] if t.endswith("s") else ""):
                if cand in names:
                    out[k] = names[cand]
                    break
        return out

    @cached_property
    def clipart_test(self) -> list[str]:
        return [k for k in self.clipart if k not in self.clipart_shift_all
                and catalog.split_fraction("clipart:" + k) < self.recipe.clipart_test_fraction]

    @cached_property
    def clipart_pool(self) -> list[str]:
        test = set(self.clipart_test)
        return [k for k in self.clipart if k not in self.clipart_shift_all and k not in test]

    @cached_property
    def apps(self) -> list[str]:
        names = sorted(catalog.app_icons(), key=catalog.split_fraction)
        if not names:
            log.warning("no app icons (papirus-icon-theme not installed): off-topic images are blank and noise only")
        if self.recipe.limits.apps:
            names = names[: self.recipe.limits.apps]
        return sorted(names)

    # --- renders ----------------------------------------------------------------------------------------------------
    def version(self, collection: str) -> str:
        if collection.startswith("emoji-"):
            return catalog.style_version(collection[len("emoji-"):])
        src = source(COLLECTION_SOURCES[collection])
        if src.kind == "npm":
            return src.version
        return check(src).installed or src.version or "unknown"  # Debian and PyPI: what is actually installed

    def drawing(self, collection: str):
        if collection.startswith("emoji-"):
            art = self.art[collection[len("emoji-"):]]
            return lambda k: art[k]
        if collection == "tabler":
            allv = catalog.icons()
            return lambda k: ("svg", catalog.icon_svg(allv[k]))
        if collection == "mnist":
            m = catalog.mnist()
            return lambda k: ("ink", m[k])
        if collection == "sklearn-digits":
            d = catalog.sklearn_digits()
            return lambda k: ("ink", d[k])
        if collection == "openclipart":
            c = catalog.clipart()
            return lambda k: ("svgfile", c[k].path)
        if collection == "papirus":
            a = catalog.app_icons()
            return lambda k: ("svgfile", a[k])
        raise KeyError(collection)

    def render(self, collection: str, keys) -> RenderSet:
        """Rendered images of ``keys`` (rendering what the cache lacks); failures are counted and left out."""
        rs = ensure_rendered(collection, self.version(collection), self.recipe.render_size, list(keys),
                             self.drawing(collection), workers=self.workers)
        self._renders[collection] = rs
        return rs

    def rendered(self) -> dict[str, RenderSet]:
        """Every render set opened so far, by collection."""
        return dict(self._renders)
