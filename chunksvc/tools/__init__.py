"""Measuring tools, each run as ``python -m chunksvc.tools.<name>`` (benchmarks, the load test)."""
