"""Filters that need no embeddings: no filter, random, DataComp's basic filter and its text-based filter."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from datafilter.filters.base import Filter, NoConfig
from datafilter.filters.language import FASTTEXT, language_mask
from datafilter.filters.view import FilterView


class NoFilter(Filter):
    name = "none"
    version = "1"
    description = "keep every sample of the pool (DataComp's 'no filtering' baseline)"
    Config = NoConfig

    def select(self, view: FilterView) -> np.ndarray:
        return view.sorted_uids().copy()


@dataclass(frozen=True)
class RandomConfig:
    fraction: float = 0.3
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")


class RandomFilter(Filter):
    name = "random"
    version = "1"
    description = "keep a uniformly random fraction of the pool (seeded): the baseline any filter must beat"
    Config = RandomConfig

    def select(self, view: FilterView) -> np.ndarray:
        k = int(round(self.config.fraction * view.n))
        rows = np.random.default_rng(self.config.seed).permutation(view.n)[:k]
        self.drop("random", view.n - k)
        return view.uids_of(rows)


_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class BasicConfig:
    """DataComp's basic filter: captions of more than two words and five characters, in English (fastText's
    ``lid.176``; ``language_model``: see ``datafilter.filters.language``); images whose shorter side is at least 200
    pixels and whose aspect ratio is at most 3. Set a field to 0 (or language to '') to switch that test off; on a
    pool of small images scale ``min_image_side`` with the image size (the micro benchmark does)."""

    min_words: int = 3
    min_chars: int = 6
    language: str = "en"
    language_model: str = FASTTEXT
    min_image_side: int = 200
    max_aspect_ratio: float = 3.0


class BasicFilter(Filter):
    name = "basic"
    version = "1"
    description = "caption length and language (fastText), image size and aspect ratio (DataComp's basic filter)"
    Config = BasicConfig
    needs = ("metadata:text", "metadata:original_width", "metadata:original_height")

    def select(self, view: FilterView) -> np.ndarray:
        c = self.config
        texts = view.text()
        keep = np.ones(view.n, bool)

        def apply(reason: str, ok: np.ndarray) -> None:
            nonlocal keep
            self.drop(reason, int((keep & ~ok).sum()))  # each sample counted once, for the first test it fails
            keep &= ok

        words = np.fromiter((len(t.split()) for t in texts), np.int64, len(texts))
        chars = np.fromiter((len(t) for t in texts), np.int64, len(texts))
        apply("caption_too_short", (words >= c.min_words) & (chars >= c.min_chars))
        if c.language:
            ok = np.zeros(view.n, bool)
            idx = np.flatnonzero(keep)
            ok[idx] = language_mask([texts[i] for i in idx], c.language, c.language_model)
            apply("wrong_language", ok)
        w = view.column("original_width").astype(np.float64)
        h = view.column("original_height").astype(np.float64)
        short, long = np.minimum(w, h), np.maximum(w, h)
        apply("image_too_small", short >= c.min_image_side)
        if c.max_aspect_ratio > 0:
            with np.errstate(divide="ignore", invalid="ignore"):
                apply("aspect_ratio", (short > 0) & (long / np.where(short > 0, short, 1) <= c.max_aspect_ratio))
        return view.uids_of(keep)


@dataclass(frozen=True)
class TextBasedConfig:
    """``classnames``: a text file with one class name per line (CLIP_benchmark's ``classnames.txt``), or a
    comma-separated list. A caption matches when a class name appears in it as whole words (case-insensitive)."""

    classnames: str = ""
    language: str = "en"
    language_model: str = FASTTEXT


def load_classnames(spec: str) -> list[str]:
    if not spec:
        raise ValueError("text_based needs classnames: a classnames.txt file or a comma-separated list")
    path = Path(spec)
    if path.exists():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    elif spec.endswith(".txt"):
        raise ValueError(f"classnames file not found: {spec}")
    else:
        names = [s.strip() for s in spec.split(",")]
    return [n for n in names if n]


def caption_matches(texts: Sequence[str], classnames: Sequence[str]) -> np.ndarray:
    """True where a caption contains one of the class names as a run of whole words.

    Class names become tuples of lower-case words; a caption's word n-grams of the lengths present are looked up
    in a set, so the cost is linear in caption length whatever the number of classes.
    """
    targets = {tuple(_WORD.findall(n.lower())) for n in classnames}
    targets.discard(())
    lengths = sorted({len(t) for t in targets})
    out = np.zeros(len(texts), bool)
    for i, text in enumerate(texts):
        words = _WORD.findall(text.lower())
        out[i] = any(tuple(words[j:j + n]) in targets for n in lengths for j in range(len(words) - n + 1))
    return out


class TextBasedFilter(Filter):
    name = "text_based"
    version = "1"
    description = ("keep English captions that name a class of the target task (after DataComp's text-based "
                   "filter, which matches ImageNet-21k WordNet synsets)")
    Config = TextBasedConfig
    needs = ("metadata:text",)

    def select(self, view: FilterView) -> np.ndarray:
        names = load_classnames(self.config.classnames)
        texts = view.text()
        keep = np.ones(view.n, bool)
        if self.config.language:
            keep = language_mask(texts, self.config.language, self.config.language_model)
            self.drop("wrong_language", int((~keep).sum()))
        idx = np.flatnonzero(keep)
        match = caption_matches([texts[i] for i in idx], names)
        self.drop("no_class_name", int((~match).sum()))
        return view.uids_of(idx[match])
