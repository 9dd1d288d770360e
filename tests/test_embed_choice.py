"""``embed`` without ``--model``: which offline scorer it takes, that it says so, and that it warns when a pool's
captions look nothing like the scorer's training captions."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from datafilter.common.files import write_json
from datafilter.embed.choice import caption_fit, choose_scorer
from datafilter.pool import ImageConfig, Pool, ShardWriter, make_uid

from conftest import shape_image

EMOJI_NAMES = ["grinning face", "red apple", "emoji of clutch bag", "flag: Saudi Arabia", "dog face", "red heart",
               "face with tears of joy", "green apple", "horse face", "sun with face", "man riding a horse",
               "woman surfing", "beach with umbrella", "sunset over buildings"]
PHOTO_CAPTIONS = ["A man riding a wave on top of a surfboard.", "Two dogs playing in the snow next to a fence",
                  "A plate of spaghetti with tomato sauce and basil", "A red double decker bus driving down a street",
                  "Woman in a black dress holding an umbrella in the rain", "Bowl of fresh fruit on a wooden table"]
WORLD = {"styles": {"pool": ["noto"]}, "limits": {"concepts": 120}, "imagenet_classes": 40, "image_size": 40}


def _pool(path: Path, captions: list[str], world: dict | None = None, name: str = "p") -> Path:
    path.mkdir(parents=True)
    w = ShardWriter(path, 0, ImageConfig(max_side=32, encode_format="png"))
    for i, caption in enumerate(captions * 3):
        w.add(shape_image("red", "circle", seed=i), caption, make_uid(name, str(i)))
    w.close()
    if world is not None:
        write_json(path / "build.json", {"recipe_settings": {"name": name, "seed": 1, **world}})
    return path


def _scorer(cache: Path, key: str, clean_pool: Path, created: str, model: str = "datafilter-scorer-vit") -> dict:
    folder = cache / "scorer" / key
    folder.mkdir(parents=True)
    checkpoint = folder / "scorer.pt"
    if model == "datafilter-scorer-vit":
        from datafilter.models import create_model, save_checkpoint

        save_checkpoint(create_model(model)[0], model, checkpoint)
    info = {"key": key, "model": model, "checkpoint": "scorer.pt", "pool": str(clean_pool), "pool_samples": 42,
            "created": created}
    write_json(folder / "scorer.json", info)
    return info


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("DATAFILTER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_scorer_of_the_same_micro_world_is_preferred_to_a_newer_one(tmp_path: Path, cache: Path):
    same = _pool(tmp_path / "clean_same", EMOJI_NAMES, WORLD, "scorer-nano")
    other = _pool(tmp_path / "clean_other", EMOJI_NAMES, {**WORLD, "imagenet_classes": 1000}, "scorer")
    _scorer(cache, "aaaa", same, "2024-01-01T00:00:00Z")
    _scorer(cache, "bbbb", other, "2024-06-01T00:00:00Z")
    nano = Pool(_pool(tmp_path / "nano", EMOJI_NAMES[:5], WORLD, "nano"))
    choice = choose_scorer(nano)
    assert choice.info["key"] == "aaaa" and choice.same_world is True
    text = choice.describe()
    assert "aaaa" in text and str(same) in text and "trained on this pool's micro world" in text and "'scorer-nano'" in text
    photos = Pool(_pool(tmp_path / "photos", PHOTO_CAPTIONS))  # no build.json: not a micro pool
    choice = choose_scorer(photos)
    assert choice.info["key"] == "bbbb" and choice.same_world is None and "not a micro pool" in choice.describe()


def test_a_released_scorer_is_matched_by_the_world_its_release_records(tmp_path: Path, cache: Path, caplog):
    from datafilter.common.files import read_json
    from datafilter.embed.choice import offline_scorer

    other = _pool(tmp_path / "clean_other", EMOJI_NAMES, {**WORLD, "imagenet_classes": 1000}, "scorer")
    _scorer(cache, "aaaa", other, "2024-01-01T00:00:00Z")
    released = _scorer(cache, "bbbb", tmp_path / "not-built", "2023-01-01T00:00:00Z")
    # installed from a release: its clean pool is not built here, its recipe's world is in scorer.json
    write_json(cache / "scorer" / "bbbb" / "scorer.json", {
        **released, "pool": None, "released": "scorers/nano", "recipe_settings": {"name": "scorer-nano", **WORLD}})
    nano = Pool(_pool(tmp_path / "nano", EMOJI_NAMES[:5], WORLD, "nano"))
    choice = choose_scorer(nano)
    assert choice.info["key"] == "bbbb" and choice.same_world is True
    assert "the clean pool of its release scorers/nano" in choice.describe() and "'scorer-nano'" in choice.describe()
    with caplog.at_level(logging.INFO, logger="datafilter.embed.choice"):
        offline_scorer(nano)
    assert "it was released (scorers/nano)" in caplog.text and "is gone" not in caplog.text
    assert read_json(cache / "scorer" / "bbbb" / "scorer.json")["pool"] is None


def test_photo_captions_look_unlike_emoji_names_and_the_pool_itself_does_not(tmp_path: Path):
    clean = _pool(tmp_path / "clean", EMOJI_NAMES)
    own = caption_fit(Pool(_pool(tmp_path / "own", EMOJI_NAMES[::-1])), clean)
    assert own.words == 1.0 and own.pairs == 1.0 and not own.unlike
    photos = caption_fit(Pool(_pool(tmp_path / "photos", PHOTO_CAPTIONS)), clean)
    assert photos.words > 0.2 and photos.pairs < 0.5 and photos.unlike  # shared words, unlike sentences
    assert photos.median_words > photos.training_median_words
    assert caption_fit(Pool(tmp_path / "photos"), tmp_path / "gone") is None


def test_embed_without_a_model_names_the_scorer_and_warns_on_photo_captions(tmp_path: Path, cache: Path, caplog):
    from datafilter.cli import main

    clean = _pool(tmp_path / "clean", EMOJI_NAMES, WORLD, "scorer-nano")
    info = _scorer(cache, "cafe1234", clean, "2024-01-01T00:00:00Z")
    photos = _pool(tmp_path / "photos", PHOTO_CAPTIONS)
    with caplog.at_level(logging.INFO, logger="datafilter"):
        assert main(["embed", str(photos), "--workers", "0", "--threads", "1", "--no-progress"]) == 0
    assert f"using the offline scorer cafe1234 (datafilter-scorer-vit" in caplog.text
    assert f"trained on {clean}" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("look unlike the offline scorer's training data" in w and "open_clip" in w for w in warnings), warnings
    caplog.clear()
    own = _pool(tmp_path / "own", EMOJI_NAMES[::-1], WORLD, "nano")
    with caplog.at_level(logging.INFO, logger="datafilter"):
        assert main(["embed", str(own), "--workers", "0", "--threads", "1", "--no-progress"]) == 0
    assert "caption fit: 100% of the caption words" in caplog.text and "look unlike" not in caplog.text
    assert info["key"] in caplog.text
