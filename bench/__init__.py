"""Benchmarks: one module per benchmark, run as ``python -m bench.<name>``; each prints a table."""
