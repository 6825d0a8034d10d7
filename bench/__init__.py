"""Benchmarks: the standard throughput workload, latency, and the helpers they need."""
