"""Items 4 and 5: memory of a worker holding many lingering sockets, and the TCP
states left on the server port after never-closing clients."""

from __future__ import annotations

import time

from graceful_close.diagnostics.processes import fd_count, tcp_state_counts, wait_until, worker_pid
from graceful_close.diagnostics.scenarios import Target
from graceful_close.diagnostics.wire import request_bytes

from .crowd import NeverClosingCrowd, measure_latency
from .observe import rss_bytes
from .plan import Plan
from .servers import VARIANTS, BenchTarget

CENSUS_STATES = ("FIN-WAIT-2", "CLOSE-WAIT", "TIME-WAIT", "ESTAB", "FIN-WAIT-1", "LAST-ACK")


def _wait_stable(read, limit: float, quiet: float = 1.0) -> None:
    """Wait until read() has not changed for `quiet` seconds (at most `limit`)."""
    deadline = time.monotonic() + limit
    last, since = read(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.2)
        value = read()
        if value != last:
            last, since = value, time.monotonic()


# Keep-alive timeouts long enough for a stock server to hold every idle client.
LONG_KEEPALIVE = {"gunicorn": ("--keep-alive", "900"), "uvicorn": ("--timeout-keep-alive", "900"),
                  "hypercorn": ("--keep-alive", "900"), "waitress": ("--channel-timeout=900",)}


# Who ends the lingering connections (issue 18): the memory of a lingering socket must not
# depend on it. Each: (request path, Connection: close from the client, extra env, server
# arguments by server kind or None). "client" needs lingering_close=always: under the default
# auto those connections are closed at once and nothing lingers.
RSS_PATHS = ("app", "client", "cap", "timeout")
WSGI_KEYS = ("sync", "gthread", "gevent")


def rss_setup(key: str, server: str, how: str) -> tuple[str, bool, dict[str, str], tuple[str, ...]]:
    wsgi = key in WSGI_KEYS
    if how == "app":  # the app answers Connection: close (gunicorn's WSGI workers: --keep-alive 0)
        return ("/" if wsgi else "/?close=1"), False, {}, (("--keep-alive", "0") if wsgi else ())
    if how == "client":
        return "/", True, {"GRACEFUL_CLOSE_LINGERING_CLOSE": "always"}, ()
    if how == "cap":  # the keep-alive request cap ends the connection after its first request
        return "/", False, {"GRACEFUL_CLOSE_KEEPALIVE_REQUESTS": "1"}, ()
    if how == "timeout":  # the idle keep-alive timeout (1 s) ends it
        args = {"gunicorn": ("--keep-alive", "1"), "hypercorn": ("--keep-alive", "1"),
                "waitress": ("--channel-timeout=1",)}.get(server, ("--timeout-keep-alive", "1"))
        return "/", False, {}, args
    raise ValueError(how)


def measure_rss(target: BenchTarget, plan: Plan, log=print, idle_stock: bool = False,
                how: str = "app") -> dict:
    """RSS and fds of one graceful worker before and while it lingers on
    plan.rss_clients never-closing clients (deadlines long enough to hold them all), whose
    connections are ended by `how` (RSS_PATHS).

    idle_stock=True measures the reference instead: the stock server holding as many
    idle keep-alive connections (what any open connection costs that server)."""
    n = plan.rss_clients
    env = {**plan.graceful_env, "GRACEFUL_CLOSE_LINGER_TIMEOUT": "600",
           "GRACEFUL_CLOSE_LINGER_TIME": "900", "GRACEFUL_CLOSE_MAX_LINGERING": str(max(n, 10000))}
    path, client_closes, extra_env, args = rss_setup(target.key, target.server, how)
    env.update(extra_env)
    variant = "graceful"
    if idle_stock:
        variant, args, path, client_closes = "stock", LONG_KEEPALIVE[target.server], "/", False
    with target.make(variant, env, loop=plan.loop, extra_args=args) as server:
        pid = worker_pid(server.pid)
        addr = Target("127.0.0.1", server.port)
        measure_latency(addr, time.monotonic() + 1.0, think=0.0)  # warm up the worker
        time.sleep(1.5 if how == "timeout" else 0.5)  # let the warm-up connections end
        base_rss, base_fds = rss_bytes(pid), fd_count(pid)
        request = (request_bytes("GET", path, addr.authority, {"Connection": "close"})
                   if client_closes else request_bytes("GET", path, addr.authority))
        crowd = NeverClosingCrowd(addr, path, request=None if idle_stock else request,
                                  keep_alive=True)
        started = time.monotonic()
        for _ in range(n):
            crowd.arrive()
        # Held: the worker has an fd for (nearly) every client and stopped gaining more, and
        # (unless idle) the server has ended (nearly) every connection: they linger.
        want = 0.99 * (n - crowd.connect_failures)
        held = wait_until(lambda: fd_count(pid) - base_fds >= want
                          and (idle_stock or crowd.eof >= want), 120)
        fill_seconds = time.monotonic() - started
        _wait_stable(lambda: fd_count(pid), 10)
        rss, fds = rss_bytes(pid), fd_count(pid)
        states = tcp_state_counts(server.port)
        probe = measure_latency(addr, time.monotonic() + 1.0)
        crowd.close_all()
        released = wait_until(lambda: fd_count(pid) <= base_fds + 2, 120)
        result = {
            "how": "idle" if idle_stock else how,
            "clients": n, "connect_failures": crowd.connect_failures, "eof_seen": crowd.eof,
            "all_held": held, "fill_seconds": fill_seconds,
            "base_rss": base_rss, "rss": rss, "growth": rss - base_rss,
            "base_fds": base_fds, "fds": fds, "fds_after_release": fd_count(pid),
            "released_to_baseline": released,
            "server_fin_wait_2": states.get("FIN-WAIT-2", 0),
            "probe_requests": len(probe.seconds), "probe_failed": probe.failed,
            "probe_max": max(probe.seconds, default=float("nan")),
        }
    what = "stock, idle keep-alive" if idle_stock else f"graceful, lingering, ended by {how}"
    log(f"    RSS ({what}): {n}: +{result['growth'] / 2**20:.1f} MB "
        f"({base_rss / 2**20:.1f} -> {rss / 2**20:.1f} MB), fds {base_fds} -> {fds} -> "
        f"{result['fds_after_release']}")
    return result


def census_once(target: BenchTarget, variant: str, plan: Plan) -> dict:
    env = {**plan.graceful_env,
           "GRACEFUL_CLOSE_LINGER_TIMEOUT": str(plan.census_linger_timeout)}
    with target.make(variant, env, loop=plan.loop) as server:
        crowd = NeverClosingCrowd(Target("127.0.0.1", server.port))
        started = time.monotonic()
        crowd.arrive_at_rate(plan.census_clients, 100.0)
        expected = len(crowd.sockets)
        served = wait_until(lambda: crowd.answered >= expected, 120)
        served_after = time.monotonic() - started
        time.sleep(plan.census_after)
        server_side = tcp_state_counts(server.port, "server")
        client_side = tcp_state_counts(server.port, "client")
        result = {
            "clients": expected, "all_served": served,
            "served_after": served_after,
            "server": {s: server_side.get(s, 0) for s in CENSUS_STATES},
            "client": {s: client_side.get(s, 0) for s in CENSUS_STATES},
            "eof_seen": crowd.eof, "reset_seen": crowd.reset,
        }
        crowd.close_all()
    return result


def measure_census(target: BenchTarget, plan: Plan, log=print) -> dict:
    out: dict[str, dict] = {}
    for variant in VARIANTS:
        result = census_once(target, variant, plan)
        out[variant] = result
        log(f"    census {variant}: server {result['server']} client {result['client']}")
    return out
