"""Caption language and word counts as DataComp's baselines compute them (fastText's lid.176 and tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest

from datafilter.filters.language import (FASTTEXT, PY3LANGID, bundled_fasttext_model, fasttext_tokens, language_mask,
                                         languages)

SENTENCES = {
    "a photo of a small brown dog playing in the garden": "en",
    "ein kleiner brauner Hund spielt im Garten": "de",
    "un petit chien brun qui joue dans le jardin": "fr",
    "un perro marrón pequeño jugando en el jardín": "es",
}


def test_fasttext_tokens_follow_fasttexts_reader():
    assert fasttext_tokens("a red  apple") == ["a", "red", "apple"]
    assert fasttext_tokens("  tabs\tand\vfeeds\fand\rreturns\0nul ") == ["tabs", "and", "feeds", "and", "returns",
                                                                         "nul"]
    # A newline is a token of its own ("</s>"), so "apple\n" has two tokens and passes DataComp's "> 1 word" rule.
    assert fasttext_tokens("apple\n") == ["apple", "</s>"]
    assert fasttext_tokens("a\n\nb") == ["a", "</s>", "</s>", "b"]
    # Other Unicode spaces do not split (str.split() would).
    assert fasttext_tokens("red\u00a0apple") == ["red\u00a0apple"]
    assert fasttext_tokens("") == []


@pytest.mark.parametrize("model", [FASTTEXT, PY3LANGID])
def test_languages_of_plain_sentences(model):
    assert languages(list(SENTENCES), model) == list(SENTENCES.values())


def test_language_mask_replaces_newlines_and_accepts_a_model_file():
    texts = ["a photo of a dog\non the beach", "ein Hund\nam Strand bei Sonnenuntergang"]
    assert language_mask(texts, "en").tolist() == [True, False]
    by_path = language_mask(texts, "en", str(bundled_fasttext_model()))
    assert np.array_equal(by_path, language_mask(texts, "en"))


def test_unknown_language_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fastText model file"):
        language_mask(["hello"], "en", "lid.999.bin")
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"not a model")
    with pytest.raises(RuntimeError, match="broken.bin"):
        language_mask(["hello"], "en", str(bad))
