"""The one wording of the hint that every unknown-name error carries (a filter, parameter, task, scorer, model,
scale, published row): the closest known names, quoted."""

from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(name: str, choices: Iterable[str], n: int = 1) -> str:
    """``"; did you mean 'x'?"`` (``'x' or 'y'`` for several) for the ``n`` choices closest to ``name``, or ``""``
    when none is close, to append to the error's message."""
    close = difflib.get_close_matches(name, list(choices), n=n)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
