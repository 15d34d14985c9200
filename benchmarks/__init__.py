"""Ferry's benchmarks: scenarios, the transport floor server, the load generator and the report.

``ferry bench`` (``benchmarks/cli.py``, registered through the ``ferry.commands`` entry point)
drives them; see docs/benchmarks.md.
"""
