"""The offline scorer: a CLIP trained on a clean, curated pool with more compute than a benchmark run.

DataComp's CLIP score comes from OpenAI's CLIP, a far stronger model than the ones a benchmark trains. Offline there is
no such model, so the project trains one the way Data Filtering Networks do: the same kind of CLIP, trained on clean
pairs only (the official names and tags of the emoji and icons, no noise), for several times the samples of a micro
benchmark run. ``embed`` uses the newest cached scorer by default.

Cache layout, keyed by the clean pool's id and the training recipe (so a new pool or recipe never reuses a model)::

    $DATAFILTER_CACHE/scorer/KEY/run/        the training run (resumable; see ``datafilter.train.loop``)
    $DATAFILTER_CACHE/scorer/KEY/scorer.pt   the model (a copy of the run's final checkpoint)
    $DATAFILTER_CACHE/scorer/KEY/scorer.json model name, checkpoint sha256, version, recipe, pool id, zero-shot
                                             results; written last, so only finished scorers are ever found

A release is a finished scorer copied out of the cache into a folder of its own (``scorer.pt`` and ``scorer.json``,
the latter also naming the clean-pool recipe it was trained from), to be shipped. DataComp scores its pools with
OpenAI's released CLIP rather than training one; the project ships the scorer of the micro benchmark the same way
(``scorers/micro``), so every user scores the micro pool with the same weights and a first run does not spend the
scorer's training. A benchmark uses a release only when the release's recipe is the one it would train (clean-pool
recipe, training recipe, scorer version), installing it into the cache under the key that training would give it;
``datafilter bench --redo scorer`` or ``datafilter scorer train`` trains one from the recipe instead.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from datafilter.common.files import atomic_path, cache_root, read_json, sha256_file, stable_hash, write_json
from datafilter.models import ModelSpec
from datafilter.train.config import TrainConfig

log = logging.getLogger(__name__)

SCORER_MODEL = "datafilter-scorer-vit"
SCORER_VERSION = 2
SCORER_FILE = "scorer.json"
RELEASE_CHECKPOINT = "scorer.pt"
# Where ``datafilter scorer train`` builds the clean pool when none is given (paths relative to the working folder).
DEFAULT_POOL_RECIPE = Path("pools/scorer.yaml")
DEFAULT_POOL_DIR = Path("work/pools/scorer")

# The recipe: the micro benchmark's optimiser settings, a bigger model and 3x its samples seen. Raw captions (no
# templates): the scorer is asked about the pools' own captions. Grey and low-resolution copies teach it that line
# art, monochrome styles and blurry digits still show the same things.
SCORER_CONFIG = TrainConfig(model=SCORER_MODEL, samples_seen=393_216, batch_size=256, lr=2e-3, warmup=100,
                            greyscale=0.2, low_res=0.2, checkpoint_every=200)


def scorer_root() -> Path:
    return cache_root() / "scorer"


def scorer_key(pool_id: str, cfg: TrainConfig) -> str:
    return stable_hash({"pool_id": pool_id, "recipe": cfg.recipe(), "version": SCORER_VERSION})


def train_scorer(pool_dir: str | Path, suite_dir: str | Path | None = None, cfg: TrainConfig = SCORER_CONFIG, *,
                 threads: int | None = None, device: str = "auto", retrain: bool = False) -> dict[str, Any]:
    """Train (or resume, or find) the scorer for this clean pool; evaluate it on the suite if given. ``retrain``
    discards a cached scorer of the same key first."""
    from datafilter.pool import Pool
    from datafilter.train.loop import train

    pool = Pool(pool_dir)
    key = scorer_key(pool.pool_id, cfg)
    folder = scorer_root() / key
    if retrain:
        shutil.rmtree(folder, ignore_errors=True)
    info_path = folder / SCORER_FILE
    if info_path.exists():
        info = read_json(info_path)
        log.info("scorer %s already trained (%s)", key, info_path)
    else:
        for old_key, differs in _not_reused(pool, cfg):
            if differs:
                log.info("cached scorer %s was trained on %s too, but its %s differs: training a new one (%s)",
                         old_key, pool.path, " and ".join(differs), key)
        result = train(pool.path, folder / "run", cfg, threads=threads, device=device)
        model_path = folder / "scorer.pt"
        with atomic_path(model_path) as tmp:
            shutil.copyfile(result.checkpoint, tmp)
        info = {
            "key": key, "model": cfg.model, "checkpoint": model_path.name,
            "checkpoint_sha256": sha256_file(model_path), "version": SCORER_VERSION, "config": cfg.to_json(),
            "pool_id": pool.pool_id, "pool": str(pool.path), "pool_samples": pool.num_samples,
            "train_seconds": result.seconds, "final_loss": result.final_loss,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "zeroshot": None,
        }
        write_json(info_path, info)
    if suite_dir is not None:
        info = evaluate_scorer(folder, suite_dir, device=device)
    return {**info, "path": str(folder)}


def _not_reused(pool, cfg: TrainConfig) -> list[tuple[str, list[str]]]:
    """Cached scorers of the same pool folder, each with what keeps its key from matching: without this, a changed
    pool, recipe or scorer version would retrain silently and look like a cache that does not work."""
    recipe = json.loads(json.dumps(cfg.recipe()))  # tuples as the stored JSON has them: lists
    out = []
    for old in list_scorers():
        if old.get("pool") != str(pool.path):
            continue
        stored = old.get("config") or {}
        differs = [what for what, same in (
            ("pool id (the pool's content, or how its id is computed)", old.get("pool_id") == pool.pool_id),
            ("recipe", {k: stored.get(k) for k in recipe} == recipe),
            ("scorer version", old.get("version") == SCORER_VERSION)) if not same]
        out.append((old["key"], differs))
    return out


def evaluate_scorer(folder: str | Path, suite_dir: str | Path, device: str = "auto") -> dict[str, Any]:
    """Evaluate a cached scorer zero-shot on a suite and store the results in its ``scorer.json``."""
    from datafilter.evaluate import evaluate_suite, load_suite
    from datafilter.evaluate.suite import results_current
    from datafilter.models import load_model, pick_device

    folder = Path(folder)
    info = read_json(folder / SCORER_FILE)
    suite = load_suite(suite_dir)
    if results_current(info.get("zeroshot"), info["checkpoint_sha256"], suite.suite_id):
        return info
    spec = ModelSpec(info["model"], checkpoint=str(folder / info["checkpoint"]))
    model = load_model(spec, device=pick_device(device))
    results = evaluate_suite(model, suite, out=folder / "zeroshot.json", checkpoint=spec.checkpoint)
    info["zeroshot"] = results
    write_json(folder / SCORER_FILE, info)
    return info


def list_scorers() -> list[dict[str, Any]]:
    """Every finished scorer in the cache, oldest first, each with its folder as ``path``."""
    root = scorer_root()
    found = []
    for info_path in sorted(root.glob(f"*/{SCORER_FILE}")) if root.exists() else []:
        info = read_json(info_path)
        found.append({**info, "path": str(info_path.parent)})
    return sorted(found, key=lambda d: (d.get("created", ""), d["path"]))


def find_scorer(key: str | None = None) -> dict[str, Any]:
    """The scorer with this cache key (a unique prefix will do), or the newest one."""
    scorers = list_scorers()
    if not scorers:
        raise FileNotFoundError(
            f"no trained scorer in {scorer_root()}; build one with `datafilter scorer train` (it builds the clean "
            f"pool from {DEFAULT_POOL_RECIPE} when --pool is not given)")
    if key is None:
        return scorers[-1]
    hits = [s for s in scorers if s["key"].startswith(key)]
    if len(hits) != 1:
        raise FileNotFoundError(f"{'no' if not hits else 'more than one'} scorer in {scorer_root()} matches {key!r}; "
                                f"known: {', '.join(s['key'] for s in scorers)}")
    return hits[0]


def default_scorer_spec() -> ModelSpec:
    """The newest cached scorer as a ``ModelSpec``; ``FileNotFoundError`` with the command to build one if none."""
    info = find_scorer()
    path = Path(info["path"]) / info["checkpoint"]
    if not path.exists():
        raise FileNotFoundError(f"{path} listed in {Path(info['path']) / SCORER_FILE} is missing; delete "
                                f"{info['path']} and run `datafilter scorer train` again")
    return ModelSpec(info["model"], checkpoint=str(path))


class ReleaseError(ValueError):
    """A release folder that cannot be used: files missing, or a checkpoint that is not the one it describes."""


def pool_recipe_id(recipe_path: str | Path) -> dict[str, str]:
    """What identifies a clean-pool recipe in a release: its name and the hash of the settings that decide the pool's
    bytes (the same settings that key a built pool's folder)."""
    from datafilter.micro.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    return {"name": recipe.name, "settings_sha256": stable_hash(recipe.pool_settings(), 64)}


def release_scorer(out: str | Path, pool_recipe: str | Path, key: str | None = None,
                   pool_dir: str | Path | None = None) -> dict[str, Any]:
    """Copy the cached scorer ``key`` (default: the newest) into the release folder ``out``, after checking that
    ``pool_recipe`` builds the clean pool it was trained on: the built pool (``pool_dir``, default the one the scorer
    records) must have the scorer's pool id and have been built from that recipe's pool settings."""
    from datafilter.micro.recipe import load_recipe
    from datafilter.pool import Pool
    from datafilter.pool.pool import PoolError

    info = find_scorer(key)
    pool_dir = Path(pool_dir or info.get("pool") or "")
    try:
        pool = Pool(pool_dir)
    except PoolError as e:
        raise ReleaseError(f"cannot check that {pool_recipe} builds scorer {info['key']}'s clean pool: {e}; pass "
                           f"--pool with the pool built from it") from None
    if pool.pool_id != info["pool_id"]:
        raise ReleaseError(f"{pool_dir} has pool id {pool.pool_id}; scorer {info['key']} was trained on pool "
                           f"{info['pool_id']}")
    recipe = load_recipe(pool_recipe)
    try:
        built = dict(read_json(pool_dir / "build.json").get("recipe_settings") or {})
    except (OSError, ValueError):
        raise ReleaseError(f"{pool_dir} has no readable build.json: it was not built from a recipe") from None
    built.pop("suite", None)
    if built != json.loads(json.dumps(recipe.pool_settings())):  # tuples as the stored JSON has them: lists
        raise ReleaseError(f"{pool_dir} was not built from {pool_recipe} as it reads now (its pool settings differ)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / RELEASE_CHECKPOINT) as tmp:
        shutil.copyfile(Path(info["path"]) / info["checkpoint"], tmp)
    keep = ("key", "model", "checkpoint_sha256", "version", "config", "pool_id", "pool_samples", "train_seconds",
            "final_loss", "created", "zeroshot")
    zeroshot = info.get("zeroshot")
    if zeroshot:  # no path of this machine: the checkpoint is the released file, the suite is known by its id
        suite = {k: v for k, v in (zeroshot.get("suite") or {}).items() if k != "path"}
        zeroshot = {**zeroshot, "checkpoint": RELEASE_CHECKPOINT, "suite": suite}
    release = {**{k: info.get(k) for k in keep}, "zeroshot": zeroshot, "checkpoint": RELEASE_CHECKPOINT,
               "pool_recipe": pool_recipe_id(pool_recipe),
               "recipe_settings": json.loads(json.dumps(recipe.to_dict()))}
    if sha256_file(out / RELEASE_CHECKPOINT) != release["checkpoint_sha256"]:
        raise ReleaseError(f"the copy of {info['path']}'s checkpoint in {out} does not match its recorded sha256")
    write_json(out / SCORER_FILE, release)
    return {**release, "path": str(out)}


def read_release(folder: str | Path, check_checkpoint: bool = True) -> dict[str, Any]:
    """A release folder's ``scorer.json``, after checking that its checkpoint is there and (``check_checkpoint``)
    is the one it describes."""
    folder = Path(folder)
    try:
        info = read_json(folder / SCORER_FILE)
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{folder} is not a scorer release: cannot read {folder / SCORER_FILE} ({e}); "
                           f"`datafilter scorer release` makes one") from None
    missing = [k for k in ("key", "model", "checkpoint", "checkpoint_sha256", "version", "config", "pool_id",
                           "pool_recipe") if k not in info]
    if missing:
        raise ReleaseError(f"{folder / SCORER_FILE} lacks {', '.join(missing)}; `datafilter scorer release` "
                           f"writes a complete one")
    ckpt = folder / info["checkpoint"]
    if not ckpt.is_file():
        raise ReleaseError(f"{ckpt}, the checkpoint of the scorer release {folder}, is missing")
    if check_checkpoint and sha256_file(ckpt) != info["checkpoint_sha256"]:
        raise ReleaseError(f"{ckpt} is not the checkpoint {folder / SCORER_FILE} describes (sha256 differs): a "
                           f"partial copy, or a Git LFS pointer instead of the file")
    return info


def release_differs(release: dict[str, Any], pool_recipe: str | Path, cfg: TrainConfig) -> list[str]:
    """What keeps ``release`` from being the scorer that training ``cfg`` on the pool of ``pool_recipe`` would
    give: nothing (an empty list), or the parts that differ."""
    recipe = json.loads(json.dumps(cfg.recipe()))  # tuples as the stored JSON has them: lists
    stored = release.get("config") or {}
    differs = [what for what, same in (
        ("clean-pool recipe", release.get("pool_recipe") == pool_recipe_id(pool_recipe)),
        ("training recipe", {k: stored.get(k) for k in recipe} == recipe),
        ("scorer version", release.get("version") == SCORER_VERSION)) if not same]
    if not differs and release.get("key") != scorer_key(release.get("pool_id", ""), cfg):
        differs.append("cache key (its scorer.json contradicts itself)")
    return differs


def use_release(folder: str | Path, pool_recipe: str | Path, cfg: TrainConfig = SCORER_CONFIG,
                suite_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The release in ``folder`` as a cached scorer, evaluated on ``suite_dir`` if given (its stored results are
    reused when current); None, saying why, when it is not the scorer that ``pool_recipe`` and ``cfg`` would train.

    It is installed under the key that training would give it. A scorer already cached under that key is of the same
    pool and recipe, and is used as it is (``--redo scorer`` makes one that way)."""
    release = read_release(folder)
    differs = release_differs(release, pool_recipe, cfg)
    if differs:
        log.warning("the released scorer in %s is not used: its %s %s from this benchmark's (%s); training one "
                    "from the recipe", folder, " and ".join(differs), "differ" if len(differs) > 1 else "differs",
                    pool_recipe)
        return None
    target = scorer_root() / release["key"]
    if (target / SCORER_FILE).exists():
        log.info("scorer %s (released in %s) already in the cache", release["key"], folder)
    else:
        target.mkdir(parents=True, exist_ok=True)
        with atomic_path(target / RELEASE_CHECKPOINT) as tmp:
            shutil.copyfile(Path(folder) / release["checkpoint"], tmp)
        write_json(target / SCORER_FILE, {**release, "checkpoint": RELEASE_CHECKPOINT, "released": str(folder),
                                          "pool": None})
        log.info("released scorer %s installed from %s into %s", release["key"], folder, target)
    info = evaluate_scorer(target, suite_dir) if suite_dir is not None else read_json(target / SCORER_FILE)
    return {**info, "path": str(target)}


def scorer_config(samples_seen: int | None = None, seed: int | None = None, **runtime: Any) -> TrainConfig:
    """The scorer recipe with the samples seen or seed changed (a different cache key) and execution knobs set."""
    return replace(SCORER_CONFIG, **{k: v for k, v in dict(samples_seen=samples_seen, seed=seed, **runtime).items()
                                     if v is not None})


def default_pool(workers: int = 2) -> Path:
    """The clean pool at ``work/pools/scorer``, built from ``pools/scorer.yaml`` first if needed."""
    if (DEFAULT_POOL_DIR / "build.json").exists():
        return DEFAULT_POOL_DIR
    if not DEFAULT_POOL_RECIPE.exists():
        raise FileNotFoundError(f"no clean pool given and no {DEFAULT_POOL_RECIPE} to build one from; pass "
                                f"--pool CLEAN_POOL_DIR")
    from datafilter.micro.poolbuild import build_pool
    from datafilter.micro.recipe import load_recipe

    log.info("building the clean scorer pool from %s into %s", DEFAULT_POOL_RECIPE, DEFAULT_POOL_DIR)
    build_pool(load_recipe(DEFAULT_POOL_RECIPE), DEFAULT_POOL_DIR, workers=workers)
    return DEFAULT_POOL_DIR
