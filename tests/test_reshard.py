"""``datafilter reshard``: DataComp's resharder semantics (k listings, k copies; shard size and names; stats,
sample_ids and meta), a run killed halfway resuming to the same bytes, and the output readable as a pool."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import write_toy_pool
from datafilter.pool import Pool
from datafilter.pool import reshard as reshard_mod
from datafilter.pool.reshard import reshard
from datafilter.pool.tario import tar_samples
from datafilter.pool.uid import hex_to_uids, sort_uids, uids_to_hex


@pytest.fixture
def pool_and_subset(tmp_path):
    pool = write_toy_pool(tmp_path / "pool", n=50, shard_size=16)
    uids = Pool(pool).uids
    stranger = hex_to_uids(["ab" * 16])
    # rows 0-9 once, 3-5 twice more, 4 a third time, 40-44 once, and a uid the pool does not have
    subset = sort_uids(np.concatenate([uids[:10], uids[3:6], uids[3:6], uids[4:5], uids[40:45], stranger]))
    np.save(tmp_path / "subset.npy", subset)
    return pool, tmp_path / "subset.npy", uids


def samples(out):
    got = []
    for tar in sorted(out.glob("*.tar")):
        got += [(tar.name, key, files) for key, files in tar_samples(tar)]
    return got


def test_reshard_writes_each_uid_as_often_as_listed(pool_and_subset, tmp_path):
    pool, subset, uids = pool_and_subset
    meta = reshard(pool, subset, tmp_path / "out", shard_size=7, progress=False)
    got = samples(tmp_path / "out")
    hexes = uids_to_hex(uids)
    expected = []
    for i, h in enumerate(hexes):  # pool order; copies of one sample together
        k = {**{j: 1 for j in range(10)}, 3: 3, 4: 4, 5: 3, **{j: 1 for j in range(40, 45)}}.get(i, 0)
        expected += [f"{h}-{j}" for j in range(k)]
    assert [key for _, key, _ in got] == expected and len(expected) == 22
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names[:4] == ["00000000.parquet", "00000000.tar", "00000000_stats.json", "00000001.parquet"]
    assert "meta.json" in names and "sample_ids.npy" in names and not any(n.startswith(".") for n in names)
    sizes = [json.loads((tmp_path / "out" / f"{i:08d}_stats.json").read_text())["successes"] for i in range(4)]
    assert sizes == [7, 7, 7, 1]
    assert meta["output_count"] == 22 and meta["missing_from_pool"] == 1 and meta["output_shard_count"] == 4
    assert np.array_equal(np.load(tmp_path / "out" / "sample_ids.npy"), np.load(subset))
    first = got[0][2]
    assert set(first) == {"png", "txt", "json"} and json.loads(first["json"])["uid"] == hexes[0]
    out_pool = Pool(tmp_path / "out")  # the output is a pool as well
    assert out_pool.num_samples == 22 and len(list(out_pool.iter_samples())) == 22


def test_reshard_resumes_after_a_kill_to_the_same_bytes(pool_and_subset, tmp_path, monkeypatch):
    pool, subset, _ = pool_and_subset
    reshard(pool, subset, tmp_path / "whole", shard_size=6, progress=False)
    real = reshard_mod.Resharder._close
    closed = []

    def killed_in_the_third(self, cur, position, state):
        if len(closed) == 2:
            raise KeyboardInterrupt
        closed.append(cur.index)
        return real(self, cur, position, state)

    monkeypatch.setattr(reshard_mod.Resharder, "_close", killed_in_the_third)
    with pytest.raises(KeyboardInterrupt):
        reshard(pool, subset, tmp_path / "out", shard_size=6, progress=False)
    monkeypatch.setattr(reshard_mod.Resharder, "_close", real)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000000.tar", "00000001.tar"]
    reshard(pool, subset, tmp_path / "out", shard_size=6, progress=False)
    for a in sorted((tmp_path / "whole").glob("*.tar")):
        assert a.read_bytes() == (tmp_path / "out" / a.name).read_bytes(), a.name
    assert len(list((tmp_path / "out").glob("*.tar"))) == len(list((tmp_path / "whole").glob("*.tar"))) == 4


def test_reshard_refuses_a_foreign_output_dir_and_bad_subsets(pool_and_subset, tmp_path):
    pool, subset, uids = pool_and_subset
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        reshard(pool, subset, tmp_path / "busy", progress=False)
    assert reshard(pool, subset, tmp_path / "busy", overwrite=True, progress=False)["output_count"] == 22
    assert not (tmp_path / "busy" / "keep.txt").exists()
    np.save(tmp_path / "unsorted.npy", uids[:5][::-1].copy())
    with pytest.raises(ValueError, match="sorted"):
        reshard(pool, tmp_path / "unsorted.npy", tmp_path / "o2", progress=False)
    np.save(tmp_path / "ints.npy", np.arange(4))
    with pytest.raises(ValueError, match="u8"):
        reshard(pool, tmp_path / "ints.npy", tmp_path / "o3", progress=False)


def test_reshard_cli(pool_and_subset, tmp_path, capsys):
    from datafilter.cli import main

    pool, subset, _ = pool_and_subset
    assert main(["reshard", str(pool), str(subset), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert '"output_count": 22' in capsys.readouterr().out
    assert len(list((tmp_path / "o").glob("*.tar"))) == 1
