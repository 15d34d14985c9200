"""Ferry's benchmarks: scenarios, the transport floor server, the load generator and the report.

``ferry bench`` (``ferry/cli/bench.py``) drives them; see docs/benchmarks.md.
"""
