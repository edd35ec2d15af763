"""Kept so that `from graceful_close.gunicorn_hooks import ...` in existing gunicorn.conf.py
files goes on working; the hooks live in graceful_close.gunicorn.hooks."""

from .gunicorn.hooks import on_starting, pre_request

__all__ = ["on_starting", "pre_request"]
