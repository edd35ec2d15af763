"""uvicorn HTTP protocols whose every close is a lingering close.

    uvicorn app:app --http graceful_close.uvicorn:HttpToolsProtocol
    uvicorn app:app --http graceful_close.uvicorn:H11Protocol
    uvicorn app:app --http graceful_close.uvicorn:AutoHTTPProtocol   # httptools if installed
    gunicorn -k graceful_close.uvicorn.worker.UvicornWorker app:app  # uvicorn under gunicorn
"""

from .protocols import (
    AutoHTTPProtocol,
    ClosingTransport,
    H11Protocol,
    HttpToolsProtocol,
    configure,
    current_settings,
)

__all__ = ["AutoHTTPProtocol", "ClosingTransport", "H11Protocol", "HttpToolsProtocol",
           "configure", "current_settings"]
