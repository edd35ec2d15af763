"""Serve flask_app.py with waitress and graceful-close's lingering close.

    python integrations/waitress_serve.py                      # 127.0.0.1:8080
    python integrations/waitress_serve.py 0.0.0.0:8080

The same from the command line, with waitress-serve's options:
    cd integrations && python -m graceful_close.waitress --listen=127.0.0.1:8080 flask_app:app

Flask answers the oversized upload early, but waitress reads a body before the app runs:
what answers an upload early here is waitress's own 413 at max_request_body_size, which
stock waitress cuts with RST and ours delivers.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # flask_app, next to this file

from flask_app import MAX_UPLOAD_BYTES, app

from graceful_close import configure
from graceful_close.waitress import serve


def main() -> None:
    configure(linger_time=30.0, linger_timeout=5.0, keepalive_requests=100)
    listen = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8080"
    serve(app, listen=listen, threads=4, max_request_body_size=MAX_UPLOAD_BYTES)


if __name__ == "__main__":
    main()
