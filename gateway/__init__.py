"""The Ferry gateway: one v2 front door that routes, coalesces, retries and caches."""
