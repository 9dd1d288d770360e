"""``datafilter pool ingest`` and ``datafilter pool info`` from the command line."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datafilter.cli import main


def _folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 255, (40, 60, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        (root / f"{i}.png").write_bytes(buf.getvalue())
        (root / f"{i}.txt").write_text(f"caption {i}" if i else "")
    return root


def test_ingest_then_info_json_reports_counts(tmp_path: Path, capsys):
    src = _folder(tmp_path / "src", 5)
    out = tmp_path / "pool"
    assert main(["-q", "pool", "ingest", str(src), "--out", str(out), "--workers", "1", "--shard-size", "2",
                 "--max-side", "30", "--encode-format", "webp", "--json"]) == 0
    ingested = json.loads(capsys.readouterr().out)
    assert main(["pool", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert ingested == info
    assert (info["shards"], info["samples"], info["input"]) == (3, 4, 5)
    assert info["skipped"] == {"empty_caption": 1} and info["bytes"] > 0
    assert main(["pool", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "4 written of 5 read" in text and "empty_caption" in text


def test_info_reads_an_img2dataset_folder_as_it_is(toy_pool: Path, capsys):
    # a pool from another producer: img2dataset's own stats file has other keys
    (toy_pool / "00000000_stats.json").write_text(json.dumps({"count": 20, "successes": 16}))
    assert main(["pool", "info", str(toy_pool), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["samples"] == 48 and info["input"] == 20 + 32


def test_structural_error_names_the_file_and_exits_2(tmp_path: Path, caplog):
    table = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"], "caption": ["x"]}), table)
    with caplog.at_level(logging.ERROR):
        assert main(["pool", "ingest", str(table), "--out", str(tmp_path / "pool")]) == 2
    assert "pairs.parquet" in caplog.text and "'image'" in caplog.text and "path, caption" in caplog.text


@pytest.mark.parametrize("argv, expected", [
    ([], ["pool"]),
    (["pool"], ["ingest", "info"]),
    (["pool", "ingest"], ["folder", "table", "shards", "urls", "--image-col", "--url-col", "--max-side", "resume"]),
    (["pool", "info"], ["--json", "skipped by reason"]),
])
def test_help_explains_each_command(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in expected:
        assert word in text, word
