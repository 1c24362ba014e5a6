"""Micro-benchmarks of DPUmesh parts; each module runs with `python -m` and prints numbers."""
