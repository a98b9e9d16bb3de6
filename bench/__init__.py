"""Benchmarks: `python -m bench.bench` (or `make bench`). They print numbers; tests never assert timings."""
