"""Benchmark harness shared by `python -m posattn bench` and bench/."""
