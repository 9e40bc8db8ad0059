"""Benchmark suite for the per-round hot path at 1M-10M images (issue 7).

Run ``agile bench --sizes 1000000,10000000 --out DIR`` or ``python -m benchmarks ...``;
see ``BENCHMARKS.md``. Not part of the default test run.
"""
