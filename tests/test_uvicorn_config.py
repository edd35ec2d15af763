"""The protocol classes as objects: uvicorn.Config(http=...) and uvicorn.Server in process,
on a socket we bind (no signal handling off the main thread: stopped with should_exit)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

from graceful_close import uvicorn as graceful_uvicorn
from graceful_close.diagnostics.sample_apps import asgi_app
from graceful_close.diagnostics.scenarios import Target, pipelined_after_close


@pytest.mark.parametrize("protocol", [graceful_uvicorn.AutoHTTPProtocol,
                                      graceful_uvicorn.H11Protocol])
def test_config_with_the_protocol_class(protocol) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(asgi_app, http=protocol, loop="asyncio", lifespan="off",
                            log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        result = pipelined_after_close(Target("127.0.0.1", port), "/big?close=1&size=2000000")
        assert result.intact and result.ending == "FIN", result.as_dict()
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()
    assert not thread.is_alive()
