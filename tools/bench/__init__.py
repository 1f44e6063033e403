"""Benchmarks: ``rmix bench loaders|mix|shards|train``; each prints medians and spreads of repeats."""
