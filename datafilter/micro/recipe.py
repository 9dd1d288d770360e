"""Pool and suite recipes (``pools/*.yaml``): typed, validated, with errors that name the file and the key.

A recipe fixes everything a build depends on besides the pinned sources: sizes, the style split, how many samples of
each kind, the noise proportions and the seed. Same recipe and seed, same bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from datafilter.common.files import read_yaml
from datafilter.micro.catalog import EMOJI_STYLES

NOISE_KINDS = ("mismatched_caption", "boilerplate_caption", "near_duplicate_spam", "off_topic_image",
               "non_english_caption")
CLEAN_PARTS = ("emoji", "icons", "digits", "clipart", "composites")
SHIFT_STYLES = ("fluent-flat", "fluent-3d", "fluent-hc", "symbola", "emojione-monotone", "clipart")
ICON_STYLES = ("outline", "filled")


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class Styles:
    """Which styles go where. Emoji: the pool, the "ImageNet" test, its train split (the image-based filter's
    reference set) and the distribution shifts. The train split is drawn from the test's own style by default, as
    ImageNet's train and validation images come from one distribution (other placements, never a test image); any
    other style must not serve two roles. Icons (tabler's ``outline`` and ``filled`` drawings): the pool's icon
    styles, and the style the "ImageNet" icon classes are tested (and their train split drawn) in, which the pool
    never contains."""

    pool: tuple[str, ...] = ("noto", "openmoji", "emojione")
    imagenet_test: str = "twemoji"
    imagenet_train: str = "twemoji"
    shift: tuple[str, ...] = SHIFT_STYLES
    icon_pool: tuple[str, ...] = ("outline",)
    icon_imagenet: str = "filled"


@dataclass(frozen=True)
class Augment:
    """Random placement of each artwork in the pool: scale (>1 crops), rotation, shift, background colour."""

    scale: tuple[float, float] = (0.6, 1.15)
    rotate: float = 20.0  # degrees, either way
    shift: float = 0.15  # fraction of the image side, either way
    coloured_background: float = 0.5  # probability of a random background colour instead of white


@dataclass(frozen=True)
class Limits:
    """Caps on how many source items a recipe uses (the nano recipe keeps renders and tests small); 0 = all."""

    concepts: int = 0
    icons: int = 0
    digits: int = 0
    clipart: int = 0
    apps: int = 0


@dataclass(frozen=True)
class PoolRecipe:
    size: int = 128_000
    shard_size: int = 10_000
    clean_mix: dict[str, float] = field(default_factory=lambda: {
        "emoji": 0.5, "icons": 0.15, "digits": 0.1, "clipart": 0.1, "composites": 0.15})
    noise: dict[str, float] = field(default_factory=lambda: {
        "mismatched_caption": 0.2, "boilerplate_caption": 0.1, "near_duplicate_spam": 0.08,
        "off_topic_image": 0.08, "non_english_caption": 0.09})
    spam_groups: int = 60  # distinct images behind the near-duplicate spam
    augment: Augment = field(default_factory=Augment)


@dataclass(frozen=True)
class SuiteRecipe:
    imagenet_per_class: int = 1  # test images per class (1 = the canonical drawing; more = jittered copies)
    # Images per class in the reference (train) split. ImageNet's train images are distinct photos; a micro class
    # has one drawing in the test style, so its train split is that drawing once more in another placement
    # (docs/micro.md: more placements of one drawing add no content, only spread a class over more clusters).
    reference_per_class: int = 1
    composites_per_class: int = 100  # counting, position, size and colour images per class
    max_per_task: int = 2_000  # cap on test images for the VTAB-like and retrieval sets
    near_duplicate_threshold: float = 0.95  # cosine of grey thumbnails at or above which an image counts as a copy


@dataclass(frozen=True)
class Recipe:
    name: str
    seed: int = 0
    version: int = 1
    image_size: int = 40
    render_size: int = 48
    imagenet_classes: int = 1000
    # The share of "ImageNet" classes that are icons rather than emoji: the two kinds of object drawing in the pool,
    # in about the proportion the pool holds them (emoji 61%, icons 19% of its clean pairs).
    imagenet_icon_share: float = 0.25
    mnist_test_fraction: float = 0.2
    icon_test_fraction: float = 0.15
    clipart_test_fraction: float = 0.1
    styles: Styles = field(default_factory=Styles)
    limits: Limits = field(default_factory=Limits)
    pool: PoolRecipe = field(default_factory=PoolRecipe)
    suite: SuiteRecipe = field(default_factory=SuiteRecipe)
    path: str = ""

    def with_seed(self, seed: int) -> "Recipe":
        return dataclasses.replace(self, seed=seed)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d

    def pool_settings(self) -> dict[str, Any]:
        """What decides a pool's bytes: the recipe without its suite section (the suite's settings change only the
        suite, so editing them must not rebuild the pool)."""
        d = self.to_dict()
        d.pop("suite")
        return d


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        _, vt = get_args(tp)
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected text, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict, where: str):
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise RecipeError(f"{where or 'recipe'}: {exc}") from None


def validate(r: Recipe, where: str) -> None:
    def fail(msg: str) -> None:
        raise RecipeError(f"{where}: {msg}")

    if not r.name:
        fail("name is required")
    if not 16 <= r.image_size <= 256:
        fail(f"image_size must be between 16 and 256, not {r.image_size}")
    if r.render_size < r.image_size:
        fail(f"render_size ({r.render_size}) must be at least image_size ({r.image_size})")
    s = r.styles
    roles = list(s.pool) + [s.imagenet_test] + ([s.imagenet_train] if s.imagenet_train != s.imagenet_test else []) \
        + [x for x in s.shift if x != "clipart"]
    for style in roles:
        if style not in EMOJI_STYLES:
            fail(f"styles: unknown style {style!r} (known: {', '.join(EMOJI_STYLES)})")
    dup = sorted({x for x in roles if roles.count(x) > 1})
    if dup:
        fail(f"styles: {', '.join(dup)} used in more than one role; pool, imagenet_test, imagenet_train and shift "
             "styles must be disjoint (imagenet_train may equal imagenet_test), or evaluation images leak into the "
             "pool")
    if not s.pool:
        fail("styles.pool must name at least one style")
    for style in (*s.icon_pool, s.icon_imagenet):
        if style not in ICON_STYLES:
            fail(f"styles: unknown icon style {style!r} (known: {', '.join(ICON_STYLES)})")
    if s.icon_imagenet in s.icon_pool:
        fail(f"styles: icon style {s.icon_imagenet!r} is both a pool style and the ImageNet icon style")
    if not 0 <= r.imagenet_icon_share < 1:
        fail("imagenet_icon_share must be in [0, 1)")
    p = r.pool
    if p.size < 1 or p.shard_size < 1:
        fail("pool.size and pool.shard_size must be positive")
    for k in p.clean_mix:
        if k not in CLEAN_PARTS:
            fail(f"pool.clean_mix: unknown part {k!r} (known: {', '.join(CLEAN_PARTS)})")
    if any(v < 0 for v in p.clean_mix.values()) or sum(p.clean_mix.values()) <= 0:
        fail("pool.clean_mix: weights must be non-negative and not all zero")
    for k, v in p.noise.items():
        if k not in NOISE_KINDS:
            fail(f"pool.noise: unknown noise kind {k!r} (known: {', '.join(NOISE_KINDS)})")
        if v < 0:
            fail(f"pool.noise.{k}: must not be negative")
    if sum(p.noise.values()) >= 1:
        fail(f"pool.noise: fractions add up to {sum(p.noise.values()):.2f}; they must leave room for clean pairs")
    lo, hi = p.augment.scale
    if not 0 < lo <= hi:
        fail("pool.augment.scale must be [low, high] with 0 < low <= high")
    for name in ("mnist_test_fraction", "icon_test_fraction", "clipart_test_fraction"):
        if not 0 < getattr(r, name) < 1:
            fail(f"{name} must be between 0 and 1")
    if not 0 < r.suite.near_duplicate_threshold <= 1:
        fail("suite.near_duplicate_threshold must be in (0, 1]")


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    data = read_yaml(path, "recipe", RecipeError)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name, seed, styles, pool, suite)")
    try:
        recipe = _build(Recipe, data, "")
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    recipe = dataclasses.replace(recipe, path=str(path))
    validate(recipe, str(path))
    return recipe
