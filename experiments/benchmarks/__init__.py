"""Benchmarks of kdjax components (run as modules)."""
