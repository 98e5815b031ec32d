"""Measuring tools, each run as ``python -m tools.<name>`` (benchmarks, the load test)."""
