"""uvicorn HTTP protocols whose every close is a lingering close.

    uvicorn app:app --http graceful_close.uvicorn:HttpToolsProtocol
    uvicorn app:app --http graceful_close.uvicorn:H11Protocol
    uvicorn app:app --http graceful_close.uvicorn:AutoHTTPProtocol   # httptools if installed
    uvicorn app:app --http graceful_close.uvicorn:ZttpProtocol       # pip install "graceful-close[zttp]"
    gunicorn -k graceful_close.uvicorn.worker.UvicornWorker app:app  # uvicorn under gunicorn

ZttpProtocol and AutoZttpProtocol are imported on first access, so this package
imports without zttp; accessing them without it says what to install. The same for
HttpToolsProtocol without httptools (the zttp extra alone has no httptools).
"""

from typing import Any

from . import protocols
from ._mixin import LingeringCloseMixin
from .protocols import AutoHTTPProtocol, ClosingTransport, H11Protocol, configure, current_settings


def __getattr__(name: str) -> Any:
    if name in ("ZttpProtocol", "AutoZttpProtocol", "HttpToolsProtocol"):
        return getattr(protocols, name)  # imported on first use: zttp and httptools are optional
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AutoHTTPProtocol", "ClosingTransport", "H11Protocol", "HttpToolsProtocol",
           "LingeringCloseMixin", "configure", "current_settings"]
