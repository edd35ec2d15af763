"""Run an ASGI app under uvicorn with the lingering close and the keep-alive policy.

    python integrations/uvicorn_launch.py myapp:app --host 0.0.0.0 --port 8000 --workers 4

Settings come from the environment, e.g.
    GRACEFUL_CLOSE_LINGER_TIMEOUT=5 GRACEFUL_CLOSE_KEEPALIVE_REQUESTS=100 python integrations/uvicorn_launch.py myapp:app

The same from uvicorn's command line:
    uvicorn myapp:app --http graceful_close.uvicorn:AutoHTTPProtocol
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn

PROTOCOL = "graceful_close.uvicorn:AutoHTTPProtocol"  # httptools if installed, else h11


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("app", nargs="?", default="graceful_close.diagnostics.sample_apps:asgi_app",
                        help="ASGI app as module:attribute (default: the sample app)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"))
    parser.add_argument("--timeout-keep-alive", type=int, default=5,
                        help="idle seconds before a keep-alive connection is closed (lingering)")
    parser.add_argument("--timeout-graceful-shutdown", type=int, default=None,
                        help="bound of the whole stop; lingering connections end before it")
    args = parser.parse_args(argv)
    # `myapp:app` means myapp.py in the current directory, as with uvicorn's own command
    # (its --app-dir defaults to "."); run as a script, sys.path[0] is integrations/ instead.
    sys.path.insert(0, os.getcwd())
    uvicorn.run(args.app, host=args.host, port=args.port, workers=args.workers, loop=args.loop,
                http=PROTOCOL, timeout_keep_alive=args.timeout_keep_alive,
                timeout_graceful_shutdown=args.timeout_graceful_shutdown)


if __name__ == "__main__":
    main()
