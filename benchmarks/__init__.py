"""Benchmarks of Lavender Flight beside the limits (bare Flight, Parquet) and its peers."""
