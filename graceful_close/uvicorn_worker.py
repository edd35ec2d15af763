"""Kept so that `-k graceful_close.uvicorn_worker.UvicornWorker` goes on working; the
worker lives in graceful_close.uvicorn.worker."""

from .uvicorn.worker import UvicornH11Worker, UvicornWorker

__all__ = ["UvicornH11Worker", "UvicornWorker"]
