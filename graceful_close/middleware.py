"""Kept so that `from graceful_close.middleware import KeepAliveMiddleware` goes on working;
the middleware lives in graceful_close.asgi."""

from .asgi import KeepAliveMiddleware

__all__ = ["KeepAliveMiddleware"]
