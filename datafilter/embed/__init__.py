"""Embeddings and CLIP scores: computing them with an open_clip model, and storing them beside a pool."""
