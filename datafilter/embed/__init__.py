"""Embeddings and CLIP scores: computing them with an open_clip model, and storing them beside a pool.

- ``pipeline``: ``embed_pool`` (decoding workers, both towers, per-shard resumable writes, rank splitting)
- ``store``: ``EmbeddingStore``, the only code that reads or writes a pool's embeddings
- ``reference``: reference sets (e.g. ImageNet train) embedded into a pool's space
- ``datacomp``: DataComp's released metadata (parquet + npz), read as is
- ``decode``, ``shards``: image decoding split around the model's transform; a fast tar reader
"""
