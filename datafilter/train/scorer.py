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
