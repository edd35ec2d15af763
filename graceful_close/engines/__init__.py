"""Drain engines: one per I/O model, each owning a connection from hand-off to close.

- poll: gunicorn's sync and gthread workers, driven by the worker's own loop (plain sockets);
- aio: asyncio transports (uvicorn, uvloop included, and gunicorn's asgi worker);
- gevent: gunicorn's gevent worker, in the worker's hub (libev watchers, no greenlet each).

All take their decisions from graceful_close.core and share the socket helpers
of graceful_close.engines.sockets.
"""
