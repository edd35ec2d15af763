"""Drain engines: one per I/O model, each owning a connection from hand-off to close.

- poll: gunicorn's sync and gthread workers, driven by the worker's own loop (plain sockets);
- aio: asyncio transports (uvicorn, uvloop included).

Both take their decisions from graceful_close.core and share the socket helpers
of graceful_close.engines.sockets.
"""
