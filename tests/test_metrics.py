"""Counters move as scenarios run, seen by a real Prometheus scrape of a real server.

Multi-process gunicorn: the when_ready/child_exit hooks serve the summed worker
snapshots from the master. Single-process uvicorn: the collector reads the
process's counters, exposed by the app itself. Stock servers run the same
scenarios and their counters stay at zero: nothing lingers there.
"""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from graceful_close.diagnostics.launch import (
    GUNICORN_WORKERS,
    UVICORN_PROTOCOLS,
    gunicorn_server,
    uvicorn_server,
)
from graceful_close.diagnostics.probe_clients import upload
from graceful_close.diagnostics.scenarios import Target, never_closing, pipelined_after_close
from tests.helpers import SAMPLE_WSGI, wait_until, worker_pids

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

METRICS_LINE = re.compile(r"graceful-close metrics on (http://[\d.]+:\d+/metrics)")
SHORT_LINGER = {"GRACEFUL_CLOSE_LINGER_TIMEOUT": "0.5", "GRACEFUL_CLOSE_LINGER_TIME": "2"}


def scrape(url: str) -> dict[str, float]:
    """Every graceful_close sample: name{labels} -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("graceful_close_"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def run_scenarios(port: int) -> None:
    target = Target("127.0.0.1", port)
    for _ in range(3):  # an early 413 to a 2 MB upload the app never reads
        assert upload(target, "/upload?size=100000", 2 << 20, timeout=10, max_bytes=1 << 20,
                      follow_path="/", hold=1.0).complete
    never_closing(target, hold=1.5)  # ours: released by linger_timeout (0.5 s)


@pytest.mark.parametrize("ours", [False, True], ids=["stock", "ours"])
def test_gunicorn_workers_summed_by_master_collector(start_server, tmp_path: Path,
                                                     ours: bool) -> None:
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("from graceful_close.metrics.prometheus import when_ready, child_exit  # noqa: F401\n")
    stock, graceful = GUNICORN_WORKERS["gthread"]
    env = {**SHORT_LINGER, "GRACEFUL_CLOSE_METRICS_PORT": "0",
           "GRACEFUL_CLOSE_METRICS_DIR": str(tmp_path / "metrics")}
    server = start_server(gunicorn_server(SAMPLE_WSGI, graceful if ours else stock, workers=2,
                                          args=["-c", str(conf)], env=env))
    assert wait_until(lambda: METRICS_LINE.search(server.log_text()), timeout=10)
    url = METRICS_LINE.search(server.log_text()).group(1)

    run_scenarios(server.port)
    time.sleep(1.5)  # workers write their snapshots every second
    after = scrape(url)
    if not ours:
        assert after["graceful_close_lingering_started_total"] == 0
        assert after["graceful_close_workers_reporting"] == 0
        return
    assert after["graceful_close_workers_reporting"] == 2
    assert after["graceful_close_lingering_started_total"] >= 4
    assert after["graceful_close_lingering_ended_total{reason=eof}"] >= 3
    assert after["graceful_close_lingering_ended_total{reason=idle_timeout}"] >= 1
    assert after["graceful_close_bytes_discarded_total"] >= 3 * 1_000_000

    # A worker dies: its totals stay (counters never go down), a new one reports.
    killed = worker_pids(server.pid)[0]
    os.kill(killed, signal.SIGKILL)
    assert wait_until(lambda: killed not in worker_pids(server.pid)
                      and len(worker_pids(server.pid)) == 2, timeout=15)
    snapshot = tmp_path / "metrics" / f"{killed}.json"
    assert wait_until(lambda: scrape(url)["graceful_close_workers_reporting"] == 2
                      and not snapshot.exists(), timeout=15)  # retired, the new one reports
    later = scrape(url)
    for name in ("graceful_close_lingering_started_total",
                 "graceful_close_lingering_ended_total{reason=eof}",
                 "graceful_close_bytes_discarded_total"):
        assert later[name] >= after[name], name

    server.signal(signal.SIGTERM)  # the exit summary goes to gunicorn's log
    assert server.wait(15) is not None
    summaries = re.findall(r"graceful-close: (lingering_started=\d+.*|no lingering close)",
                           server.log_text())
    assert len(summaries) == 2, server.log_text()  # one line per worker that exited normally


ASGI_WITH_METRICS = """
from prometheus_client import make_asgi_app
from graceful_close.metrics.prometheus import register
from graceful_close.diagnostics.sample_apps import asgi_app

register()  # this process's own counters
metrics = make_asgi_app()

async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == "/metrics":
        return await metrics(scope, receive, send)
    return await asgi_app(scope, receive, send)
"""


@pytest.mark.parametrize("ours", [False, True], ids=["stock", "ours"])
def test_single_process_uvicorn_collector(start_server, tmp_path: Path, ours: bool) -> None:
    (tmp_path / "metrics_app.py").write_text(ASGI_WITH_METRICS)
    stock, graceful = UVICORN_PROTOCOLS["httptools"]
    server = start_server(uvicorn_server("metrics_app:app", graceful if ours else stock,
                                         args=["--app-dir", str(tmp_path), "--timeout-keep-alive", "1"],
                                         env=SHORT_LINGER))
    url = f"http://127.0.0.1:{server.port}/metrics"
    before = scrape(url)
    result = pipelined_after_close(Target("127.0.0.1", server.port),
                                   close_path="/big?close=1&size=2000000")
    run_scenarios(server.port)
    after = scrape(url)
    if not ours:
        assert not result.intact
        assert after["graceful_close_lingering_started_total"] == 0
        return
    assert result.intact
    # At least the 2 MB close (client EOF) and the never-closing client (idle timeout);
    # the early 413s keep their connection alive, so they may or may not linger.
    assert after["graceful_close_lingering_started_total"] >= before[
        "graceful_close_lingering_started_total"] + 2
    assert after["graceful_close_lingering_ended_total{reason=eof}"] >= 1
    assert after["graceful_close_lingering_ended_total{reason=idle_timeout}"] >= 1
    # uvicorn itself discards an unread body on keep-alive connections; the linger
    # discards what follows a close: here the requests pipelined behind the 2 MB response.
    assert after["graceful_close_bytes_discarded_total"] > before["graceful_close_bytes_discarded_total"]
    assert after["graceful_close_workers_reporting"] == 1


def test_metrics_command_beside_multiprocess_uvicorn(start_server, tmp_path: Path) -> None:
    """uvicorn --workers 2 has no master hook: `graceful-close metrics --dir` sums the
    worker snapshots from beside it."""
    import subprocess
    import sys

    directory = tmp_path / "metrics"
    server = start_server(uvicorn_server("graceful_close.diagnostics.sample_apps:asgi_app",
                                         UVICORN_PROTOCOLS["httptools"][1],
                                         args=["--workers", "2", "--timeout-keep-alive", "1"],
                                         env={**SHORT_LINGER,
                                              "GRACEFUL_CLOSE_METRICS_DIR": str(directory)}))
    sidecar = subprocess.Popen([sys.executable, "-m", "graceful_close.diagnostics.cli", "metrics", "--dir",
                                str(directory), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        url = METRICS_LINE.search(sidecar.stdout.readline()).group(1)
        # The readiness probe's Connection: close request may already be counted.
        before = scrape(url)["graceful_close_lingering_started_total"]
        target = Target("127.0.0.1", server.port)
        for _ in range(4):
            assert pipelined_after_close(target, close_path="/big?close=1&size=300000").intact
        # Snapshots are written once a second.
        assert wait_until(
            lambda: scrape(url)["graceful_close_lingering_ended_total{reason=eof}"] >= 4, timeout=5)
        after = scrape(url)
        assert after["graceful_close_lingering_started_total"] >= before + 4
        assert after["graceful_close_workers_reporting"] >= 1
    finally:
        sidecar.terminate()
        sidecar.wait(5)
