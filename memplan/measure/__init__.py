"""Measured runs: the profiler, its records, predicted-vs-measured comparison, calibration and depth extrapolation."""
