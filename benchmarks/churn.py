"""Issue 16: a pooled keep-alive client (graceful_close.diagnostics.pool) against servers whose
workers stop and recycle under it (--max-requests / --limit-max-requests, SIGHUP every few
seconds), stock and ours side by side; the same behind a real nginx; and stop times.

Used by the benchmark items `pool`, `nginx` and `stops` (full form: 25 s per server) and, in
a short form, by tests/test_stop_drain.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from graceful_close.diagnostics.launch import (
    ServerProcess,
    gunicorn_server,
    hypercorn_server,
    uvicorn_server,
)
from graceful_close.diagnostics.pool import PoolResult, run_pool

WSGI_APP = "graceful_close.diagnostics.sample_apps:wsgi_app"
ASGI_APP = "graceful_close.diagnostics.sample_apps:asgi_app"
KEEPALIVE = 75  # seconds: an upstream keep-alive longer than the load balancer's idle timeout
# gunicorn's --graceful-timeout (the tests lower it: stock UvicornWorker ignores the quick stop
# SIGQUIT and always takes this long to end).
GRACEFUL_TIMEOUT = 10


@dataclass(frozen=True)
class ChurnServer:
    """One server we support, stock or ours, set up to recycle its workers."""

    name: str
    kind: str          # gunicorn, uvicorn or hypercorn
    stock: str         # worker class / --http value
    ours: str

    def make(self, variant: str, workers: int = 2, max_requests: int = 300, jitter: int = 100,
             keepalive: int = KEEPALIVE, env: dict[str, str] | None = None,
             extra: tuple[str, ...] = ()) -> ServerProcess:
        impl = self.ours if variant == "ours" else self.stock
        if self.kind == "gunicorn":
            app = ASGI_APP if self.name in ("asgi", "uvicorn-worker") else WSGI_APP
            args = ["--keep-alive", str(keepalive), "--graceful-timeout", str(GRACEFUL_TIMEOUT), *extra]
            if self.name == "gthread":
                args += ["--threads", "8", "--worker-connections", "200"]
            if max_requests:
                args += ["--max-requests", str(max_requests), "--max-requests-jitter", str(jitter)]
            return gunicorn_server(app, impl, args, env=env, workers=workers)
        if self.kind == "hypercorn":  # ours through its config module; SIGHUP: its parent's reload
            args = ["--keep-alive", str(keepalive), "--graceful-timeout", str(GRACEFUL_TIMEOUT),
                    "--workers", str(workers), *extra]
            if max_requests:
                args += ["--max-requests", str(max_requests), "--max-requests-jitter", str(jitter)]
            return hypercorn_server(ASGI_APP, variant == "ours", args=args, env=env)
        args = ["--timeout-keep-alive", str(keepalive), *extra]
        if workers > 1:
            args += ["--workers", str(workers)]
        if max_requests:
            args += ["--limit-max-requests", str(max_requests)]
        return uvicorn_server(ASGI_APP, impl, args=args, env=env)


SERVERS = (
    ChurnServer("gthread", "gunicorn", "gthread", "graceful_close.gunicorn.ThreadWorker"),
    ChurnServer("gevent", "gunicorn", "gevent", "graceful_close.gunicorn.GeventWorker"),
    ChurnServer("asgi", "gunicorn", "asgi", "graceful_close.gunicorn.ASGIWorker"),
    ChurnServer("uvicorn-worker", "gunicorn", "uvicorn_worker.UvicornWorker",
                "graceful_close.gunicorn.UvicornWorker"),
    ChurnServer("httptools", "uvicorn", "httptools", "graceful_close.uvicorn:HttpToolsProtocol"),
    ChurnServer("h11", "uvicorn", "h11", "graceful_close.uvicorn:H11Protocol"),
    ChurnServer("zttp", "uvicorn", "zttp", "graceful_close.uvicorn:ZttpProtocol"),
    ChurnServer("hypercorn", "hypercorn", "asyncio", "python:graceful_close.hypercorn"),
)
BY_NAME = {server.name: server for server in SERVERS}


def churn(server: ServerProcess, seconds: float, hup_every: float,
          client: Callable[[float], PoolResult]) -> PoolResult:
    """Run `client` for `seconds` while SIGHUP goes to the server every `hup_every` seconds."""
    box: list[PoolResult] = []
    thread = threading.Thread(target=lambda: box.append(client(seconds)), daemon=True)
    thread.start()
    started = time.monotonic()
    next_hup = started + hup_every
    while thread.is_alive():
        thread.join(0.05)
        if hup_every and time.monotonic() >= next_hup and time.monotonic() < started + seconds - 0.5:
            server.signal(signal.SIGHUP)
            next_hup += hup_every
    thread.join()
    return box[0]


def pool_run(server: ChurnServer, variant: str, seconds: float, hup_every: float = 5.0,
             max_requests: int = 300, jitter: int = 100, seed: int | None = None) -> PoolResult:
    with server.make(variant, max_requests=max_requests, jitter=jitter) as proc:
        return churn(proc, seconds, hup_every,
                     lambda s: run_pool("127.0.0.1", proc.port, s, seed=seed))


# ---- nginx in front --------------------------------------------------------------------------

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
_NGINX_CONF = """daemon off;
master_process on;
worker_processes 1;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream app {{
        server 127.0.0.1:{upstream};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_timeout 75s;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _nginx_user() -> str:
    if os.geteuid() != 0:
        return ""
    import pwd

    for name in ("www-data", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return f"user {name};"
    return ""


@contextmanager
def nginx_in_front(upstream_port: int) -> Iterator[int]:
    """A real nginx proxying to 127.0.0.1:upstream_port with an upstream keep-alive pool of 16;
    yields the port nginx listens on."""
    tmp = Path(tempfile.mkdtemp(prefix="issue16-nginx-"))
    tmp.chmod(0o755)
    port = _free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(tmp=tmp, port=port, upstream=upstream_port,
                                       user=_nginx_user()))
    proc = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(conf)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("nginx exited: " + (tmp / "error.log").read_text()) from None
                time.sleep(0.05)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def nginx_run(server: ChurnServer, variant: str, seconds: float, hup_every: float = 5.0,
              max_requests: int = 300, jitter: int = 100) -> PoolResult:
    """POSTs through nginx (which does not retry them on another connection): a request lost
    on a pooled upstream connection becomes a 502."""
    with server.make(variant, max_requests=max_requests, jitter=jitter) as proc, \
            nginx_in_front(proc.port) as port:
        return churn(proc, seconds, hup_every,
                     lambda s: run_pool("127.0.0.1", port, s, method="POST", body=b"x" * 64))


# ---- stop times --------------------------------------------------------------------------------

def _idle_clients(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"ok\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        socks.append(sock)
    return socks


def stop_time_idle(server: ChurnServer, variant: str, idle_for: float = 1.5, clients: int = 3,
                   timeout: float = 30.0) -> float:
    """Seconds from SIGTERM to exit with `clients` keep-alive connections idle for `idle_for`
    (longer than the drain window), one worker and no recycling."""
    proc = server.make(variant, workers=1, max_requests=0).start()
    try:
        socks = _idle_clients(proc.port, clients)
        time.sleep(idle_for)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        proc.wait(timeout)
        took = time.monotonic() - started
        for sock in socks:
            sock.close()
        return took
    finally:
        proc.stop()


def stop_time_active(server: ChurnServer, variant: str, timeout: float = 30.0) -> tuple[float, PoolResult]:
    """Seconds from SIGTERM to exit while a pool keeps using its connections (one worker), and
    what the pool saw (requests after the stop began are refused: the server is going away)."""
    proc = server.make(variant, workers=1, max_requests=0).start()
    box: list[PoolResult] = []
    try:
        thread = threading.Thread(target=lambda: box.append(
            run_pool("127.0.0.1", proc.port, 2.0 + timeout / 10)), daemon=True)
        thread.start()
        time.sleep(1.0)
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        proc.wait(timeout)
        took = time.monotonic() - started
        thread.join()
        return took, box[0]
    finally:
        proc.stop()


__all__ = ["BY_NAME", "SERVERS", "ChurnServer", "churn", "nginx_in_front", "nginx_run",
           "pool_run", "stop_time_active", "stop_time_idle"]


if __name__ == "__main__":
    names = sys.argv[1:] or list(BY_NAME)
    for name in names:
        for variant in ("stock", "ours"):
            print(name, variant, pool_run(BY_NAME[name], variant, 10.0).row(), flush=True)


# ---- the benchmark items (python -m benchmarks --items pool,nginx,stops) -----------------------

CHURN_ITEMS = ("pool", "nginx", "stops")


def run_items(items: list[str], runs: int, seconds: float, hup_every: float, servers: list[str],
              out_dir: Path, log: Callable[[str], None] = print) -> dict[str, object]:
    """Run the churn items, write churn_results.json and CHURN.md into out_dir."""
    import json

    results: dict[str, object] = {"seconds": seconds, "hup_every": hup_every, "runs": runs,
                                  "command": "python -m benchmarks " + " ".join(sys.argv[1:])}
    picked = [BY_NAME[name] for name in servers]
    if "pool" in items:
        pool: dict[str, dict[str, list[dict[str, object]]]] = {}
        for run in range(runs):
            for server in picked:
                for variant in ("stock", "ours"):  # side by side, alternating
                    result = pool_run(server, variant, seconds, hup_every)
                    pool.setdefault(server.name, {}).setdefault(variant, []).append(result.as_dict())
                    log(f"  pool run {run + 1} {server.name} {variant}: {result.row()}, "
                        f"{result.per_second:.0f}/s")
        results["pool"] = pool
    if "nginx" in items:
        nginx: dict[str, dict[str, list[dict[str, object]]]] = {}
        for run in range(runs):
            for server in picked:
                for variant in ("stock", "ours"):
                    result = nginx_run(server, variant, seconds, hup_every)
                    nginx.setdefault(server.name, {}).setdefault(variant, []).append(result.as_dict())
                    log(f"  nginx run {run + 1} {server.name} {variant}: 502s "
                        f"{result.statuses.get(502, 0)} / {result.requests}, {result.row()}")
        results["nginx"] = nginx
    if "stops" in items:
        stops: dict[str, dict[str, dict[str, object]]] = {}
        for server in picked:
            for variant in ("stock", "ours"):
                idle = [stop_time_idle(server, variant) for _ in range(runs)]
                active = [stop_time_active(server, variant) for _ in range(runs)]
                stops.setdefault(server.name, {})[variant] = {
                    "idle": [round(t, 2) for t in idle],
                    "active": [round(t, 2) for t, _ in active],
                    "active_failed": [r.failed for _, r in active]}
                log(f"  stops {server.name} {variant}: idle {idle}, active {[t for t, _ in active]}")
        results["stops"] = stops
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "churn_results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "CHURN.md").write_text(report(results))
    return results


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def report(results: dict) -> str:
    lines = ["# Restarts and recycles under a pooled client (issue 16)", "",
             f"`{results['command']}`: {results['runs']} run(s), {results['seconds']:g} s per server "
             f"and run, 2 workers, --max-requests 300 --max-requests-jitter 100 (uvicorn: "
             f"--workers 2 --limit-max-requests 300), keep-alive timeout {KEEPALIVE} s, SIGHUP "
             f"every {results['hup_every']:g} s. Pool: 16 persistent connections, 0-50 ms pauses, "
             "no retries.", ""]
    for item, title in (("pool", "Pool client: failed / requests per run"),
                        ("nginx", "Behind nginx (keepalive 16, POST): 502s / requests per run")):
        data = results.get(item)
        if not data:
            continue
        lines += [f"## {title}", "", "| server | stock | ours | responses/s stock | responses/s ours |",
                  "|---|---|---|---|---|"]
        for name, variants in data.items():
            cells = []
            for variant in ("stock", "ours"):
                runs = variants.get(variant, [])
                if item == "pool":
                    cells.append(", ".join(f"{r['failed']}/{r['requests']}" for r in runs))
                else:
                    cells.append(", ".join(f"{r['statuses'].get('502', 0)}/{r['requests']}"
                                           + (f" (+{r['failed']} failed)" if r["failed"] else "")
                                           for r in runs))
            rates = [f"{_median([r['per_second'] for r in variants.get(v, [])] or [0]):.0f}"
                     for v in ("stock", "ours")]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} | {rates[0]} | {rates[1]} |")
        lines.append("")
    stops = results.get("stops")
    if stops:
        lines += ["## Stop times (SIGTERM to exit, one worker, seconds, median of runs)", "",
                  "| server | 3 idle clients (idle 1.5 s) stock | ours | active pool stock | ours |",
                  "|---|---|---|---|---|"]
        for name, variants in stops.items():
            cells = [f"{_median(variants[v][k]):.2f}" for k in ("idle", "active") for v in ("stock", "ours")]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
        lines.append("")
    return "\n".join(lines)
