"""The read side of the Pool format: lookups, alignment checks, and refusing files that are not a pool index."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datafilter.pool import Pool, PoolError, hex_to_uids, make_uid
from conftest import write_toy_pool


def test_rows_of_and_lookup_agree_with_metadata(tmp_path):
    pool = Pool(write_toy_pool(tmp_path / "p", n=40, shard_size=16))
    assert pool.num_samples == 40 and len(pool.shards) == 3
    assert list(pool.offsets) == [0, 16, 32, 40]
    texts = pool.column("text")
    uid = make_uid("toy", "0", "21")  # sample 21 lives in shard 1, row 5
    rec = pool.lookup(uid)
    assert (rec["shard"], rec["row"], rec["text"]) == ("00000001", 5, texts[21])
    query = np.concatenate([pool.uids[[3, 39]], hex_to_uids(["0" * 32])])
    assert list(pool.rows_of(query)) == [3, 39, -1]
    with pytest.raises(KeyError):
        pool.lookup("f" * 32)


def test_iter_samples_follows_parquet_order(tmp_path):
    pool = Pool(write_toy_pool(tmp_path / "p", n=20, shard_size=8))
    samples = list(pool.iter_samples())
    assert [s.uid for s in samples] == pool.metadata(["uid"]).column("uid").to_pylist()
    assert all(s.image[:4] == b"\x89PNG" for s in samples)


def test_parquet_that_disagrees_with_its_tar_is_a_structural_error(tmp_path):
    pool_dir = write_toy_pool(tmp_path / "p", n=8, shard_size=8)
    parquet = pool_dir / "00000000.parquet"
    table = pq.read_table(parquet)
    pq.write_table(table.slice(0, 6), parquet)  # two rows lost
    with pytest.raises(PoolError, match="8 samples in the tar but 6 rows"):
        list(Pool(pool_dir).iter_samples())


def test_unindexed_img2dataset_parquet_is_refused_with_the_fix(tmp_path):
    pool_dir = write_toy_pool(tmp_path / "p", n=4, shard_size=4)
    parquet = pool_dir / "00000000.parquet"
    table = pq.read_table(parquet)
    pq.write_table(table.append_column("status", pa.array(["success"] * 4)), parquet)
    with pytest.raises(PoolError, match="datafilter pool ingest"):
        Pool(pool_dir)


def test_missing_tar_and_empty_dir_are_named(tmp_path):
    pool_dir = write_toy_pool(tmp_path / "p", n=4, shard_size=4)
    (pool_dir / "00000000.tar").unlink()
    with pytest.raises(PoolError, match="00000000.tar missing"):
        Pool(pool_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PoolError, match="no shards"):
        Pool(tmp_path / "empty")
