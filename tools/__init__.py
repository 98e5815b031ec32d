"""Measuring tools and the test harness, each tool run from the checkout's root as
``python -m tools.<name>`` (benchmarks, the load test). Not part of the service's wheel: nothing
in ``chunksvc`` imports from here."""
