"""The servers under test: each supported worker/protocol, stock and graceful.

Servers are started with graceful_close.diagnostics.launch; this module only decides the
command-line arguments and the GRACEFUL_CLOSE_* environment of each variant.
"""

from __future__ import annotations

from dataclasses import dataclass

from graceful_close.diagnostics import launch

WSGI_APP = "graceful_close.diagnostics.sample_apps:wsgi_app"
ASGI_APP = "graceful_close.diagnostics.sample_apps:asgi_app"
VARIANTS = ("stock", "graceful")
GTHREAD_THREADS = "4"


@dataclass(frozen=True)
class BenchTarget:
    key: str    # short name from launch.GUNICORN_WORKERS / launch.UVICORN_PROTOCOLS
    label: str  # how the report names it
    server: str  # "gunicorn", "uvicorn", "hypercorn" or "waitress"

    def implementation(self, variant: str) -> str:
        table = {"gunicorn": launch.GUNICORN_WORKERS, "uvicorn": launch.UVICORN_PROTOCOLS,
                 "hypercorn": OTHER_SERVERS, "waitress": OTHER_SERVERS}[self.server]
        stock, ours = table[self.key]
        return stock if variant == "stock" else ours

    def missing(self) -> str | None:
        """Why our variant cannot run (its class does not import), or None."""
        return launch.import_problem(IMPORTED.get(self.key, self.implementation("graceful")))

    def make(self, variant: str, env: dict[str, str] | None = None, loop: str = "uvloop",
             extra_args: tuple[str, ...] = ()) -> launch.ServerProcess:
        """A ServerProcess (not started) with one worker process."""
        impl = self.implementation(variant)
        env = dict(env or {}) if variant == "graceful" else {}
        if self.server == "hypercorn":  # the asyncio worker, or uvloop's
            return launch.hypercorn_server(ASGI_APP, variant == "graceful", env=env,
                                           args=["-k", loop, *extra_args])
        if self.server == "waitress":  # poll(), not select(): thousands of sockets (the RSS item)
            return launch.waitress_server(WSGI_APP, variant == "graceful", env=env,
                                          args=["--asyncore-use-poll", *extra_args])
        if self.server == "uvicorn":
            return launch.uvicorn_server(ASGI_APP, impl, loop=loop, args=extra_args, env=env)
        args: list[str] = list(extra_args)
        if self.key == "gthread":
            args += ["--threads", GTHREAD_THREADS]
        app = ASGI_APP if self.key in launch.ASGI_WORKERS else WSGI_APP
        return launch.gunicorn_server(app, impl, args=args, env=env, workers=1)


# hypercorn and waitress: (stock, ours) as the README's table names them.
OTHER_SERVERS = {"hypercorn": ("hypercorn", launch.HYPERCORN_CONFIG),
                 "waitress": ("waitress-serve", "python -m graceful_close.waitress")}
IMPORTED = {"hypercorn": "graceful_close.hypercorn.logger_class",  # what missing() imports
            "waitress": "graceful_close.waitress.GracefulChannel"}

# gunicorn's WSGI workers drop a WSGI app's Connection header (hop-by-hop), so for the
# server-close workload they end every connection themselves: --keep-alive 0, both variants.
WSGI_SERVER_CLOSE_ARGS = ("--keep-alive", "0")


def server_close_args(key: str) -> tuple[str, ...] | None:
    """Extra arguments of the server-close pair, or None when the keep-alive pair serves
    it (ASGI apps answer GET /?close=1 with Connection: close)."""
    if key in ("sync", "gthread", "gevent"):
        return WSGI_SERVER_CLOSE_ARGS
    return None


TARGETS = {
    "sync": BenchTarget("sync", "gunicorn sync", "gunicorn"),
    "gthread": BenchTarget("gthread", f"gunicorn gthread ({GTHREAD_THREADS} threads)", "gunicorn"),
    "uvicorn-worker": BenchTarget("uvicorn-worker", "gunicorn UvicornWorker", "gunicorn"),
    "h11": BenchTarget("h11", "uvicorn h11", "uvicorn"),
    "httptools": BenchTarget("httptools", "uvicorn httptools", "uvicorn"),
    "asgi": BenchTarget("asgi", "gunicorn asgi (gasgi)", "gunicorn"),
    "gevent": BenchTarget("gevent", "gunicorn gevent", "gunicorn"),
    "zttp": BenchTarget("zttp", "uvicorn zttp", "uvicorn"),
    "hypercorn": BenchTarget("hypercorn", "hypercorn (h11)", "hypercorn"),
    "waitress": BenchTarget("waitress", "waitress", "waitress"),
}
