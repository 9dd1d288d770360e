"""``datafilter pool build RECIPE``: plan every sample from the recipe and seed, render, write shards.

The plan (which artwork, which placement seed, which caption, which noise) is made in one process from one seeded
generator, then cut into shards that worker processes write through ``ShardWriter``; a shard's bytes depend only on
its part of the plan, so the worker count never changes the output, and a rerun skips shards already complete.
The ground truth (what was corrupted, and how) goes to ``ground_truth.parquet`` beside the shards, never into them.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datafilter.common.executor import ShardJob, run_shard_jobs
from datafilter.common.files import atomic_path, read_json, stable_hash, write_json
from datafilter.micro import captions as cap
from datafilter.micro.catalog import LOCALES, locale_labels
from datafilter.micro.compose import COLOURS, Composer, png_bytes
from datafilter.micro.recipe import NOISE_KINDS, Recipe, RecipeError
from datafilter.micro.world import World, emoji_collection
from datafilter.pool.format import GROUND_TRUTH

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Planned:
    spec: tuple
    caption: str
    source: str  # the honest, web-like origin field stored in the shards ("emoji", "icon", ...)
    noise: str
    part: str
    concept: str
    style: str


def _split(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Integer counts proportional to ``weights`` that add up to ``total`` exactly (largest remainders)."""
    s = sum(weights.values())
    raw = {k: total * w / s for k, w in weights.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (out[k] - raw[k], k))[: total - sum(out.values())]:
        out[k] += 1
    return out


class Planner:
    def __init__(self, world: World):
        self.w = world
        self.r = world.recipe
        self.rng = np.random.default_rng([self.r.seed, 20_240_601])

    def seed(self) -> int:
        return int(self.rng.integers(0, 2**62))

    def _cycle(self, items: list, n: int) -> list:
        """``n`` items: whole shuffled passes over ``items``, then a random part of one more."""
        if not items or n <= 0:
            return []
        out = []
        while len(out) < n:
            out.extend(items[int(i)] for i in self.rng.permutation(len(items)))
        return out[:n]

    # --- clean pairs ----------------------------------------------------------------------------------------------
    def emoji(self, n: int) -> list[Planned]:
        cs = self.w.concepts
        out = []
        for style, h in self._cycle(self.w.pool_emoji, n):
            out.append(Planned(("art", emoji_collection(style), h, self.seed()), cap.emoji_caption(cs[h], self.rng),
                               "emoji", "clean", "emoji", h, style))
        return out

    def icons(self, n: int) -> list[Planned]:
        from datafilter.micro.catalog import icons

        allv = icons()
        return [Planned(("art", "tabler", k, self.seed()), cap.icon_caption(allv[k], self.rng), "icon", "clean",
                        "icons", allv[k].name, allv[k].style) for k in self._cycle(self.w.icons_pool, n)]

    def digits(self, n: int) -> list[Planned]:
        return [Planned(("art", "mnist", k, self.seed()), cap.digit_caption(int(k[0]), self.rng), "digits", "clean",
                        "digits", k[0], "mnist") for k in self._cycle(self.w.digits_pool, n)]

    def clipart(self, n: int) -> list[Planned]:
        c = self.w.clipart
        return [Planned(("art", "openclipart", k, self.seed()), cap.clipart_caption(c[k], self.rng), "clipart",
                        "clean", "clipart", c[k].title, "openclipart") for k in self._cycle(self.w.clipart_pool, n)]

    def composites(self, n: int) -> list[Planned]:
        """Counting, position and size scenes of pool-style emoji, and icons in named colours."""
        from datafilter.micro.catalog import icons

        cs, allv = self.w.concepts, icons()
        kinds = _split(n, {"count": 1, "pos": 1, "size": 1, "tint": 1 if self.w.icons_pool else 0})
        out = []
        for style, h in self._cycle(self.w.pool_emoji, kinds["count"]):
            k = int(self.rng.integers(1, 6))
            out.append(Planned(("count", emoji_collection(style), h, k, self.seed()),
                               cap.count_caption(cs[h], k, self.rng), "emoji", "clean", "counting", h, style))
        for style, h in self._cycle(self.w.pool_emoji, kinds["pos"]):
            cell = int(self.rng.integers(9))
            out.append(Planned(("pos", emoji_collection(style), h, cell, self.seed()),
                               cap.position_caption(cs[h], cell, self.rng), "emoji", "clean", "position", h, style))
        for style, h in self._cycle(self.w.pool_emoji, kinds["size"]):
            large = bool(self.rng.random() < 0.5)
            out.append(Planned(("size", emoji_collection(style), h, large, self.seed()),
                               cap.size_caption(cs[h], large, self.rng), "emoji", "clean", "size", h, style))
        names = list(COLOURS)
        for k in self._cycle(self.w.icons_pool, kinds["tint"]):
            colour = names[int(self.rng.integers(len(names)))]
            out.append(Planned(("tint", "tabler", k, colour, self.seed()),
                               cap.colour_caption(allv[k], colour, self.rng), "icon", "clean", "colour",
                               allv[k].name, allv[k].style))
        return out

    # --- noise ----------------------------------------------------------------------------------------------------
    def _reseed(self, spec: tuple) -> tuple:
        return spec[:-1] + (self.seed(),)

    def mismatched(self, clean: list[Planned], n: int) -> list[Planned]:
        out = []
        several = len({x.concept for x in clean}) > 1  # else no caption of another concept exists
        for i in range(n):
            a = clean[int(self.rng.integers(len(clean)))]
            b = clean[int(self.rng.integers(len(clean)))]
            while b.concept == a.concept and several:
                b = clean[int(self.rng.integers(len(clean)))]
            out.append(Planned(self._reseed(a.spec), b.caption, a.source, "mismatched_caption", a.part, a.concept,
                               a.style))
        return out

    def boilerplate(self, clean: list[Planned], n: int) -> list[Planned]:
        out = []
        for _ in range(n):
            a = clean[int(self.rng.integers(len(clean)))]
            out.append(Planned(self._reseed(a.spec), cap.boilerplate_caption(self.rng), a.source,
                               "boilerplate_caption", a.part, a.concept, a.style))
        return out

    def spam(self, n: int) -> list[Planned]:
        """A few pictures repeated many times with pixel jitter; group sizes are skewed, as spam is."""
        from datafilter.micro.catalog import icons

        cs, allv = self.w.concepts, icons()
        bases = [("emoji", emoji_collection(s), h, cs[h].name, s) for s, h in self.w.pool_emoji]
        bases += [("icon", "tabler", k, allv[k].words, allv[k].style) for k in self.w.icons_pool]
        if not bases or n <= 0:
            return []
        groups = [bases[int(i)] for i in self.rng.permutation(len(bases))[: max(1, self.r.pool.spam_groups)]]
        weights = 1.0 / np.arange(1, len(groups) + 1)
        which = self.rng.choice(len(groups), size=n, p=weights / weights.sum())
        out = []
        for g in which:
            src, coll, key, words, style = groups[int(g)]
            out.append(Planned(("spam", coll, key, self.seed()), cap.spam_caption(words, int(g)), src,
                               "near_duplicate_spam", "spam", key, style))
        return out

    def off_topic(self, clean: list[Planned], n: int) -> list[Planned]:
        apps = self.w.apps
        kinds = _split(n, {"app": 2 if apps else 0, "blank": 1, "static": 1})
        sources = ["emoji", "icon", "clipart", "digits"]
        out = []
        for app in self._cycle(apps, kinds["app"]):
            out.append(Planned(("art", "papirus", app, self.seed()), cap.app_caption(app, self.rng), "icon",
                               "off_topic_image", "apps", app, "papirus"))
        for kind in ["blank"] * kinds["blank"] + ["static"] * kinds["static"]:
            a = clean[int(self.rng.integers(len(clean)))]
            text = a.caption if self.rng.random() < 0.7 else cap.boilerplate_caption(self.rng)
            out.append(Planned((kind, self.seed()), text, sources[int(self.rng.integers(len(sources)))],
                               "off_topic_image", kind, "", ""))
        return out

    def non_english(self, n: int) -> list[Planned]:
        labels = {loc: locale_labels(loc) for loc in LOCALES}
        items = [(s, h) for s, h in self.w.pool_emoji]
        out = []
        for style, h in self._cycle(items, n):
            locs = [loc for loc in LOCALES if h in labels[loc]]
            if not locs:
                continue
            loc = locs[int(self.rng.integers(len(locs)))]
            out.append(Planned(("art", emoji_collection(style), h, self.seed()), labels[loc][h], "emoji",
                               "non_english_caption", f"emoji/{loc}", h, style))
        return out

    def plan(self) -> list[Planned]:
        p = self.r.pool
        noise_n = {k: int(round(p.size * p.noise.get(k, 0.0))) for k in NOISE_KINDS}
        n_clean = p.size - sum(noise_n.values())
        have = {"emoji": self.w.pool_emoji, "icons": self.w.icons_pool, "digits": self.w.digits_pool,
                "clipart": self.w.clipart_pool, "composites": self.w.pool_emoji}
        weights = {k: v for k, v in p.clean_mix.items() if v > 0 and have[k]}
        for k in sorted(set(p.clean_mix) - set(weights)):
            if p.clean_mix[k] > 0:
                log.warning("pool part %s has no items (source missing or limited to 0); its share goes to the rest", k)
        if not weights:
            raise RuntimeError("no clean items at all: install the sources (datafilter sources install)")
        counts = _split(n_clean, weights)
        clean = []
        for part in sorted(counts):
            clean += getattr(self, part)(counts[part])
        noisy = (self.mismatched(clean, noise_n["mismatched_caption"])
                 + self.boilerplate(clean, noise_n["boilerplate_caption"])
                 + self.spam(noise_n["near_duplicate_spam"])
                 + self.off_topic(clean, noise_n["off_topic_image"])
                 + self.non_english(noise_n["non_english_caption"]))
        everything = clean + noisy
        order = self.rng.permutation(len(everything))
        return [everything[int(i)] for i in order]


def needed_renders(plan: list[Planned]) -> dict[str, set[str]]:
    need: dict[str, set[str]] = {}
    for s in plan:
        if s.spec[0] not in ("blank", "static"):
            need.setdefault(s.spec[1], set()).add(s.spec[2])
    return need


def _write_shard(job: ShardJob) -> dict:
    from datafilter.micro.render import MissingRender, RenderSet
    from datafilter.pool import ImageConfig, ShardWriter

    p = job.payload
    renders = {c: RenderSet.open(Path(d), p["render_size"]) for c, d in p["renders"].items()}
    comp = Composer(renders, p["image_size"], p["augment"])
    # Images are made at their final size and encoded once here; the writer checks them and stores them as they are.
    w = ShardWriter(Path(p["out"]), p["index"], ImageConfig(max_side=p["image_size"], encode_format="png"),
                    reprocess=False)
    for uid, spec, caption, src in p["samples"]:
        try:
            img = comp.make(spec)
        except MissingRender:  # the artwork failed to render: counted like any unusable sample
            w.skip("render_failed")
            continue
        w.add(png_bytes(img), caption, uid, {"source": src}, ext="png")
    return w.close({"recipe": p["recipe"], "seed": p["seed"]})


def build_pool(recipe: Recipe, out: Path, workers: int = 2) -> dict:
    """Build the pool of ``recipe`` into ``out``; returns the build summary (also written to ``build.json``)."""
    from datafilter.pool import make_uid

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    request = {"recipe": recipe.name, "seed": recipe.seed, "key": stable_hash(recipe.pool_settings())}
    request_path = out / "build_request.json"
    if request_path.exists() and read_json(request_path) != request:
        raise RecipeError(f"{out} holds (part of) a build of another recipe or seed ({request_path}); choose another "
                          f"--out or delete it")
    write_json(request_path, request)
    world = World(recipe, workers=workers)
    log.info("planning %s (seed %d): %d samples", recipe.name, recipe.seed, recipe.pool.size)
    plan = Planner(world).plan()
    uids = [make_uid("datafilter-micro", recipe.name, str(recipe.seed), str(i)) for i in range(len(plan))]
    renders = {}
    for coll, keys in sorted(needed_renders(plan).items()):
        renders[coll] = world.render(coll, sorted(keys))
    failed = {c: sum(1 for k in needed_renders(plan)[c] if k not in rs) for c, rs in renders.items()}
    size = recipe.pool.shard_size
    jobs = []
    for si in range((len(plan) + size - 1) // size):
        lo, hi = si * size, min(len(plan), (si + 1) * size)
        samples = [(uids[i], plan[i].spec, plan[i].caption, plan[i].source) for i in range(lo, hi)]
        payload = {"out": str(out), "index": si, "samples": samples, "image_size": recipe.image_size,
                   "render_size": recipe.render_size, "augment": recipe.pool.augment, "recipe": recipe.name,
                   "seed": recipe.seed, "renders": {c: str(rs.directory) for c, rs in renders.items()}}
        jobs.append(ShardJob(f"{si:08d}", out / f"{si:08d}_stats.json", payload))
    run_shard_jobs(jobs, _write_shard, workers=workers, desc=f"pool {recipe.name}")
    if not all(j.done for j in jobs):  # other launch ranks are still writing their shards
        log.warning("%s: this rank's shards are done, others are not; once every rank has finished, run the same "
                    "build again (one process) to write the ground truth and build.json", out)
        return {}

    from datafilter.pool import Pool

    pool = Pool(out)
    written = set(pool.metadata(["uid"]).column("uid").to_pylist())
    keep = [i for i, u in enumerate(uids) if u in written]
    gt = pa.table({
        "uid": pa.array([uids[i] for i in keep], pa.string()),
        "noise": pa.array([plan[i].noise for i in keep], pa.string()),
        "part": pa.array([plan[i].part for i in keep], pa.string()),
        "source": pa.array([plan[i].source for i in keep], pa.string()),
        "concept": pa.array([plan[i].concept for i in keep], pa.string()),
        "style": pa.array([plan[i].style for i in keep], pa.string()),
        "shard": pa.array([f"{i // size:08d}" for i in keep], pa.string()),
    })
    with atomic_path(out / GROUND_TRUTH) as tmp:
        pq.write_table(gt, tmp, compression="zstd")
    counts = Counter(plan[i].noise for i in keep)
    summary = {
        "recipe": recipe.name, "seed": recipe.seed, "samples": len(keep), "planned": len(plan),
        "noise": {k: counts.get(k, 0) for k in ("clean",) + NOISE_KINDS},
        "parts": dict(sorted(Counter(plan[i].part for i in keep).items())),
        "render_failures": failed,
        "render_versions": {c: world.version(c) for c in renders},
        "recipe_settings": recipe.to_dict(),
    }
    write_json(out / "build.json", summary)
    return summary
