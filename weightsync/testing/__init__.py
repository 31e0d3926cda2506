"""Helpers for tests, demos and benchmarks: tiny local models (no hub) and HF references."""
