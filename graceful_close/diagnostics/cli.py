"""The `graceful-close` command: probe, states, demo.

Every error is one line on stderr (exit status 2); `probe` exits 1 when a
scenario fails.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

from .. import __version__

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class UsageError(Exception):
    """Bad command line: shown as one line."""


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print the error alone, on one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def size(text: str) -> int:
    """'8388608', '8M', '64KiB', '1.5m' -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected bytes like 8M or 65536")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: must be > 0")
        return value
    parse.__name__ = getattr(kind, "__name__", "number")  # argparse names the type in errors
    return parse


def _scenario_list(text: str) -> tuple[str, ...]:
    from .probe import SCENARIOS

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown scenario {','.join(unknown) or text!r}: "
                                         f"choose from {','.join(SCENARIOS)}")
    return names


def build_parser() -> OneLineParser:
    from .probe import IDLE_MAX_DEFAULT, PROBE_LIMITS, SCENARIOS

    parser = OneLineParser(prog="graceful-close",
                           description="Lingering close for gunicorn, uvicorn, hypercorn and "
                                       "waitress: diagnostics.")
    parser.add_argument("--version", action="version", version=f"graceful-close {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    probe = commands.add_parser(
        "probe", help="check how any HTTP/1.1 server closes connections",
        description="Run black-box scenarios against URL and judge each: does the client get "
                    "every response byte, and does the connection end with FIN, not RST? "
                    f"Scenarios: {', '.join(SCENARIOS)}. Verdicts: PASS, FAIL (response bytes "
                    "lost or RST with our input unread), WARN (no byte lost, but ECONNRESET "
                    "at the idle timeout or a connection never ended), NOT EXERCISED (the "
                    "server did not do what the scenario needs). Exit status 1 when one "
                    "fails; warnings leave it 0.",
        epilog=PROBE_LIMITS, formatter_class=argparse.RawDescriptionHelpFormatter)
    probe.add_argument("url", help="http://host[:port]/path or https://...; the path is the "
                                   "default for every scenario")
    probe.add_argument("--host-header", metavar="NAME", help="Host header (and TLS server name)")
    probe.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    probe.add_argument("--timeout", type=positive(float), default=10.0, metavar="S",
                       help="per scenario, for answers and ends (default 10)")
    probe.add_argument("--pipeline", type=int, default=200, metavar="N",
                       help="pipelined GETs in one connection, 2..1000 (default 200)")
    probe.add_argument("--big-path", metavar="PATH",
                       help="any static file of >= 1 MB: close-pipeline GETs it with HTTP/1.0, "
                            "so the server closes after answering")
    probe.add_argument("--close-path", metavar="PATH",
                       help="instead of --big-path: a >= 1 MB response the application answers "
                            "with Connection: close (GET with HTTP/1.1)")
    probe.add_argument("--upload-path", metavar="PATH",
                       help="where to POST the oversized upload: any endpoint that answers a "
                            "large body before reading it (a small body limit, an auth check)")
    probe.add_argument("--upload-size", type=size, default=8 << 20, metavar="BYTES",
                       help="upload size, up to 64M (default 8M)")
    probe.add_argument("--idle-max", type=positive(float), default=IDLE_MAX_DEFAULT, metavar="S",
                       help="longest keep-alive idle timeout to wait for, up to 120 (default "
                            f"{IDLE_MAX_DEFAULT:g}: not a common timeout, so a server's own "
                            "timeout is either measured or clearly above it); a Keep-Alive: "
                            "timeout= header from the server is used when sent")
    probe.add_argument("--drain-time", type=positive(float), default=5.0, metavar="S",
                       help="how long the server should keep draining after its FIN (default 5)")
    probe.add_argument("--max-bytes", type=size, default=16 << 20, metavar="BYTES",
                       help="response body bytes read per scenario at most (default 16M)")
    probe.add_argument("--only", type=_scenario_list, metavar="LIST",
                       help=f"comma-separated subset of {','.join(SCENARIOS)}")
    probe.add_argument("--skip", type=_scenario_list, metavar="LIST", default=(),
                       help="comma-separated scenarios to leave out")
    probe.add_argument("--json", action="store_true", help="print one JSON object")
    probe.set_defaults(run=run_probe_command)

    states = commands.add_parser(
        "states", help="census of TCP socket states (CLOSE_WAIT, FIN_WAIT2, TIME_WAIT)",
        description="Count TCP sockets by state for a local port and/or a process and its "
                    "children, including sockets the application already closed (orphans, "
                    "TIME_WAIT) read from /proc/net/tcp.")
    states.add_argument("--port", type=int, metavar="N", help="local port (the server's)")
    states.add_argument("--pid", type=int, metavar="P", help="process id (children included)")
    states.add_argument("--watch", type=positive(float), metavar="SECONDS",
                        help="repeat every SECONDS until Ctrl-C")
    states.add_argument("--samples", type=int, metavar="N",
                        help="with --watch: stop after N samples")
    states.add_argument("--json", action="store_true",
                        help="print JSON (one object per line with --watch)")
    states.set_defaults(run=run_states_command)

    metrics = commands.add_parser(
        "metrics", help="serve Prometheus metrics summed over worker snapshot files",
        description="Serve /metrics for the per-worker snapshots that our workers write to "
                    "$GRACEFUL_CLOSE_METRICS_DIR (e.g. beside uvicorn --workers N). Runs until "
                    "Ctrl-C.")
    metrics.add_argument("--dir", required=True, metavar="DIR",
                         help="the servers' GRACEFUL_CLOSE_METRICS_DIR")
    metrics.add_argument("--port", type=int, default=9464, metavar="N",
                         help="port to serve on (default 9464; 0: any free port)")
    metrics.add_argument("--addr", default="127.0.0.1", metavar="ADDR",
                         help="address to serve on (default 127.0.0.1)")
    metrics.set_defaults(run=run_metrics_command)

    demo = commands.add_parser(
        "demo", help="stock vs graceful servers side by side, on loopback",
        description="Start stock and graceful gunicorn workers and uvicorn protocols on "
                    "127.0.0.1 with the sample app, probe each and print one table. Stock "
                    "rows are expected to fail. Exit status 1 when a server could not start "
                    "or one of ours failed a scenario, else 0.")
    demo.add_argument("--only", choices=tuple(_demo_families()), help="one server family")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(run=run_demo_command)
    return parser


def run_probe_command(args: argparse.Namespace) -> int:
    from .probe import SCENARIOS, ProbeConfig, render_report, run_probe

    chosen = tuple(s for s in (args.only or SCENARIOS) if s not in args.skip)
    if not chosen:
        raise UsageError("graceful-close probe: --only/--skip leave no scenario to run")
    config = ProbeConfig(url=args.url, host_header=args.host_header, insecure=args.insecure,
                         timeout=args.timeout, pipeline=args.pipeline, big_path=args.big_path,
                         close_path=args.close_path,
                         upload_path=args.upload_path, upload_size=args.upload_size,
                         idle_max=args.idle_max, drain_time=args.drain_time,
                         max_bytes=args.max_bytes, scenarios=chosen)
    if args.json:
        report = run_probe(config)
        print(json.dumps(report.as_dict(), indent=2))
    else:
        report = run_probe(config, progress=lambda name: print(f"  running {name} ...",
                                                               file=sys.stderr, flush=True))
        render_report(report)
    return 1 if report.failed else 0


def run_states_command(args: argparse.Namespace) -> int:
    from .states import render_census, take_census

    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"graceful-close states: --port {args.port} is out of range 1..65535")
    if args.samples is not None and args.samples < 1:
        raise UsageError("graceful-close states: --samples must be >= 1")
    taken = 0
    while True:
        census = take_census(port=args.port, pid=args.pid)
        taken += 1
        if args.json:
            print(json.dumps(census.as_dict(), indent=None if args.watch else 2), flush=True)
        else:
            if args.watch and taken > 1:
                print()
            render_census(census)
        if not args.watch or (args.samples is not None and taken >= args.samples):
            return 0
        time.sleep(args.watch)


def run_metrics_command(args: argparse.Namespace) -> int:
    from ..metrics.prometheus import register, serve

    if not 0 <= args.port <= 65535:
        raise UsageError(f"graceful-close metrics: --port {args.port} is out of range 0..65535")
    register(args.dir)
    try:
        httpd = serve(args.port, args.addr)
    except OSError as exc:
        raise UsageError(f"graceful-close metrics: cannot listen on {args.addr}:{args.port}: "
                         f"{exc.strerror or exc}") from None
    print(f"graceful-close metrics on http://{args.addr}:{httpd.server_port}/metrics "
          f"(snapshots in {args.dir})", flush=True)
    while True:
        time.sleep(3600)


def _demo_families() -> list[str]:
    from .demo import FAMILIES

    return list(FAMILIES)


# What installs the diagnostics' dependencies: graceful-close is not on the package index,
# so from the checkout (or a wheel built from it), never by name alone.
INSTALL_DIAGNOSTICS = 'pip install -e ".[diagnostics]" in a checkout of graceful-close'


def run_demo_command(args: argparse.Namespace) -> int:
    from ..settings import Settings
    from .demo import render_demo, run_demo

    # The graceful servers inherit GRACEFUL_CLOSE_*: a bad one is one line here, not a
    # start-up failure in every graceful row.
    Settings.from_env()
    # The table needs rich: say so now, not after a minute of servers (issue 17 item 12).
    if not args.json:
        try:
            import rich  # noqa: F401 - only whether it imports
        except ImportError:
            raise UsageError(f"graceful-close demo: the table needs rich: {INSTALL_DIAGNOSTICS} "
                             "(or use --json)") from None

    progress = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    result = run_demo(only=args.only, progress=progress)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        render_demo(result)
    return 1 if result.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except UsageError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except ImportError as exc:
        return _fail(f"graceful-close: missing dependency {exc.name or exc}: {INSTALL_DIAGNOSTICS}")
    except Exception as exc:
        from ..settings import SettingsError
        from .probe import ProbeError
        from .states import CensusError

        if isinstance(exc, (ProbeError, CensusError, SettingsError)):
            text = str(exc)
            return _fail(text if text.startswith("graceful-close") else f"graceful-close: {text}")
        raise


def _fail(message: str) -> int:
    print(message.splitlines()[0] if message else "graceful-close: error", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
