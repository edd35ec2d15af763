"""Tooling, apart from the runtime: the `graceful-close` command (probe, states, demo,
metrics), server launchers, sample apps and the scenario clients.

Nothing under graceful_close.gunicorn, graceful_close.uvicorn or graceful_close.engines
imports this package, so rich, psutil and prometheus_client stay out of a worker.
"""
