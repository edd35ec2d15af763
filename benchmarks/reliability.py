"""Issue 20's measurements, stock and ours side by side on every server:

    python -m benchmarks.reliability [--targets gthread,httptools] [--cases stop,deadline,emfile]
                                     [--reps 3] [--loop asyncio|uvloop] [--json out.json]

- stop: seconds from the stop signal to the server's exit, with one client that uploaded,
  got its early 413 and then (a) trickles a byte every 200 ms, SIGTERM; (b) went quiet,
  SIGTERM; (c) trickles, quick stop (gunicorn SIGQUIT, uvicorn SIGINT); (d) trickles,
  SIGTERM with a graceful timeout of 2 s (gunicorn --graceful-timeout 2, uvicorn
  --timeout-graceful-shutdown 2). The signal comes 0.75 s after the client read its 413.
- deadline: a client reads the response to an HTTP/1.0 GET and our FIN, then holds its end
  open without a word past linger_timeout (1 s here): does it see RST, or only the FIN?
- emfile: the server runs with RLIMIT_NOFILE 64 (prlimit). 80 hogs connect at once, each
  makes one keep-alive request and then holds its connection idle (a pooled client); then
  100 new clients arrive, one every 50 ms (5 s in all), each waiting up to 3 s for its
  answer: how many are answered, and the slowest answer (3 s when one was not); then the
  hogs leave and we time the first answer after that (recovery).

Every number is the median of --reps runs (stock and ours alternate). Timing lives here,
not in the tests (tests/test_reliability_stop.py and friends check loose bounds only).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from graceful_close.diagnostics.launch import ServerProcess
from graceful_close.diagnostics.processes import tcp_states, worker_pid
from graceful_close.diagnostics.scenarios import old_client_request
from graceful_close.diagnostics.wire import ConnectionEnded, ResponseReader, request_bytes

from .servers import TARGETS, VARIANTS

SIGNAL_AFTER = 0.75   # seconds between the client's 413 and the stop signal
TRICKLE_EVERY = 0.2
NOFILE = 64
HOGS = 80
NEW_CLIENTS = 100
ARRIVE_EVERY = 0.05
CLIENT_TIMEOUT = 3.0
HOG_TIMEOUT = 2.0
DEADLINE_ENV = {"GRACEFUL_CLOSE_LINGER_TIMEOUT": "1", "GRACEFUL_CLOSE_LINGER_TIME": "30"}


def _server(key: str, variant: str, loop: str, args: tuple[str, ...] = (),
            env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> ServerProcess:
    server = TARGETS[key].make(variant, env, loop=loop, extra_args=args)
    server.argv = [*prefix, *server.argv]
    return server


def _is_uvicorn(key: str) -> bool:
    return TARGETS[key].server == "uvicorn"


# ---- stop ---------------------------------------------------------------------------------

def _client_after_413(port: int) -> socket.socket:
    """POST an 8 MB upload, send 64 KiB of it, read the early 413 (and the server's EOF when
    it comes within a second)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request_bytes("POST", "/upload?size=100", "x", content_length=8 << 20)
                 + b"u" * 65536)
    reader = ResponseReader(sock, time.monotonic() + 10)
    with suppress(ConnectionEnded, OSError):
        reader.read_response()
        reader.deadline = time.monotonic() + 1.0
        reader.read_end()
    return sock


def _trickle(sock: socket.socket, stop: threading.Event) -> None:
    while not stop.wait(TRICKLE_EVERY):
        try:
            sock.send(b"t")
        except OSError:
            return


def stop_seconds(key: str, variant: str, loop: str, case: str) -> float:
    """Seconds from the stop signal to the server's exit, for one case (see the docstring)."""
    uvicorn = _is_uvicorn(key)
    args: tuple[str, ...] = ()
    if case == "graceful2":
        args = ("--timeout-graceful-shutdown", "2") if uvicorn else ("--graceful-timeout", "2")
    sig = signal.SIGTERM
    if case == "quick":
        sig = signal.SIGINT if uvicorn else signal.SIGQUIT
    server = _server(key, variant, loop, args).start()
    stop = threading.Event()
    try:
        sock = _client_after_413(server.port)
        if case != "quiet":
            threading.Thread(target=_trickle, args=(sock, stop), daemon=True).start()
        time.sleep(SIGNAL_AFTER)
        started = time.monotonic()
        server.signal(sig)
        if server.wait(60) is None:
            return float("nan")
        return time.monotonic() - started
    finally:
        stop.set()
        server.stop()
        with suppress(Exception):
            sock.close()


# ---- deadline -------------------------------------------------------------------------------

def deadline_ending(key: str, variant: str, loop: str, abort: bool = False) -> dict[str, Any]:
    """What a quiet client holding a finished connection sees once linger_timeout (1 s) has
    passed: "RST", or "FIN" only (the server's FIN at the half-close, then nothing); and the
    TCP states of the server's side then (ss: FIN-WAIT-2 without a process is the kernel's
    orphan). abort: ours with abort_on_timeout=true (else the default)."""
    env = {**DEADLINE_ENV, "GRACEFUL_CLOSE_ABORT_ON_TIMEOUT": "true"} if abort else DEADLINE_ENV
    server = _server(key, variant, loop, env=env).start()
    try:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(old_client_request("/", "x"))  # an implicit close: it lingers under auto
        reader = ResponseReader(sock, time.monotonic() + 10)
        try:
            reader.read_response()
            end = reader.read_end()
        except ConnectionEnded as ended:
            end = ended.kind
        states: list[str] = []
        if end == "FIN":
            time.sleep(2.5)
            end = "RST" if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) else "FIN"
            states = [state for state in tcp_states(server.port) if state != "LISTEN"]
        sock.close()
        return {"client": end, "server": states}
    finally:
        server.stop()


# ---- descriptors ----------------------------------------------------------------------------

def _hog(port: int, held: list[socket.socket]) -> None:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=HOG_TIMEOUT)
    except OSError:
        return
    try:
        sock.sendall(request_bytes("GET", "/", "x"))
        ResponseReader(sock, time.monotonic() + HOG_TIMEOUT).read_response()
        held.append(sock)
    except (OSError, ConnectionEnded):
        sock.close()


def _hogs(port: int) -> list[socket.socket]:
    """HOGS keep-alive clients at once: each makes one request and then holds its connection
    idle (a pooled client); one not answered within HOG_TIMEOUT gives up."""
    held: list[socket.socket] = []
    threads = [threading.Thread(target=_hog, args=(port, held)) for _ in range(HOGS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return held


def _answered(port: int, timeout: float) -> float | None:
    """Seconds to a complete answer on a new connection, or None."""
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(request_bytes("GET", "/", "x", {"Connection": "close"}))
            if ResponseReader(sock, started + timeout).read_response().complete:
                return time.monotonic() - started
    except (OSError, ConnectionEnded):
        pass
    return None


def emfile(key: str, variant: str, loop: str) -> dict[str, Any]:
    server = _server(key, variant, loop,
                     prefix=("prlimit", f"--nofile={NOFILE}:{NOFILE}", "--")).start()
    hogs: list[socket.socket] = []
    try:
        worker = worker_pid(server.pid)
        hogs = _hogs(server.port)
        latencies: list[float | None] = [None] * NEW_CLIENTS

        def arrive(i: int) -> None:
            latencies[i] = _answered(server.port, CLIENT_TIMEOUT)

        arrivals = []
        for i in range(NEW_CLIENTS):
            arrivals.append(threading.Thread(target=arrive, args=(i,)))
            arrivals[-1].start()
            time.sleep(ARRIVE_EVERY)
        for thread in arrivals:
            thread.join()
        answered = [x for x in latencies if x is not None]
        replaced = worker_pid(server.pid) != worker  # stock gthread's worker dies of EMFILE
        slowest = max(answered, default=0.0) if len(answered) == NEW_CLIENTS else CLIENT_TIMEOUT
        for sock in hogs:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        left = time.monotonic()
        recovery = None
        while time.monotonic() - left < 20:
            if _answered(server.port, 1.0) is not None:
                recovery = time.monotonic() - left
                break
        return {"answered": len(answered), "attempts": NEW_CLIENTS, "hogs": len(hogs),
                "worker_replaced": replaced,
                "slowest": round(slowest, 3), "recovery": None if recovery is None else round(recovery, 3)}
    finally:
        for sock in hogs:
            with suppress(OSError):
                sock.close()
        server.stop()


# ---- the run ----------------------------------------------------------------------------------

STOP_CASES = ("trickle", "quiet", "quick", "graceful2")


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def run(targets: list[str], cases: list[str], reps: int, loop: str,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for key in targets:
        entry = results[key] = {}
        if "stop" in cases:
            for case in STOP_CASES:
                times: dict[str, list[float]] = {v: [] for v in VARIANTS}
                for _ in range(reps):
                    for variant in VARIANTS:
                        times[variant].append(stop_seconds(key, variant, loop, case))
                entry[f"stop_{case}"] = {v: {"median": _median(t), "runs": [round(x, 2) for x in t]}
                                         for v, t in times.items()}
                log(f"{key} stop {case}: " + ", ".join(
                    f"{v} {entry[f'stop_{case}'][v]['median']} {entry[f'stop_{case}'][v]['runs']}"
                    for v in VARIANTS))
        if "deadline" in cases:
            entry["deadline"] = {v: deadline_ending(key, v, loop) for v in VARIANTS}
            entry["deadline"]["graceful-abort"] = deadline_ending(key, "graceful", loop, abort=True)
            log(f"{key} deadline: {entry['deadline']}")
        if "emfile" in cases:
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
            for _ in range(reps):
                for variant in VARIANTS:
                    runs[variant].append(emfile(key, variant, loop))
            entry["emfile"] = {v: {"answered": _median([r["answered"] for r in rs]),
                                   "attempts": _median([r["attempts"] for r in rs]),
                                   "slowest": _median([r["slowest"] for r in rs]),
                                   "recovery": _median([r["recovery"] if r["recovery"] is not None
                                                        else float("nan") for r in rs]),
                                   "runs": rs}
                               for v, rs in runs.items()}
            log(f"{key} emfile: " + "; ".join(
                f"{v} {e['answered']:g}/{e['attempts']:g} slowest {e['slowest']} s "
                f"recovery {e['recovery']} s {[(r['answered'], r['attempts']) for r in e['runs']]}"
                for v, e in entry["emfile"].items()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--cases", default="stop,deadline,emfile")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--loop", default="asyncio", choices=("asyncio", "uvloop"))
    parser.add_argument("--json")
    opts = parser.parse_args()
    results = run(opts.targets.split(","), opts.cases.split(","), opts.reps, opts.loop,
                  log=lambda line: print(line, flush=True))
    if opts.json:
        with open(opts.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
