"""Benchmarks of graceful-close against the stock servers (run: python -m benchmarks)."""
