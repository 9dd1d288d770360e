"""The Pool: WebDataset shards with per-shard parquet metadata, and the tools that ingest and describe pools."""

from datafilter.pool.format import ShardWriter, shard_name
from datafilter.pool.images import ImageConfig, SkipSample
from datafilter.pool.pool import Pool, PoolError, Sample, Shard
from datafilter.pool.uid import UID_DTYPE, hex_to_uids, make_uid, uids_to_hex

__all__ = ["Pool", "PoolError", "Sample", "Shard", "ShardWriter", "ImageConfig", "SkipSample", "UID_DTYPE",
           "hex_to_uids", "make_uid", "uids_to_hex", "shard_name"]
