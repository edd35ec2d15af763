"""The self-check of graceful_close.uvicorn._compat (issue 10 item 2): a uvicorn whose
protocols no longer close through the transport we wrap makes our server refuse to
start, with one line naming uvicorn's version and what changed, instead of silently
serving stock closes. The incompatible uvicorn is simulated in a subprocess by
replacing one of the methods we depend on."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import uvicorn

from graceful_close.uvicorn import _compat
from tests.uvicorn_servers import REPO

CASE = textwrap.dedent('''
    import sys
    import uvicorn
    import uvicorn.protocols.http.h11_impl as h11_impl


    def timeout_keep_alive_handler(self):  # a "new uvicorn" that no longer closes via close()
        self.transport.abort()


    h11_impl.H11Protocol.timeout_keep_alive_handler = timeout_keep_alive_handler
    if sys.argv[1] == "string":  # the CLI way: uvicorn loads our protocol while it starts
        uvicorn.run("tests.uvicorn_apps:app", http="graceful_close.uvicorn:H11Protocol",
                    port=0, app_dir=sys.argv[2], lifespan="off")
    else:  # the class imported before the server runs: the first connection checks
        sys.path.insert(0, sys.argv[2])
        from graceful_close.uvicorn import H11Protocol
        from tests.uvicorn_apps import app
        uvicorn.run(app, http=H11Protocol, port=int(sys.argv[3]), lifespan="off")
''')
EXPECTED = (f"graceful-close: uvicorn {uvicorn.__version__} is not supported: "
            "H11Protocol.timeout_keep_alive_handler no longer has `self.transport.close()`")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _our_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("graceful-close:")]


def test_the_running_uvicorn_passes_the_check() -> None:
    assert _compat.protocol_problems() == []


def test_incompatible_uvicorn_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    script = tmp_path / "case.py"
    script.write_text(CASE)
    done = subprocess.run([sys.executable, str(script), "string", str(REPO)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = _our_lines(done.stdout + done.stderr)
    assert len(lines) == 1 and lines[0].startswith(EXPECTED), done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_incompatible_uvicorn_stops_at_the_first_connection_when_started_with_the_class(
        tmp_path: Path) -> None:
    script = tmp_path / "case.py"
    script.write_text(CASE)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(script), "object", str(REPO), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    sock.recv(100)
            except OSError:
                pass
            time.sleep(0.2)
        output = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    lines = _our_lines(output)
    assert len(lines) == 1 and lines[0].startswith(EXPECTED), output
