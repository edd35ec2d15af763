"""The command line: every error is one line on stderr, exit status 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from graceful_close.diagnostics.cli import main

SCRIPT = Path(sys.executable).with_name("graceful-close")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def not_http_port():
    """Accepts and closes at once: something listens, but it does not speak HTTP."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(2)
    server.close()


def error_cases(port: int, dead: int) -> list[tuple[list[str], str]]:
    url = f"http://127.0.0.1:{dead}/"
    return [
        (["probe", "ftp://example.com/"], "must look like http://"),
        (["probe", url], "cannot reach"),
        (["probe", f"http://127.0.0.1:{port}/"], "did not answer an HTTP/1.1 GET"),
        (["probe", url, "--pipeline", "5000"], "--pipeline=5000 is out of range"),
        (["probe", url, "--upload-size", "100M"], "--upload-size"),
        (["probe", url, "--upload-size", "ten"], "invalid size"),
        (["probe", url, "--idle-max", "0"], "must be > 0"),
        (["probe", url, "--only", "nope"], "unknown scenario"),
        (["probe", url, "--only", "idle", "--skip", "idle"], "leave no scenario"),
        (["probe"], "url"),
        (["states", "--pid", "999999999"], "no process with pid 999999999"),
        (["states", "--port", "70000"], "out of range"),
        (["states", "--watch", "1", "--samples", "0"], "--samples"),
        (["demo", "--only", "nginx"], "invalid choice"),
        (["metrics", "--dir", "/tmp", "--port", "70000"], "out of range"),
        (["frobnicate"], "invalid choice"),
    ]


def test_every_error_is_one_line(not_http_port: int, capsys) -> None:
    dead = _closed_port()
    for argv, expected in error_cases(not_http_port, dead):
        status = main(argv)
        out, err = capsys.readouterr()
        assert status == 2, argv
        assert out == "", argv
        assert err.count("\n") == 1 and expected in err, (argv, err)


def test_bad_setting_in_the_environment_is_one_line(monkeypatch, capsys) -> None:
    """The demo starts graceful servers with the caller's GRACEFUL_CLOSE_* variables."""
    monkeypatch.setenv("GRACEFUL_CLOSE_LINGER_TIME", "abc")
    assert main(["demo", "--only", "uvicorn"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "GRACEFUL_CLOSE_LINGER_TIME='abc'" in err, err


def test_console_script_error_and_help() -> None:
    """The installed `graceful-close` script (the package's entry point): one-line error;
    --help documents the limits."""
    assert SCRIPT.exists(), f"no {SCRIPT}: the console script is not installed (pip install -e .)"
    env = {**os.environ, "COLUMNS": "100"}
    done = subprocess.run([str(SCRIPT), "probe", "http://127.0.0.1:1/"], capture_output=True,
                          text=True, timeout=30, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "cannot reach" in done.stderr
    help_text = subprocess.run([str(SCRIPT), "probe", "--help"], capture_output=True, text=True,
                               timeout=30, env=env).stdout
    assert "safe to point at a production server" in help_text and "--upload-size" in help_text
    version = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True, timeout=30)
    assert version.stdout.startswith("graceful-close ")


def test_python_dash_m_runs_the_same_command_line() -> None:
    """Issue 17 item 13: `python -m graceful_close` is `graceful-close`, errors included."""
    version = subprocess.run([sys.executable, "-m", "graceful_close", "--version"],
                             capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("graceful-close "), version
    done = subprocess.run([sys.executable, "-m", "graceful_close", "probe", "http://127.0.0.1:1/"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "cannot reach" in done.stderr
    imported = subprocess.run([sys.executable, "-c", "import sys, graceful_close; "
                               "print([m for m in sys.modules if 'diagnostics' in m or m == 'rich'])"],
                              capture_output=True, text=True, timeout=30)
    assert imported.stdout.strip() == "[]", imported
