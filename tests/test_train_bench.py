"""The GPU check script's CPU path (``benchmarks/bench_train_gpu.py --tiny``): every part runs and reports."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAFILTER_CACHE", str(tmp_path / "cache"))  # the script points it at its own folder
    spec = importlib.util.spec_from_file_location("bench_train_gpu", ROOT / "benchmarks" / "bench_train_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--out", str(tmp_path / "gpu.json")])
    assert json.loads((tmp_path / "gpu.json").read_text()) == result
    assert (result["device"], result["precision"], result["per_gpu_batch"]) == ("cpu", "fp32", 16)
    assert result["data_path_steps_per_s"] > 0 and result["bare_steps_per_s"] > 0
    assert result["ratio"] == result["data_path_steps_per_s"] / result["bare_steps_per_s"]
    assert result["embed_images_per_s"] > 0
