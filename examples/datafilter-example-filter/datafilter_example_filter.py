"""An example datafilter plugin: keep samples whose caption has between ``min_words`` and ``max_words`` words."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datafilter.filters import Filter, FilterView


@dataclass(frozen=True)
class CaptionWordsConfig:
    """Captions with fewer than ``min_words`` or more than ``max_words`` words (0: no upper limit) are removed."""

    min_words: int = 3
    max_words: int = 0


class CaptionWordsFilter(Filter):
    name = "caption_words"  # must equal the entry-point name
    version = "1"
    description = "keep captions with a number of words in a range (example plugin)"
    Config = CaptionWordsConfig
    needs = ("metadata:text",)

    def select(self, view: FilterView) -> np.ndarray:
        words = np.array([len(t.split()) for t in view.text()])
        too_short = words < self.config.min_words
        too_long = (words > self.config.max_words) if self.config.max_words else np.zeros(view.n, bool)
        self.drop("too_few_words", int(too_short.sum()))
        self.drop("too_many_words", int((too_long & ~too_short).sum()))
        return view.uids_of(~(too_short | too_long))
