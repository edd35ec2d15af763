"""Real nginx and Apache httpd for the probe tests: configs from tests/servers/, rendered into
a tmp dir, on 127.0.0.1 and a free port, in the foreground. Also hypercorn and waitress.

Both run as the current user. Started as root they hand their workers to an unprivileged
user (Apache refuses to serve as root), so the tmp dir is made world-readable.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVERS = Path(__file__).parent / "servers"
NGINX = "/usr/sbin/nginx"
APACHE = "/usr/sbin/apache2"
APACHE_MODULES = "/usr/lib/apache2/modules"
BIG_SIZE = 2_000_000          # >= 1 MB: bigger than the loopback socket buffers at first
BIG_PATH = "/big.bin"
CLOSE_PATH = "/close/big.bin"
UPLOAD_PATH = "/upload"
STARTUP_TIMEOUT = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_http(port: int) -> bool:
    """True once a server on `port` answers a request with an HTTP/1.x status line."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return sock.recv(12).startswith(b"HTTP/1.")
    except OSError:
        return False


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    """The server in a session of its own (stopped as a group), output discarded."""
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _answering(proc: subprocess.Popen[bytes], port: int) -> bool:
    """Wait until the server on `port` answers (True); False when it exited first or
    STARTUP_TIMEOUT passed."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if _answers_http(port):
            return True
        time.sleep(0.1)
    return False


def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL to the whole session after 10 s."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _unprivileged(kind: str) -> str:
    """The user (and group) line for a server started as root; nothing otherwise."""
    if os.geteuid() != 0:
        return ""
    for name in ("www-data", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return f"user {name};" if kind == "nginx" else f"User {name}\nGroup #{pwd.getpwnam(name).pw_gid}"
    return ""


@dataclass
class RealServer:
    """One nginx or Apache process serving `root` (with big.bin and upload) on `port`."""

    kind: str                      # nginx or apache
    extra: str = ""                # config lines added at the http/server-config level
    port: int = 0
    tmp: Path = field(default_factory=Path)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def binary(self) -> str:
        return NGINX if self.kind == "nginx" else APACHE

    def render(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"probe-{self.kind}-"))
        self.tmp.chmod(0o755)  # the unprivileged worker reads the files below
        root = self.tmp / "root"
        root.mkdir()
        root.chmod(0o755)
        (root / "big.bin").write_bytes(b"0123456789abcdef" * (BIG_SIZE // 16))
        (root / "upload").write_bytes(b"upload target\n")
        (root / "index.html").write_bytes(b"ok\n")
        for path in root.iterdir():
            path.chmod(0o644)
        self.port = free_port()
        template = string.Template((SERVERS / f"{self.kind}.conf").read_text())
        config = self.tmp / f"{self.kind}.conf"
        config.write_text(template.substitute(
            tmp=self.tmp, root=root, port=self.port, extra=self.extra,
            modules=APACHE_MODULES, user=_unprivileged(self.kind)))
        return config

    def argv(self, config: Path) -> list[str]:
        if self.kind == "nginx":
            return [NGINX, "-p", str(self.tmp), "-c", str(config)]
        return [APACHE, "-d", str(self.tmp), "-f", str(config), "-DFOREGROUND"]

    def start(self) -> RealServer:
        config = self.render()
        self.proc = _spawn(self.argv(config))
        if _answering(self.proc, self.port):
            return self
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.kind} exited at startup:\n{self.error_log()}")
        self.stop()
        raise RuntimeError(f"{self.kind} never answered on port {self.port}:\n{self.error_log()}")

    def error_log(self) -> str:
        path = self.tmp / "error.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no error log)"

    def stop(self) -> None:
        # Both stop at once on SIGTERM (nginx: fast shutdown; Apache: stop).
        _terminate(self.proc)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> RealServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class PythonServer:
    """hypercorn or waitress serving one of our sample apps on 127.0.0.1 and a free port."""

    argv_for_port: list[str]       # with "{port}" where the port goes
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PythonServer:
        self.port = free_port()
        argv = [arg.replace("{port}", str(self.port)) for arg in self.argv_for_port]
        self.proc = _spawn(argv)
        if _answering(self.proc, self.port):
            return self
        self.stop()
        raise RuntimeError(f"{' '.join(argv)} never answered on port {self.port}")

    def stop(self) -> None:
        _terminate(self.proc)

    def __enter__(self) -> PythonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
