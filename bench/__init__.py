"""Benchmarks: run each from the repository root as `python -m bench.NAME`; each prints its table and the machine."""
