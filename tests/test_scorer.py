"""The offline scorer: cached by pool and recipe, found by ``default_scorer_spec``, checkpoints checked on load."""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest
import torch

from conftest import write_toy_pool
from datafilter.cli import main
from datafilter.common.files import read_json, sha256_file
from datafilter.models import CheckpointError, ModelSpec, create_model, load_model, save_checkpoint
from datafilter.train.scorer import SCORER_CONFIG, SCORER_VERSION, default_scorer_spec, list_scorers, train_scorer
from test_evaluate import write_toy_suite

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAFILTER_CACHE", str(tmp_path / "cache"))


def tiny_recipe(**kw):
    return replace(SCORER_CONFIG, model="datafilter-nano-vit", samples_seen=64 * 60, batch_size=64, lr=5e-3,
                   warmup=5, checkpoint_every=1000, decode_workers=1, **kw)


def test_no_scorer_says_how_to_build_one():
    with pytest.raises(FileNotFoundError, match="datafilter scorer train"):
        default_scorer_spec()


def test_scorer_is_trained_cached_evaluated_and_found(tmp_path, capsys, caplog):
    pool = write_toy_pool(tmp_path / "pool", n=96, shard_size=32)
    suite = write_toy_suite(tmp_path / "suite")
    info = train_scorer(pool, suite, tiny_recipe(), threads=1)
    stored = read_json(tmp_path / "cache" / "scorer" / info["key"] / "scorer.json")
    ckpt = tmp_path / "cache" / "scorer" / info["key"] / stored["checkpoint"]
    assert stored["checkpoint_sha256"] == sha256_file(ckpt)
    assert stored["version"] == SCORER_VERSION and stored["model"] == "datafilter-nano-vit"
    assert stored["config"]["samples_seen"] == 64 * 60 and stored["pool_id"]
    tasks = stored["zeroshot"]["tasks"]
    assert tasks["things"]["main"] > 2 * tasks["things"]["chance"]

    spec = default_scorer_spec()
    assert spec == ModelSpec("datafilter-nano-vit", checkpoint=str(ckpt))
    assert load_model(spec).checkpoint_id == stored["checkpoint_sha256"]

    # Same pool and recipe: found, not retrained, and not evaluated again on the same suite.
    zeroshot = tmp_path / "cache" / "scorer" / info["key"] / "zeroshot.json"
    mtime = zeroshot.stat().st_mtime_ns
    assert train_scorer(pool, suite, tiny_recipe())["created"] == stored["created"]
    assert zeroshot.stat().st_mtime_ns == mtime
    # Another recipe: another cache entry, and the newest is the default.
    assert train_scorer(pool, None, tiny_recipe())["created"] == stored["created"]
    with caplog.at_level("INFO", logger="datafilter.train.scorer"):
        other = train_scorer(pool, None, tiny_recipe(seed=1), threads=1)
    assert other["key"] != info["key"] and len(list_scorers()) == 2
    # the retrain says which cached scorer of this pool was not reused, and why: the recipe, nothing else
    assert f"cached scorer {info['key']} was trained on {pool} too, but its recipe differs" in caplog.text
    assert default_scorer_spec().checkpoint.startswith(other["path"])

    assert main(["scorer", "eval", "--key", info["key"][:8]]) == 0
    out = capsys.readouterr().out
    assert "things" in out and "8.33%" in out  # chance of the 12-way task is printed beside the accuracy
    assert main(["scorer", "eval", "--key", other["key"]]) == 2  # no stored results and no --suite


def test_checkpoints_are_checked_against_the_model_name_and_read_weights_only(tmp_path, capfd):
    model, *_ = create_model("datafilter-nano-vit")
    path = save_checkpoint(model, "datafilter-nano-vit", tmp_path / "nano.pt")
    with pytest.raises(CheckpointError, match="holds a 'datafilter-nano-vit' model, not 'datafilter-micro-vit'"):
        load_model(ModelSpec("datafilter-micro-vit", checkpoint=str(path)))

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(CheckpointError, match="not a loadable weights-only checkpoint"):
        load_model(ModelSpec("datafilter-nano-vit", checkpoint=str(evil)))
    assert "code ran" not in capfd.readouterr().out


def test_a_released_scorer_is_used_only_for_the_recipe_it_was_trained_from(tmp_path, monkeypatch, caplog):
    import json
    import shutil
    from pathlib import Path

    from datafilter.micro.recipe import load_recipe
    from datafilter.train.scorer import ReleaseError, read_release, release_scorer, use_release

    root = Path(__file__).resolve().parents[1]
    recipe = root / "pools" / "scorer-nano.yaml"
    pool = write_toy_pool(tmp_path / "pool", n=96, shard_size=32)
    # the toy pool stands for the one the recipe builds: a micro build records the recipe it was built from
    (pool / "build.json").write_text(json.dumps({"recipe_settings": json.loads(json.dumps(
        load_recipe(recipe).to_dict()))}))
    suite = write_toy_suite(tmp_path / "suite")
    info = train_scorer(pool, suite, tiny_recipe(), threads=1)

    release = release_scorer(tmp_path / "release", recipe, key=info["key"])
    assert release["checkpoint_sha256"] == info["checkpoint_sha256"] == sha256_file(tmp_path / "release" / "scorer.pt")
    assert str(tmp_path) not in (tmp_path / "release" / "scorer.json").read_text()  # no path of this machine
    other_recipe = tmp_path / "other.yaml"
    other_recipe.write_text(recipe.read_text().replace("\nseed: 1\n", "\nseed: 2\n"))
    with pytest.raises(ReleaseError, match="not built from"):
        release_scorer(tmp_path / "bad", other_recipe, key=info["key"])

    # On a machine with an empty cache: installed under the key training would give it, with its stored
    # zero-shot results (same checkpoint, same suite), so nothing is trained or evaluated.
    monkeypatch.setenv("DATAFILTER_CACHE", str(tmp_path / "other-cache"))
    used = use_release(tmp_path / "release", recipe, tiny_recipe(), suite)
    assert used["key"] == info["key"] and used["path"] == str(tmp_path / "other-cache" / "scorer" / info["key"])
    assert sha256_file(Path(used["path"]) / used["checkpoint"]) == info["checkpoint_sha256"]
    assert used["zeroshot"]["tasks"] == info["zeroshot"]["tasks"] and used["released"] == str(tmp_path / "release")
    assert not (Path(used["path"]) / "zeroshot.json").exists()
    assert default_scorer_spec().checkpoint == str(Path(used["path"]) / "scorer.pt")

    # Another training recipe or clean-pool recipe: not used, and the log says what differs.
    with caplog.at_level("WARNING", logger="datafilter.train.scorer"):
        assert use_release(tmp_path / "release", recipe, tiny_recipe(seed=1)) is None
        assert use_release(tmp_path / "release", other_recipe, tiny_recipe()) is None
    assert "its training recipe differs" in caplog.text and "its clean-pool recipe differs" in caplog.text

    # A damaged copy (a partial download, a Git LFS pointer) is refused, naming the file.
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "release", broken)
    (broken / "scorer.pt").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ReleaseError, match="sha256 differs"):
        read_release(broken)
    assert read_release(broken, check_checkpoint=False)["key"] == info["key"]
