"""Which offline scorer ``embed`` uses when no ``--model`` is given, and whether a pool's captions look like what
that scorer was trained on.

The offline scorer is a CLIP trained on one clean micro pool (emoji, icon, digit and clip-art names). Its CLIP score
means something only for captions of that kind: on photo captions it ranks pairs little better than chance. Two
rules follow:

- Choice: among the cached scorers, one whose clean pool was built from the same micro world as the pool being
  embedded (same styles, source limits, number of ImageNet classes and image size: ``pools/nano.yaml`` and
  ``pools/scorer-nano.yaml``, ``pools/micro.yaml`` and ``pools/scorer.yaml``) is preferred; among equals, the newest.
- Fit: a cheap check of the pool's captions against the scorer's training captions. Single words say little (an
  emoji vocabulary has "man", "horse", "beach", "sunset"), so the check also counts adjacent word pairs: in the micro
  pool about 70% of them occur in the scorer's training captions, in photo captions ("a man riding a wave on top of
  a surfboard") about 25%. Below half, ``embed`` warns.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from datafilter.common.files import read_json
from datafilter.models import ModelSpec
from datafilter.pool.pool import Pool, PoolError

log = logging.getLogger(__name__)

# The recipe settings that define a micro world (what a pool can show and name); seeds, sizes and noise do not.
WORLD_KEYS = ("styles", "limits", "imagenet_classes", "image_size")
# Below this share of adjacent word pairs seen in training, a pool's captions count as unlike the scorer's.
MIN_PAIR_FIT = 0.5
POOL_SAMPLE = 20_000  # captions of the pool looked at (spread over its shards)
TRAINING_SAMPLE = 500_000  # captions of the scorer's clean pool read at most

_WORD = re.compile(r"[^\W\d_]+|\d")  # runs of letters, single digits


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class ScorerChoice:
    spec: ModelSpec
    info: dict[str, Any]  # the scorer's scorer.json, with its folder as ``path``
    same_world: bool | None  # None: the pool or the scorer's clean pool has no build.json to compare
    candidates: int

    def describe(self) -> str:
        info = self.info
        pool = info.get("pool") or (f"the clean pool of its release {info['released']}" if info.get("released")
                                    else "?")
        recipe = scorer_recipe(info)
        named = f", recipe {recipe['name']!r}" if recipe and recipe.get("name") else ""
        of = f"the newest of {self.candidates}" if self.candidates > 1 else "the only one"
        why = {True: f"{of} cached scorer(s) trained on this pool's micro world",
               False: f"no cached scorer was trained on this pool's micro world; {of} cached scorer(s)",
               None: f"this is not a micro pool; {of} cached scorer(s)"}[self.same_world]
        return (f"scorer {info['key']} ({info['model']}, created {info.get('created', '?')}), trained on {pool} "
                f"({info.get('pool_samples', 0):,} clean pairs{named}): {why}")


def build_recipe(pool_dir: Path) -> dict[str, Any] | None:
    """The recipe a micro pool was built from (``build.json``), or None for other pools."""
    try:
        settings = read_json(pool_dir / "build.json").get("recipe_settings")
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def scorer_recipe(info: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe of a scorer's clean pool: from the pool's ``build.json``, or, for a released scorer whose pool is
    not built here, as its release recorded it."""
    return (build_recipe(Path(info["pool"])) if info.get("pool") else None) or info.get("recipe_settings")


def _world(recipe: dict[str, Any] | None) -> tuple | None:
    if recipe is None:
        return None
    return tuple(repr(recipe.get(k)) for k in WORLD_KEYS)


def choose_scorer(pool: Pool, scorers: list[dict[str, Any]] | None = None) -> ScorerChoice:
    """The offline scorer for ``pool``: one of the same micro world if any, else the newest; ``FileNotFoundError``
    (with the command that trains one) when none is cached."""
    from datafilter.train.scorer import default_scorer_spec, list_scorers

    usable = [s for s in (list_scorers() if scorers is None else scorers)
              if (Path(s["path"]) / s["checkpoint"]).is_file()]
    if not usable:
        default_scorer_spec()  # raises with the message that says how to train one
    mine = _world(build_recipe(pool.path))
    same = [s for s in usable if mine is not None and _world(scorer_recipe(s)) == mine]
    pick = (same or usable)[-1]  # list_scorers is oldest first
    same_world = None if mine is None else bool(same)
    spec = ModelSpec(pick["model"], checkpoint=str(Path(pick["path"]) / pick["checkpoint"]))
    return ScorerChoice(spec, pick, same_world, len(same or usable))


@dataclass(frozen=True)
class CaptionFit:
    """How much of a pool's caption text occurs in a scorer's training captions (shares of occurrences)."""

    words: float  # caption words seen in training
    pairs: float  # adjacent word pairs seen in training
    captions: int  # pool captions looked at
    median_words: float  # words per caption, in the pool
    training_median_words: float  # and in the training captions

    @property
    def unlike(self) -> bool:
        return self.pairs < MIN_PAIR_FIT

    def describe(self) -> str:
        return (f"{100 * self.words:.0f}% of the caption words and {100 * self.pairs:.0f}% of the adjacent word pairs "
                f"of {self.captions:,} captions occur in the scorer's training captions (median caption "
                f"{self.median_words:g} words, in training {self.training_median_words:g})")


def _spread_texts(pool: Pool, limit: int) -> Iterable[str]:
    """Up to ``limit`` captions from shards spread evenly over the pool: a pool of millions is not read whole."""
    shards = pool.shards
    if pool.num_samples > limit:
        k = max(1, -(-len(shards) * limit // pool.num_samples))
        shards = [shards[i] for i in sorted({round(x) for x in np.linspace(0, len(shards) - 1, k)})]
    n = 0
    for shard in shards:
        for text in pool.metadata(["text"], [shard]).column("text").to_pylist():
            if n >= limit:
                return
            if isinstance(text, str):
                n += 1
                yield text


def caption_fit(pool: Pool, training_pool: str | Path) -> CaptionFit | None:
    """Compare ``pool``'s captions with those of the scorer's clean pool; None when that pool is gone."""
    try:
        training = Pool(training_pool)
    except PoolError:  # deleted or moved: nothing to compare with
        return None
    seen_words: set[str] = set()
    seen_pairs: set[tuple[str, str]] = set()
    training_lengths = []
    for text in _spread_texts(training, TRAINING_SAMPLE):
        w = _words(text)
        training_lengths.append(len(w))
        seen_words.update(w)
        seen_pairs.update(zip(w, w[1:]))
    words = pairs = words_seen = pairs_seen = captions = 0
    lengths = []
    for text in _spread_texts(pool, POOL_SAMPLE):
        w = _words(text)
        captions += 1
        lengths.append(len(w))
        words += len(w)
        words_seen += sum(x in seen_words for x in w)
        pairs += max(0, len(w) - 1)
        pairs_seen += sum(p in seen_pairs for p in zip(w, w[1:]))
    if not captions:
        return None
    return CaptionFit(words_seen / max(1, words), pairs_seen / max(1, pairs), captions,
                      float(np.median(lengths)), float(np.median(training_lengths or [0])))


def offline_scorer(pool: Pool) -> ModelSpec:
    """The offline scorer for ``pool`` (see ``choose_scorer``), saying which one and why, and warning when the
    pool's captions look unlike its training captions."""
    choice = choose_scorer(pool)
    log.info("no --model given: using the offline %s", choice.describe())
    fit = caption_fit(pool, choice.info["pool"]) if choice.info.get("pool") else None
    if fit is None and choice.info.get("released"):
        log.info("not comparing %s's captions with the scorer's training captions: it was released (%s) and its "
                 "clean pool is not built here", pool.path, choice.info["released"])
    elif fit is None:
        log.warning("cannot compare %s's captions with the scorer's training captions: its clean pool %s is gone",
                    pool.path, choice.info.get("pool"))
    elif fit.unlike:
        log.warning("%s: the captions look unlike the offline scorer's training data: %s. The offline scorer knows "
                    "the micro world's names (emoji, icons, digits, clip art); its CLIP scores mean little for other "
                    "captions. For real data use an open_clip model, e.g. --model ViT-B-32 --pretrained openai "
                    "(DataComp's B/32 score) or --model ViT-L-14 --pretrained openai", pool.path, fit.describe())
    else:
        log.info("caption fit: %s", fit.describe())
    return choice.spec
