"""The benchmark: pool -> embeddings -> subsets -> fixed-budget training -> zero-shot evaluation -> results table."""
