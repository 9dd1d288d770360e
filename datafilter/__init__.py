"""datafilter: a DataComp-style benchmark harness for image-text data filtering.

The pipeline has one package per stage: ``pool`` (shards and metadata), ``micro`` (the offline pool and evaluation
suite), ``embed`` (embeddings and CLIP scores), ``filters`` (plugins that select a subset), ``train`` (fixed-budget
CLIP training) and ``evaluate`` (zero-shot evaluation). ``common`` holds what every stage shares.
"""

__version__ = "0.1.0"
