"""The micro pool and suite, tested on the nano recipe (a few thousand samples from a fixed subset of the sources)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datafilter.micro import sources
from datafilter.micro.recipe import NOISE_KINDS, RecipeError, load_recipe

from conftest import NANO, ROOT, need_sources


# --- recipes ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("name: x\nbogus: 1\n", "unknown key(s) bogus"),
    ("name: x\nimage_size: big\n", "image_size: expected an integer"),
    ("name: x\nstyles: {pool: [noto, twemoji]}\n", "twemoji used in more than one role"),
    ("name: x\nstyles: {pool: [comic-sans]}\n", "unknown style 'comic-sans'"),
    ("name: x\npool: {noise: {mismatched_caption: 0.7, boilerplate_caption: 0.4}}\n", "add up to 1.10"),
    ("name: x\npool: {noise: {typos: 0.1}}\n", "unknown noise kind 'typos'"),
    ("name: x\npool: {augment: {scale: [1.0]}}\n", "pool.augment.scale: expected 2 values"),
    ("name: x\nstyles: {imagenet_train: noto}\n", "noto used in more than one role"),
    ("name: x\nstyles: {icon_pool: [outline, filled]}\n", "both a pool style and the ImageNet icon style"),
    ("name: x\nstyles: {icon_imagenet: bold}\n", "unknown icon style 'bold'"),
    ("- just\n- a list\n", "a recipe is a YAML mapping"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_recipe_errors_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_shipped_recipes_parse_with_disjoint_styles():
    for name in ("micro", "nano", "scorer"):
        r = load_recipe(ROOT / "pools" / f"{name}.yaml")
        roles = list(r.styles.pool) + [r.styles.imagenet_test] + list(r.styles.shift)
        assert len(roles) == len(set(roles))
        # ImageNet's train split comes from its test's distribution; the icon test style is never pooled.
        assert r.styles.imagenet_train == r.styles.imagenet_test
        assert r.styles.icon_imagenet not in r.styles.icon_pool
    assert sum(load_recipe(ROOT / "pools" / "scorer.yaml").pool.noise.values()) == 0
    micro = load_recipe(ROOT / "pools" / "micro.yaml")
    assert 0.5 <= sum(micro.pool.noise.values()) <= 0.6


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


# --- sources ---------------------------------------------------------------------------------------------------------
def test_status_reports_missing_sources_and_what_they_affect(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAFILTER_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(sources, "_dpkg_installed", lambda name: None if name == "fonts-symbola" else "1.0")
    monkeypatch.setattr(sources, "debian_path", lambda name: "/somewhere")
    sts = {s.source.name: s for s in sources.status()}
    assert not sts["@iconify-json/twemoji"].ok and "not installed" in sts["@iconify-json/twemoji"].problem
    assert not sts["fonts-symbola"].ok and "apt-get install -y fonts-symbola" in sts["fonts-symbola"].problem
    assert sts["openclipart-svg"].ok
    text = sources.format_status(list(sts.values()))
    assert "MISSING" in text
    assert "affects: suite: imagenet_symbola" in text
    assert "suite: imagenet;" in text  # twemoji feeds the ImageNet test set


def test_install_reports_a_failed_debian_package_without_crashing(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAFILTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "install_npm", lambda: "")
    monkeypatch.setattr(sources, "_npm_installed", lambda name: sources.source(name).version)
    monkeypatch.setattr(sources, "_dpkg_installed", lambda name: None if name == "papirus-icon-theme" else "1")
    monkeypatch.setattr(sources, "debian_path", lambda name: "/somewhere")
    monkeypatch.setattr(sources, "install_debian", lambda names, pins=None: {n: "apt-get install failed: E: no candidate"
                                                                  for n in names})
    report = sources.install()
    assert [s.source.name for s in report.failed] == ["papirus-icon-theme"]
    assert report.failed_required == []  # papirus is optional: the install still succeeds
    assert "no candidate" in report.failed[0].problem
    assert json.loads((tmp_path / "cache" / "sources" / "installed.json").read_text())["papirus-icon-theme"]["ok"] \
        is False


def test_a_missing_shift_style_only_loses_its_own_set(monkeypatch, caplog):
    need_sources()
    from datafilter.micro import catalog
    from datafilter.micro.world import World

    real = catalog.emoji_art

    def no_symbola(style):
        if style == "symbola":
            raise RuntimeError("style symbola: Debian package fonts-symbola is not installed")
        return real(style)

    monkeypatch.setattr(catalog, "emoji_art", no_symbola)
    world = World(load_recipe(NANO), workers=1)
    assert world.art["symbola"] == {} and world.art["twemoji"]
    assert len(world.imagenet_keys) == load_recipe(NANO).imagenet_classes
    assert "fonts-symbola" in caplog.text


# --- render cache ----------------------------------------------------------------------------------------------------
def test_render_cache_counts_failures_and_renders_once(tmp_path, monkeypatch):
    from datafilter.micro.render import ensure_rendered

    monkeypatch.setenv("DATAFILTER_CACHE", str(tmp_path))
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="20"><rect width="10" height="20" fill="red"/></svg>'
    calls = []

    def drawing(key):
        calls.append(key)
        return ("svg", svg if key != "broken" else "<svg not really")

    rs = ensure_rendered("test", "1.0", 24, ["a", "broken"], drawing, workers=1)
    assert "a" in rs and "broken" not in rs and "broken" in rs.failed
    img = rs.get("a")
    assert img.shape == (24, 24, 4)
    assert img[:, :6, 3].max() == 0 and img[:, 9:15, 3].min() == 255  # letterboxed, not stretched
    rs = ensure_rendered("test", "1.0", 24, ["a", "broken", "b"], drawing, workers=1)
    assert calls == ["a", "broken", "b"]  # warm: only the new key was drawn; the failure was remembered
    assert "b" in rs


# --- the nano pool -----------------------------------------------------------------------------------------------------
def test_same_recipe_and_seed_give_byte_identical_shards(nano_builds):
    a, b = nano_builds["pool"], nano_builds["pool_b"]
    names = sorted(p.name for p in a.iterdir() if p.name[:8].isdigit())
    assert len([n for n in names if not n.endswith("_skipped.jsonl")]) == 9  # and a skip list where a render failed
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "ground_truth.parquet").read_bytes() == (b / "ground_truth.parquet").read_bytes()


def test_a_killed_build_resumes_without_redoing_finished_shards(nano_builds, tmp_path):
    import shutil

    from datafilter.micro.poolbuild import build_pool

    pool = tmp_path / "pool"
    shutil.copytree(nano_builds["pool"], pool)
    # As after a kill while shard 1 was being written: no stats file (the completion marker), no ground truth yet.
    (pool / "00000001_stats.json").unlink()
    (pool / "00000001.tar").write_bytes(b"half a tar")
    (pool / "ground_truth.parquet").unlink()
    finished = (pool / "00000000.tar").stat().st_mtime_ns
    build_pool(load_recipe(NANO), pool, workers=1)
    assert (pool / "00000000.tar").stat().st_mtime_ns == finished
    for name in ("00000001.tar", "00000001.parquet", "00000001_stats.json", "ground_truth.parquet"):
        assert (pool / name).read_bytes() == (nano_builds["pool"] / name).read_bytes(), name


def test_another_seed_changes_the_pool(nano_builds):
    from datafilter.micro.poolbuild import build_pool

    out = nano_builds["root"] / "pool_seed1"
    build_pool(load_recipe(NANO).with_seed(1), out, workers=2)
    assert (out / "00000000.tar").read_bytes() != (nano_builds["pool"] / "00000000.tar").read_bytes()


def test_ground_truth_matches_recipe_proportions_and_stays_out_of_shards(nano_builds):
    from datafilter.pool import Pool

    recipe = load_recipe(NANO)
    pool = Pool(nano_builds["pool"])
    gt = pq.read_table(nano_builds["pool"] / "ground_truth.parquet").to_pandas()
    assert sorted(gt["uid"]) == sorted(pool.metadata(["uid"]).column("uid").to_pylist())
    counts = gt["noise"].value_counts().to_dict()
    planned = recipe.pool.size
    assert pool.num_samples >= planned * 0.99  # only render failures may drop samples
    for kind in NOISE_KINDS:
        want = planned * recipe.pool.noise[kind]
        assert abs(counts.get(kind, 0) - want) <= 0.02 * planned, (kind, counts.get(kind), want)
    assert abs(counts["clean"] / planned - (1 - sum(recipe.pool.noise.values()))) < 0.02
    assert set(gt["noise"]) == {"clean", *NOISE_KINDS}
    assert not {"noise", "part", "concept", "style"} & set(pool.columns())
    assert set(pool.column("source")) <= {"emoji", "icon", "clipart", "digits"}
    stats = json.loads((nano_builds["pool"] / "00000000_stats.json").read_text())
    assert stats["input"] == stats["written"] + sum(stats["skipped"].values())


def test_noise_is_what_the_ground_truth_says(nano_builds):
    """Spot checks that the labels describe the samples: spam repeats captions, boilerplate looks like boilerplate,
    non-English captions are identified as another language."""
    import py3langid

    from datafilter.pool import Pool

    pool = Pool(nano_builds["pool"])
    text = dict(zip(pool.metadata(["uid"]).column("uid").to_pylist(), pool.column("text")))
    gt = pq.read_table(nano_builds["pool"] / "ground_truth.parquet").to_pandas()
    spam = [text[u] for u in gt.loc[gt.noise == "near_duplicate_spam", "uid"]]
    assert len(set(spam)) <= load_recipe(NANO).pool.spam_groups
    foreign = [text[u] for u in gt.loc[gt.noise == "non_english_caption", "uid"]]
    english = sum(py3langid.classify(t)[0] == "en" for t in foreign)
    assert english < 0.3 * len(foreign)


def test_pool_contact_sheet_has_one_tile_per_sample(nano_builds, tmp_path):
    from datafilter.cli import main
    from datafilter.micro.sheet import grid_size

    out = tmp_path / "sheet.png"
    assert main(["pool", "show", str(nano_builds["pool"]), "--out", str(out), "-n", "20"]) == 0
    im = Image.open(out)
    assert im.info["tiles"] == "20"
    assert im.size == grid_size(20)


# --- the nano suite ----------------------------------------------------------------------------------------------------
def test_suite_layout_is_readable_by_webdataset(nano_builds):
    import webdataset as wds

    suite = nano_builds["suite"]
    meta = json.loads((suite / "suite.json").read_text())
    groups = {t["group"] for t in meta["tasks"]}
    assert groups == {"imagenet", "imagenet_shift", "vtab", "retrieval"}
    assert sum(t["group"] == "imagenet_shift" for t in meta["tasks"]) >= 4
    assert sum(t["group"] == "vtab" for t in meta["tasks"]) >= 8
    assert meta["reference_sets"] == {"imagenet_train": "imagenet/train"}
    for t in meta["tasks"] + [{"path": "imagenet", "type": "classification", "split": "train"}]:
        d = suite / t["path"]
        split = t.get("split", "test")
        n = int((d / split / "nshards.txt").read_text())
        urls = [str(d / split / f"{i}.tar") for i in range(n)]
        ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
        samples = list(ds)
        assert len(samples) == t.get("num_samples", len(samples)) > 0
        first = samples[0]
        assert first["png"].size == (40, 40)
        if t["type"] == "classification":
            classes = (d / "classnames.txt").read_text().splitlines()
            templates = (d / "zeroshot_classification_templates.txt").read_text().splitlines()
            assert all("{c}" in tpl for tpl in templates)
            labels = [int(s["cls"]) for s in samples]
            assert 0 <= min(labels) and max(labels) < len(classes)
        else:
            assert all(s["txt"].strip() for s in samples)


def test_no_evaluation_image_or_near_copy_is_in_the_pool(nano_builds):
    from datafilter.micro.overlap import check_suite

    recipe = load_recipe(NANO)
    meta = json.loads((nano_builds["suite"] / "suite.json").read_text())
    # The build compared with every drawing the pool may use and with the built pool's own images.
    assert meta["overlap"]["eval_images_checked"] > 1000 and meta["overlap"]["pool_images_checked"] > 3500
    assert meta["overlap"]["max_similarity_kept"] < recipe.suite.near_duplicate_threshold
    result = check_suite(nano_builds["suite"], nano_builds["pool"], recipe.suite.near_duplicate_threshold)
    assert result["pool_images"] > 2900
    assert result["exact"] == 0
    assert result["near_duplicate"] == 0, {k: v for k, v in result["by_task"].items() if v["near_duplicate"]}


def test_overlap_check_catches_a_planted_copy(nano_builds, tmp_path):
    """The check must be able to fail: a pool holding a re-encoded, jittered evaluation image is caught."""
    from datafilter.micro.overlap import check_suite
    from datafilter.micro.suite import read_task
    from datafilter.pool import ImageConfig, ShardWriter, make_uid

    images, _ = read_task(nano_builds["suite"] / "imagenet")
    (tmp_path / "leaky").mkdir()
    w = ShardWriter(tmp_path / "leaky", 0, ImageConfig(max_side=40, encode_format="jpg"))
    jittered = np.clip(images[3].astype(int) + np.random.default_rng(0).integers(-8, 9, images[3].shape), 0, 255)
    for i, im in enumerate([images[3], jittered.astype(np.uint8)]):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "PNG")
        w.add(buf.getvalue(), "a copy", make_uid("leak", str(i)))
    w.close()
    result = check_suite(nano_builds["suite"], tmp_path / "leaky", 0.95)
    assert result["by_task"]["imagenet"]["near_duplicate"] >= 1


def test_reference_split_comes_from_the_test_distribution_without_test_images(nano_builds):
    """ImageNet's train split is drawn from the test's styles (twemoji, filled icons) in other placements, and
    holds no test image or near-copy of one: the build drops them and `suite check` finds none."""
    from datafilter.micro.overlap import check_suite
    from datafilter.micro.suite import read_task
    from datafilter.micro.world import World

    recipe = load_recipe(NANO)
    meta = json.loads((nano_builds["suite"] / "suite.json").read_text())
    ref = meta["overlap"]["reference"]
    world = World(recipe, workers=1)
    classes = len(world.imagenet_keys)
    assert len(world.imagenet_icons) == round(recipe.imagenet_classes * recipe.imagenet_icon_share) > 0
    assert ref["planned"] == classes * recipe.suite.reference_per_class
    assert ref["kept"] == ref["planned"] - ref["near_pool"] - ref["near_test"] > 0.9 * ref["planned"]
    assert ref["test_images_checked"] > 1000
    assert ref["max_test_similarity_kept"] < recipe.suite.near_duplicate_threshold
    images, labels = read_task(nano_builds["suite"] / "imagenet", "train")
    assert len(images) == ref["kept"] and set(labels) == set(range(classes))
    result = check_suite(nano_builds["suite"], nano_builds["pool"], recipe.suite.near_duplicate_threshold)
    leaks = result["reference_vs_test"]["imagenet_train"]
    assert leaks["images"] == ref["kept"] and leaks["exact"] == 0 and leaks["near_duplicate"] == 0


def test_reference_check_catches_a_test_image_in_the_train_split(nano_builds, tmp_path):
    """The reference-vs-test rule can fail: a train split holding a jittered test image is caught."""
    import shutil
    import tarfile

    from datafilter.micro.overlap import check_suite
    from datafilter.micro.suite import read_task
    from datafilter.pool.format import tar_member

    suite = shutil.copytree(nano_builds["suite"], tmp_path / "suite")
    test_images, _ = read_task(suite / "imagenet")
    jittered = np.clip(test_images[5].astype(int) + np.random.default_rng(1).integers(-6, 7, test_images[5].shape),
                       0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(jittered).save(buf, "PNG")
    with tarfile.open(suite / "imagenet" / "train" / "0.tar", "a") as tf:
        tf.addfile(tar_member("zz_leak.png", len(buf.getvalue())), io.BytesIO(buf.getvalue()))
        tf.addfile(tar_member("zz_leak.cls", 1), io.BytesIO(b"5"))
    result = check_suite(suite, nano_builds["pool"], 0.95)
    assert result["reference_vs_test"]["imagenet_train"]["near_duplicate"] == 1


def test_suite_writes_a_concept_vocabulary_for_the_text_based_filter(nano_builds):
    meta = json.loads((nano_builds["suite"] / "suite.json").read_text())
    names = (nano_builds["suite"] / meta["vocabulary"]["file"]).read_text().splitlines()
    assert len(names) == meta["vocabulary"]["names"] == len(set(names))
    inet = {n.lower() for n in (nano_builds["suite"] / "imagenet" / "classnames.txt").read_text().splitlines()}
    assert inet <= set(names) and len(names) > 3 * len(inet)  # far wider than the ImageNet classes


def test_suite_contact_sheets_one_per_set(nano_builds, tmp_path):
    from datafilter.cli import main

    assert main(["suite", "show", str(nano_builds["suite"]), "--out", str(tmp_path / "sheets"), "-n", "8"]) == 0
    meta = json.loads((nano_builds["suite"] / "suite.json").read_text())
    made = sorted(p.stem for p in (tmp_path / "sheets").glob("*.png"))
    assert made == sorted([t["name"] for t in meta["tasks"]] + ["imagenet_train"])
    sizes = {t["name"]: t["num_samples"] for t in meta["tasks"]}
    for p in (tmp_path / "sheets").glob("*.png"):  # 8 tiles, or all of a smaller set
        assert Image.open(p).info["tiles"] == str(min(8, sizes.get(p.stem, 8)))


def test_cli_builds_nano_without_arguments_beyond_the_recipe(tmp_path, monkeypatch):
    need_sources()
    from datafilter.cli import main

    monkeypatch.chdir(tmp_path)
    os.symlink(ROOT / "pools", tmp_path / "pools")
    assert main(["pool", "build", "pools/nano.yaml", "--workers", "1", "--seed", "3"]) == 0
    gt = pq.read_table(tmp_path / "work" / "pools" / "nano" / "ground_truth.parquet")
    assert gt.num_rows > 2900


def test_a_build_never_resumes_into_another_seeds_pool(tmp_path):
    from datafilter.micro.poolbuild import build_pool

    need_sources()
    out = tmp_path / "pool"
    out.mkdir()
    (out / "build_request.json").write_text('{"recipe": "nano", "seed": 99, "key": "0"}')
    with pytest.raises(RecipeError, match="another recipe or seed"):
        build_pool(load_recipe(NANO), out, workers=1)
