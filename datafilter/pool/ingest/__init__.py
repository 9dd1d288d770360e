"""Ingest raw image-text data into a Pool: folders with sidecar captions, tables of local paths, existing
img2dataset/DataComp shards (indexed, in place or copied), and tables of URLs (downloaded by img2dataset).

Readers list a source as ordered items, the planner cuts them into shards by position, and shard jobs write each
shard through ``ShardWriter`` in a process pool; finished shards survive a kill and are not redone.
"""

from datafilter.pool.ingest.config import KINDS, IngestConfig, IngestError, detect_kind
from datafilter.pool.ingest.run import default_out, ingest

__all__ = ["KINDS", "IngestConfig", "IngestError", "detect_kind", "default_out", "ingest"]
