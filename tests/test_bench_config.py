"""A bench config is checked whole before any stage runs: every problem named with its file and key, fast, without
torch; and a filter's cache key follows its code."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from datafilter.bench.config import BenchConfig, BenchConfigError, FilterEntry, load_bench_config
from datafilter.bench.validate import check_bench_config
from datafilter.filters.fingerprint import plugin_code_files, plugin_code_hash

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"name": "t", "recipe": str(ROOT / "pools" / "nano.yaml"), "scorer_recipe": str(ROOT / "pools" / "scorer-nano.yaml"),
        "scale": "nano", "filters": [{"label": "No filtering", "name": "none"}]}


def _write(tmp_path: Path, **changes) -> Path:
    cfg = {**GOOD, **changes}
    cfg = {k: v for k, v in cfg.items() if v is not ...}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def _problems(path: Path) -> str:
    with pytest.raises(BenchConfigError) as info:
        check_bench_config(load_bench_config(path))
    return str(info.value)


def test_the_shipped_configs_pass():
    for name in ("micro", "nano"):
        cfg = check_bench_config(load_bench_config(ROOT / "configs" / f"{name}.yaml"))
        assert cfg.name == name


@pytest.mark.parametrize("change,message", [
    ({"seeds": 0}, "seeds: expected a list of whole numbers"),
    ({"seeds": [0, 0]}, "seeds: [0, 0] repeats a seed"),
    ({"samples_seen": "lots"}, "samples_seen: expected a positive whole number"),
    ({"scorer_samples_seen": 0}, "scorer_samples_seen: expected a positive whole number"),
    ({"train": "no"}, "train: expected true or false, got 'no' (quoted"),
    ({"name": "../../x"}, "name: '../../x' is not a plain folder name"),
    ({"name": ...}, "name: missing"),
    ({"sedes": [1]}, "unknown keys sedes (did you mean seeds?)"),
    ({"filters": [{"label": "a", "name": "none", "param": {}}]}, "filters[0]: unknown key(s) param"),
    ({"filters": [{"name": "none"}]}, "filters[0]: each filter needs a label and a name (label missing)"),
    ({"filters": [{"label": "a", "name": "none", "params": [1]}]}, "filters[0].params: expected a mapping"),
    ({"filters": [{"label": "a", "name": "clip_scor"}]},
     "filters[0] (a).name: no filter named 'clip_scor'; did you mean 'clip_score'?"),
    ({"filters": [{"label": "a", "name": "clip_score", "params": {"fractio": 0.3}}]},
     "filters[0] (a).params: filter 'clip_score' has no parameter 'fractio'; did you mean 'fraction'?"),
    ({"filters": [{"label": "a", "name": "clip_score", "params": {"fraction": "lots"}}]},
     "filters[0] (a).params: clip_score.fraction: 'lots' is not float"),
    ({"filters": [{"label": "∩", "name": "none"}]}, "filter label '∩' has no letter or digit"),
    ({"scale": "nanno"}, "scale: unknown scale 'nanno'; did you mean 'nano'?"),
    ({"recipe": "pools/nope.yaml"}, "recipe: recipe not found: pools/nope.yaml"),
    ({"recipe": None, "pool": "/nonexistent/pool", "suite": "/nonexistent/suite"},
     "pool: pool directory not found: /nonexistent/pool"),
    ({"recipe": None, "pool": "/nonexistent/pool", "suite": "/nonexistent/suite"},
     "suite: /nonexistent/suite has no suite.json"),
    ({"embed_model": "ViT-B-32", "embed_pretrained": "openai"}, "embed_model and scorer_recipe: give one"),
    ({"scorer_recipe": None, "embed_model": "ViT-B-32", "embed_checkpoint": "/nonexistent.pt"},
     "embed_checkpoint: checkpoint not found: /nonexistent.pt"),
    ({"scorer_recipe": None, "embed_model": "ViT-B-32", "scorer_samples_seen": 100},
     "scorer_samples_seen: only used with scorer_recipe"),
    ({"scorer_release": "/nonexistent/release"}, "scorer_release: /nonexistent/release is not a scorer release"),
    ({"scorer_recipe": None, "embed_model": "ViT-B-32", "scorer_release": str(ROOT / "scorers" / "micro")},
     "scorer_release: only used with scorer_recipe"),
])
def test_each_mistake_is_named_with_file_and_key(tmp_path: Path, change, message):
    path = _write(tmp_path, **change)
    text = _problems(path)
    assert text.startswith(str(path)) and message in text, text


def test_all_problems_of_a_file_are_reported_at_once(tmp_path: Path):
    text = _problems(_write(tmp_path, seeds=0, samples_seen="lots", train="no"))
    assert "3 problems" in text and "seeds:" in text and "samples_seen:" in text and "train:" in text
    text = _problems(_write(tmp_path, scale="nanno", filters=[{"label": "a", "name": "clip_scor"},
                                                               {"label": "b", "name": "randm"}]))
    assert "3 problems" in text and "filters[1] (b).name" in text


def test_command_line_overrides_are_checked_and_named_as_options(tmp_path: Path):
    with pytest.raises(BenchConfigError, match="--seeds: expected a list"):
        load_bench_config(_write(tmp_path), seeds=[-1])


def test_a_name_that_leaves_the_work_folder_is_refused_from_python_too():
    with pytest.raises(BenchConfigError, match="not a plain folder name"):
        BenchConfig(name="../x", filters=(FilterEntry("a", "none"),), recipe="r", scorer_recipe="s")


def test_the_check_imports_no_torch(tmp_path: Path):
    """What keeps the check quick (benchmarks/bench_config_check.py times it): no torch, no pool data."""
    path = _write(tmp_path, filters=[{"label": "a", "name": "clip_score", "params": {"fraction": 0.3}},
                                     {"label": "b", "name": "d2_pruning", "params": {"fraction": 0.3}},
                                     {"label": "c", "name": "image_based_clip_score"}])
    code = textwrap.dedent(f"""
        import sys
        from datafilter.bench.config import load_bench_config
        from datafilter.bench.validate import check_bench_config
        check_bench_config(load_bench_config({str(path)!r}))
        print("torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False"], out


def test_the_bench_command_stops_before_any_stage(tmp_path: Path, caplog):
    from datafilter.cli import main

    assert main(["bench", str(_write(tmp_path, scale="nanno")), "--work", str(tmp_path / "work")]) == 2
    assert "scale: unknown scale" in caplog.text and not (tmp_path / "work").exists()
    assert "stage" not in caplog.text  # refused before the first stage began


# --- the filter cache key follows the plugin's code --------------------------------------------------------------------
def test_a_plugin_fingerprint_changes_with_its_code_and_its_helpers_only(tmp_path: Path, monkeypatch):
    pkg = tmp_path / "myplugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("def keep(n):\n    return n // 2\n")
    (pkg / "unrelated.py").write_text("X = 1\n")
    (pkg / "flt.py").write_text(textwrap.dedent("""
        from datafilter.filters.base import Filter

        class Half(Filter):
            name = "half"

            def select(self, view):
                from .helpers import keep
                return view.uids_of(range(keep(view.n)))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from myplugin.flt import Half

    files = dict(plugin_code_files(Half))
    assert {"myplugin.flt", "myplugin.helpers", "datafilter.filters.base"} <= set(files)
    assert "myplugin.unrelated" not in files and not any(m.startswith(("numpy", "torch")) for m in files)
    before = plugin_code_hash(Half)
    assert plugin_code_hash(Half) == before
    (pkg / "unrelated.py").write_text("X = 2\n")
    assert plugin_code_hash(Half) == before
    (pkg / "helpers.py").write_text("def keep(n):\n    return n // 3\n")
    changed = plugin_code_hash(Half)
    assert changed != before
    (pkg / "flt.py").write_text((pkg / "flt.py").read_text() + "\n# a comment is a change too\n")
    assert plugin_code_hash(Half) not in (before, changed)


def test_builtin_fingerprints_cover_the_harness_they_run_on():
    from datafilter.filters.registry import filter_class

    cls, _ = filter_class("clip_score")
    modules = {m for m, _ in plugin_code_files(cls)}
    assert {"datafilter.filters.builtin.scores", "datafilter.filters.ops", "datafilter.filters.view"} <= modules
    assert not any(m.startswith("datafilter.train") for m in modules)
