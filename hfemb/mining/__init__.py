"""Negative mining: tokenisers with a token cache, sparse BM25, selection, shards."""
