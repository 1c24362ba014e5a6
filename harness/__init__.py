"""Benchmark harness: process supervision, ports, stacks, runner and metrics."""
