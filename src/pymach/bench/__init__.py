"""Benchmarks: each measures pymach and, in the same run, a baseline, and prints the ratio."""
