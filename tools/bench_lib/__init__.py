"""Helpers of tools/bench.py: checkpoint generation, memory capping, the per-engine child runner."""
