"""``datafilter suite build RECIPE``: the micro evaluation suite, in CLIP_benchmark's webdataset layout.

Groups follow DataComp's: "ImageNet" (emoji concepts in a style the pool never uses), its distribution shifts (the same
concepts in other held-out styles), VTAB-like tasks and retrieval. Each task directory holds ``classnames.txt``,
``zeroshot_classification_templates.txt`` and ``test/{nshards.txt, 0.tar, ...}``; ``suite.json`` lists the tasks.
Before anything is written, every evaluation image is compared with everything the pool may contain (exact pixels and
grey-thumbnail cosine); evaluation images that match are dropped and counted in ``suite.json``.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from datafilter.common.files import write_json
from datafilter.micro import captions as cap
from datafilter.micro.catalog import icons
from datafilter.micro.compose import CELLS, COLOURS, COUNT_WORDS, SIZES, Composer, png_bytes
from datafilter.micro.overlap import OverlapIndex
from datafilter.micro.recipe import Recipe
from datafilter.micro.render import MissingRender
from datafilter.micro.world import World, emoji_collection
from datafilter.pool.format import tar_member

log = logging.getLogger(__name__)

SUITE_VERSION = 2  # 2: ImageNet with icon classes, train split from the test styles, vocabulary for text-based
SAMPLES_PER_TAR = 10_000
VOCABULARY_FILE = "vocabulary.txt"

T_CONCEPT = ("a {c}.", "an emoji of a {c}.", "{c} emoji", "a drawing of a {c}.", "{c} sticker", "{c}",
             "an illustration of a {c}.", "a picture of a {c}.", "{c} icon", "an icon of a {c}.")
T_FLAG = ("flag of {c}", "the flag of {c}.", "{c} flag", "flag: {c}")
T_DIGIT = ("the number {c}", "handwritten digit {c}", "a handwritten {c}", "{c}")
T_GROUP = ("{c} emoji", "an emoji from {c}.", "{c}")
T_ICON_CATEGORY = ("{c} icon", "a {c} icon.", "an icon about {c}.")
T_COUNT = ("{c} emojis", "{c} stickers", "a picture of {c} emojis.")
T_POSITION = ("an emoji in the {c}", "something at the {c}", "emoji in the {c}")
T_SIZE = ("a {c} emoji", "{c} emoji", "a {c} sticker")
T_COLOUR = ("a {c} icon", "{c} icon", "an icon in {c}")


@dataclass
class Task:
    name: str
    type: str  # classification | retrieval
    group: str  # imagenet | imagenet_shift | vtab | retrieval
    metric: str
    description: str
    classnames: list[str] = field(default_factory=list)
    templates: tuple[str, ...] = ()
    specs: list[tuple] = field(default_factory=list)
    labels: list = field(default_factory=list)  # class index, or list of captions for retrieval
    split: str = "test"


def _cap(items: list, n: int, rng: np.random.Generator) -> list:
    if n <= 0 or len(items) <= n:
        return items
    idx = sorted(rng.permutation(len(items))[:n])
    return [items[int(i)] for i in idx]


def plan_tasks(world: World) -> tuple[list[Task], Task]:
    """All tasks and the ImageNet reference (train) split, as image specs with labels; nothing rendered yet."""
    r = world.recipe
    st = r.styles
    rng = np.random.default_rng([SUITE_VERSION, 7])
    cs = world.concepts
    inet = world.imagenet
    keys = world.imagenet_keys
    names = [world.imagenet_name(k) for k in keys]
    index = {k: i for i, k in enumerate(keys)}
    test = st.imagenet_test
    tasks: list[Task] = []

    def jitter(n: int) -> list[int]:
        return [-1] + [int(rng.integers(0, 2**62)) for _ in range(n - 1)]

    t = Task("imagenet", "classification", "imagenet", "acc1",
             f"{len(inet)} emoji concepts drawn in the {test} style and {len(keys) - len(inet)} icons drawn "
             f"{st.icon_imagenet}, styles the pool never uses", names, T_CONCEPT)
    for k in keys:
        for s in jitter(r.suite.imagenet_per_class):
            t.specs.append(world.imagenet_spec(k, test, s))
            t.labels.append(index[k])
    tasks.append(t)

    # The train split comes from the test's own distribution, as ImageNet's does: the same styles in other random
    # placements (the pool's augmentation). Images that are near-copies of a test image are dropped when written.
    ref = Task("imagenet/train", "classification", "imagenet", "acc1",
               f"reference set: the ImageNet classes in the {st.imagenet_train} style (icons: {st.icon_imagenet}), "
               f"{r.suite.reference_per_class} random placements each", names, T_CONCEPT, split="train")
    for k in keys:
        if k.startswith("icon:") or k in world.art[st.imagenet_train]:
            for _ in range(r.suite.reference_per_class):
                ref.specs.append(world.imagenet_spec(k, st.imagenet_train, int(rng.integers(0, 2**62))))
                ref.labels.append(index[k])

    for style in st.shift:
        if style == "clipart":
            t = Task("imagenet_clipart", "classification", "imagenet_shift", "acc1",
                     "openclipart drawings whose title names an ImageNet concept", names, T_CONCEPT)
            for k, key in sorted(world.clipart_shift_all.items()):
                t.specs.append(("art", "openclipart", k, -1))
                t.labels.append(index[key])
        else:
            t = Task(f"imagenet_{style.replace('-', '_')}", "classification", "imagenet_shift", "acc1",
                     f"the ImageNet concepts in the {style} style", names, T_CONCEPT)
            for h in inet:
                if h in world.art[style]:
                    t.specs.append(("art", emoji_collection(style), h, -1))
                    t.labels.append(index[h])
        tasks.append(t)

    # --- VTAB-like --------------------------------------------------------------------------------------------------
    digit_names = list(cap.DIGIT_WORDS)
    t = Task("mnist", "classification", "vtab", "acc1", "held-out MNIST digits", digit_names, T_DIGIT)
    for k in _cap(world.digits_test, r.suite.max_per_task, rng):
        t.specs.append(("art", "mnist", k, -1))
        t.labels.append(int(k[0]))
    tasks.append(t)
    from datafilter.micro.catalog import sklearn_digits

    t = Task("sklearn_digits", "classification", "vtab", "acc1", "scikit-learn's 8x8 digits", digit_names, T_DIGIT)
    for k in _cap(sorted(sklearn_digits()), r.suite.max_per_task, rng):
        t.specs.append(("art", "sklearn-digits", k, -1))
        t.labels.append(int(k[0]))
    tasks.append(t)

    flags = [h for h, c in cs.items() if c.subgroup == "country flag" and h in world.art[test]]
    t = Task("flags", "classification", "vtab", "acc1", f"country flags in the {test} style",
             [cs[h].name for h in flags], T_FLAG)
    for i, h in enumerate(flags):
        t.specs.append(("art", emoji_collection(test), h, -1))
        t.labels.append(i)
    tasks.append(t)

    drawn = _cap([h for h in cs if h in world.art[test]], r.suite.max_per_task, rng)
    for attr, name in (("group", "emoji_group"), ("subgroup", "emoji_subgroup")):
        classes = sorted({getattr(cs[h], attr) for h in drawn})
        t = Task(name, "classification", "vtab", "mean_per_class_recall",
                 f"the emoji {attr} of {test}-style drawings", classes, T_GROUP)
        for h in drawn:
            t.specs.append(("art", emoji_collection(test), h, -1))
            t.labels.append(classes.index(getattr(cs[h], attr)))
        tasks.append(t)

    allv = icons()
    held = _cap(world.icons_test, r.suite.max_per_task, rng)
    cats = sorted({allv[k].category.lower() for k in held})
    t = Task("icon_category", "classification", "vtab", "mean_per_class_recall",
             "the category of held-out tabler icons", cats, T_ICON_CATEGORY)
    for k in held:
        t.specs.append(("art", "tabler", k, -1))
        t.labels.append(cats.index(allv[k].category.lower()))
    tasks.append(t)

    per = r.suite.composites_per_class
    pick = lambda: inet[int(rng.integers(len(inet)))]  # noqa: E731 - a one-line draw, used four times below
    t = Task("counting", "classification", "vtab", "acc1", "how many emoji are drawn (1-5)", list(COUNT_WORDS),
             T_COUNT)
    for n in range(1, 6):
        for _ in range(per):
            t.specs.append(("count", emoji_collection(test), pick(), n, int(rng.integers(0, 2**62))))
            t.labels.append(n - 1)
    tasks.append(t)
    t = Task("position", "classification", "vtab", "acc1", "where in the image the emoji is", list(CELLS),
             T_POSITION)
    for cell in range(9):
        for _ in range(per):
            t.specs.append(("pos", emoji_collection(test), pick(), cell, int(rng.integers(0, 2**62))))
            t.labels.append(cell)
    tasks.append(t)
    t = Task("size", "classification", "vtab", "acc1", "whether the emoji is drawn small or large", list(SIZES),
             T_SIZE)
    for large in (False, True):
        for _ in range(per):
            t.specs.append(("size", emoji_collection(test), pick(), large, int(rng.integers(0, 2**62))))
            t.labels.append(int(large))
    tasks.append(t)
    colours = list(COLOURS)
    t = Task("colour", "classification", "vtab", "acc1", "the colour of a held-out icon", colours, T_COLOUR)
    for ci, colour in enumerate(colours):
        for _ in range(per):
            if world.icons_test:
                k = world.icons_test[int(rng.integers(len(world.icons_test)))]
                t.specs.append(("tint", "tabler", k, colour, -1))
                t.labels.append(ci)
    tasks.append(t)

    # --- retrieval ---------------------------------------------------------------------------------------------------
    t = Task("emoji_retrieval", "retrieval", "retrieval", "mean_recall@1",
             f"{test}-style emoji against their names and tags")
    for h in drawn:
        c = cs[h]
        t.specs.append(("art", emoji_collection(test), h, -1))
        t.labels.append([c.label, f"{c.label} emoji", ", ".join((c.label,) + c.tags[:4])])
    tasks.append(t)
    t = Task("icon_retrieval", "retrieval", "retrieval", "mean_recall@1", "held-out tabler icons against their names")
    for k in held:
        i = allv[k]
        t.specs.append(("art", "tabler", k, -1))
        t.labels.append([f"{i.words} icon", i.words, ", ".join((i.words,) + i.tags[:4])])
    tasks.append(t)
    t = Task("clipart_retrieval", "retrieval", "retrieval", "mean_recall@1",
             "held-out clip art against its own title (titles no other drawing in the package shares)")
    titles = Counter(a.title.lower() for a in world.all_clipart.values())
    unique = [k for k in world.clipart_test if titles[world.clipart[k].title.lower()] == 1]
    for k in _cap(unique, r.suite.max_per_task, rng):
        a = world.clipart[k]
        t.specs.append(("art", "openclipart", k, -1))
        t.labels.append([a.title] + ([f"{a.title} {' '.join(a.keywords[:4])}"] if a.keywords else []))
    tasks.append(t)
    return tasks, ref


def concept_vocabulary(world: World) -> list[str]:
    """Every concept name of the micro world, the text-based filter's class names: the micro counterpart of the
    ImageNet-21k synsets DataComp's text-based baseline matches, a vocabulary far wider than "ImageNet"'s classes
    (every emoji concept, every icon name; digits and clip-art titles are not concepts)."""
    names = {c.name.lower() for c in world.concepts.values()}
    names |= {i.words.lower() for i in world.icons.values()}
    return sorted(n for n in names if n.strip())


def pool_art_specs(world: World) -> list[tuple]:
    """Every drawing the pool may contain, centred: what evaluation images are checked against."""
    specs = [("art", emoji_collection(s), h, -1) for s, h in world.pool_emoji]
    specs += [("art", "tabler", k, -1) for k in world.icons_pool]
    specs += [("art", "mnist", k, -1) for k in world.digits_pool]
    specs += [("art", "openclipart", k, -1) for k in world.clipart_pool]
    specs += [("art", "papirus", k, -1) for k in world.apps]
    return specs


def _render_all(world: World, specs: list[tuple]) -> None:
    need: dict[str, set[str]] = {}
    for s in specs:
        need.setdefault(s[1], set()).add(s[2])
    for coll, keys in sorted(need.items()):
        world.render(coll, sorted(keys))


def _make(comp: Composer, specs: list[tuple]) -> tuple[list[np.ndarray], list[bool]]:
    imgs, ok = [], []
    for s in specs:
        try:
            imgs.append(np.asarray(comp.make(s)))
            ok.append(True)
        except MissingRender:  # the drawing failed to render; counted as a render failure
            imgs.append(np.zeros((comp.size, comp.size, 3), np.uint8))
            ok.append(False)
    return imgs, ok


def write_task_dir(directory: Path, task: Task, images: list[np.ndarray], keep: list[bool]) -> int:
    """Write one split (``directory/{split}/``) plus class names and templates; returns samples written."""
    split = directory / "train" if task.split == "train" else directory / "test"
    tmp = split.with_name(split.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = [(im, lab) for im, lab, k in zip(images, task.labels, keep) if k]
    nshards = max(1, (len(rows) + SAMPLES_PER_TAR - 1) // SAMPLES_PER_TAR)
    for si in range(nshards):
        with tarfile.open(tmp / f"{si}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for j, (im, lab) in enumerate(rows[si * SAMPLES_PER_TAR:(si + 1) * SAMPLES_PER_TAR]):
                key = f"s{si * SAMPLES_PER_TAR + j:07d}"
                img = png_bytes(Image.fromarray(im))
                tf.addfile(tar_member(f"{key}.png", len(img)), io.BytesIO(img))
                text = ("\n".join(lab) if task.type == "retrieval" else str(lab)).encode("utf-8")
                tf.addfile(tar_member(f"{key}.{'txt' if task.type == 'retrieval' else 'cls'}", len(text)),
                           io.BytesIO(text))
    (tmp / "nshards.txt").write_text(f"{nshards}\n")
    shutil.rmtree(split, ignore_errors=True)
    tmp.rename(split)
    if task.type == "retrieval":  # CLIP_benchmark reads a folder as retrieval only when this file says so
        (directory / "dataset_type.txt").write_text("retrieval\n")
    if task.type == "classification":
        (directory / "classnames.txt").write_text("\n".join(task.classnames) + "\n")
        (directory / "zeroshot_classification_templates.txt").write_text("\n".join(task.templates) + "\n")
    return len(rows)


def build_suite(recipe: Recipe, out: Path, pool_dir: Path | None = None, workers: int = 2) -> dict:
    """Build the suite of ``recipe`` into ``out``; returns (and writes) ``suite.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = World(recipe, workers=workers)
    tasks, ref = plan_tasks(world)
    pool_specs = pool_art_specs(world)
    _render_all(world, [s for t in tasks + [ref] for s in t.specs] + pool_specs)
    comp = Composer(world.rendered(), recipe.image_size, recipe.pool.augment)

    log.info("overlap check: %d pool drawings%s", len(pool_specs), f" + pool {pool_dir}" if pool_dir else "")
    pool_imgs, pool_ok = _make(comp, pool_specs)
    index = OverlapIndex(recipe.suite.near_duplicate_threshold)
    index.add([im for im, k in zip(pool_imgs, pool_ok) if k])
    if pool_dir is not None:
        index.add_pool(pool_dir, workers)

    report = {"threshold": recipe.suite.near_duplicate_threshold, "pool_images_checked": index.size,
              "eval_images_checked": 0, "exact": 0, "near_duplicate": 0, "dropped": {}, "render_failed": {},
              "max_similarity_kept": 0.0}
    # The reference split is checked against every kept test image too: it must hold no test image or near-copy.
    tests = OverlapIndex(recipe.suite.near_duplicate_threshold)
    entries = []
    for task in tasks + [ref]:  # the reference split last, once every test image is known
        images, ok = _make(comp, task.specs)
        exact, sim = index.query(images)
        near = sim >= index.threshold
        drop = exact | near
        if task is ref:
            t_exact, t_sim = tests.query(images)
            near_test = t_exact | (t_sim >= tests.threshold)
            report["reference"] = {"planned": len(images), "near_pool": int(drop.sum()),
                                   "near_test": int((near_test & ~drop).sum()), "test_images_checked": tests.size,
                                   "max_test_similarity_kept": 0.0}
            drop = drop | near_test
            kept_t = t_sim[~drop] if len(t_sim) else t_sim
            if len(kept_t):
                report["reference"]["max_test_similarity_kept"] = float(kept_t.max())
        keep = [bool(k and not d) for k, d in zip(ok, drop)]
        report["eval_images_checked"] += len(images)
        report["exact"] += int(exact.sum())
        report["near_duplicate"] += int((near & ~exact).sum())
        if drop.any():
            report["dropped"][task.name] = int(drop.sum())
        if not all(ok):
            report["render_failed"][task.name] = int(len(ok) - sum(ok))
        kept_sim = sim[np.array(keep, bool)] if len(sim) else sim
        if len(kept_sim):
            report["max_similarity_kept"] = max(report["max_similarity_kept"], float(kept_sim.max()))
        n = sum(keep)
        if task is not ref and (n == 0 or (task.type == "classification" and len(set(
                lab for lab, k in zip(task.labels, keep) if k)) < 2)):
            log.warning("task %s: too few usable samples (%d); left out of the suite", task.name, n)
            continue
        directory = out / task.name.split("/")[0]
        written = write_task_dir(directory, task, images, keep)
        if task is ref:
            report["reference"]["kept"] = written
            continue
        tests.add([im for im, k in zip(images, keep) if k])
        entries.append({"name": task.name, "type": task.type, "group": task.group, "metric": task.metric,
                        "path": task.name, "num_samples": written, "num_classes": len(task.classnames) or None,
                        "description": task.description})
    vocabulary = concept_vocabulary(world)
    (out / VOCABULARY_FILE).write_text("\n".join(vocabulary) + "\n", encoding="utf-8")
    suite = {"name": recipe.name, "version": SUITE_VERSION, "recipe_version": recipe.version,
             "image_size": recipe.image_size, "tasks": entries,
             "reference_sets": {"imagenet_train": "imagenet/train"},
             "vocabulary": {"file": VOCABULARY_FILE, "names": len(vocabulary)},
             "styles": {"pool": list(recipe.styles.pool), "imagenet_test": recipe.styles.imagenet_test,
                        "imagenet_train": recipe.styles.imagenet_train, "shift": list(recipe.styles.shift)},
             "overlap": report}
    write_json(out / "suite.json", suite)
    return suite


def read_task(task_dir: Path, split: str = "test"):
    """(images as arrays, labels) of one task split: labels are ints, or caption lists for retrieval."""
    d = Path(task_dir) / split
    n = int((d / "nshards.txt").read_text().strip())
    images, labels = [], []
    for si in range(n):
        with tarfile.open(d / f"{si}.tar") as tf:
            files: dict[str, dict[str, bytes]] = {}
            for m in tf:
                key, _, ext = m.name.partition(".")
                files.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for key in sorted(files):
            f = files[key]
            images.append(np.asarray(Image.open(io.BytesIO(f["png"])).convert("RGB")))
            labels.append(int(f["cls"]) if "cls" in f else f["txt"].decode().split("\n"))
    return images, labels

