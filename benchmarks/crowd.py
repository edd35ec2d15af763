"""Load patterns built on graceful_close.diagnostics.wire: a crowd of never-closing clients and
a normal client that measures request latency.

The crowd is the never_closing scenario of graceful_close.diagnostics.scenarios at scale:
each client sends an HTTP/1.0 request (the server ends the connection after it), reads its
response and the server's EOF, and never closes. One selector thread reads for all of them, so a
thousand such clients cost the benchmark process almost no CPU (one thread per
client, as scenarios.never_closing uses, would poll 50 times a second each).
"""

from __future__ import annotations

import math
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from graceful_close.diagnostics.scenarios import Target, old_client_request
from graceful_close.diagnostics.wire import ConnectionEnded, ResponseReader, request_bytes


class NeverClosingCrowd:
    def __init__(self, target: Target, path: str = "/", keep_alive: bool = False,
                 request: bytes | None = None) -> None:
        """An HTTP/1.0 GET without keep-alive, which the server ends (and lingers on, ours);
        keep_alive=True: an HTTP/1.1 GET (an idle keep-alive client, unless the server ends
        the connection); `request`: these bytes instead."""
        self.target = target
        if request is None:
            request = (request_bytes("GET", path, target.authority) if keep_alive
                       else old_client_request(path, target.authority))
        self.request = request
        self.sockets: list[socket.socket] = []
        self.connect_failures = 0
        self.answered = 0   # clients that received response bytes
        self.eof = 0        # clients that saw the server's FIN
        self.reset = 0      # clients whose connection was reset
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_loop, daemon=True, name="crowd")
        self._thread.start()

    def arrive(self, connect_timeout: float = 5.0) -> bool:
        try:
            sock = socket.create_connection((self.target.host, self.target.port),
                                            timeout=connect_timeout)
            sock.sendall(self.request)
        except OSError:
            self.connect_failures += 1
            return False
        sock.setblocking(False)
        with self._lock:
            self.sockets.append(sock)
            self._selector.register(sock, selectors.EVENT_READ, [False])
        return True

    def arrive_at_rate(self, count: int, per_second: float, stop: threading.Event | None = None,
                       deadline: float | None = None) -> None:
        start = time.monotonic()
        for i in range(count):
            if (stop is not None and stop.is_set()) or (deadline and time.monotonic() > deadline):
                return
            delay = start + i / per_second - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.arrive()

    def _read_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                registered = bool(self._selector.get_map())
            if not registered:
                time.sleep(0.01)
                continue
            for key, _ in self._selector.select(0.05):
                self._read(key)

    def _read(self, key: selectors.SelectorKey) -> None:
        sock, seen = key.fileobj, key.data
        try:
            data = sock.recv(65536)  # type: ignore[union-attr]
        except BlockingIOError:
            return
        except OSError:
            self.reset += 1
            self._forget(sock)
            return
        if data and not seen[0]:
            seen[0] = True
            self.answered += 1
        if not data:
            self.eof += 1
            self._forget(sock)  # stop watching, but keep it open: this client never closes

    def _forget(self, sock: object) -> None:
        with self._lock:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass

    def close_all(self) -> None:
        self._stop.set()
        self._thread.join(2)
        with self._lock:
            for sock in self.sockets:
                sock.close()
            self.sockets.clear()
        self._selector.close()


@dataclass
class LatencySamples:
    seconds: list[float] = field(default_factory=list)
    failed: int = 0      # requests that ended without a complete response
    censored: int = 0    # requests still waiting when the window closed (counted at the wait so far)


def measure_latency(target: Target, until: float, path: str = "/",
                    think: float = 0.01) -> LatencySamples:
    """One normal client: sequential requests, a new connection each, until `until`.

    A new connection per request works the same on every worker (the sync worker
    has no keep-alive) and waits in the same accept queue as the crowd. `think`
    seconds between requests keep it a client, not a load generator."""
    samples = LatencySamples()
    request = request_bytes("GET", path, target.authority, {"Connection": "close"})
    while time.monotonic() < until:
        started = time.monotonic()
        try:
            sock = target.connect(timeout=max(0.1, until - started))
        except OSError:
            samples.censored += 1
            samples.seconds.append(time.monotonic() - started)
            continue
        try:
            sock.sendall(request)
            response = ResponseReader(sock, until).read_response()
            if not response.complete:
                samples.failed += 1
        except ConnectionEnded as ended:
            if ended.kind == "TIMEOUT":
                samples.censored += 1
            else:
                samples.failed += 1
        except OSError:
            samples.failed += 1
        finally:
            sock.close()
        samples.seconds.append(time.monotonic() - started)
        time.sleep(think)
    return samples


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
