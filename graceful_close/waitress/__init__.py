"""waitress with the lingering close of graceful-close.

    python -m graceful_close.waitress --listen=0.0.0.0:8080 module:app   # waitress-serve's options

    from graceful_close.waitress import serve, create_server
    serve(app, listen="0.0.0.0:8080")          # in place of waitress.serve
    server = create_server(app, port=8080)     # in place of waitress.create_server
    server.run()
"""

from .channel import GracefulChannel, GracefulWSGITask, LingerDispatcher
from .server import create_server, finish, serve

__all__ = ["GracefulChannel", "GracefulWSGITask", "LingerDispatcher", "create_server", "finish",
           "serve"]
