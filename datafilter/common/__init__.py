"""Pieces every stage shares: logging, atomic files, hashing, the launch environment and the shard executor."""
