"""Rerunnable benchmarks for gsa-flax (not part of the test suite); see BENCHMARKS.md."""
