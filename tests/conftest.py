import pytest

from graceful_close.diagnostics.launch import ServerProcess


@pytest.fixture
def start_server():
    """Start ServerProcess objects; every one is stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(server: ServerProcess) -> ServerProcess:
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
