"""Drain engines: one per I/O model, each owning a connection from hand-off to close.

- threaded: gunicorn's sync and gthread workers (plain sockets);
- aio: asyncio transports (uvicorn, uvloop included).

Both take their decisions from graceful_close.core and share the socket helpers
of graceful_close.engines.sockets.
"""
