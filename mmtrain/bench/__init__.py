"""Throughput benchmarks (`mmtrain bench ...`), printing JSON; GPU figures go in docs/measurements.md."""
