"""graceful_close.gunicorn._compat: the start-up self-check refuses a gunicorn that no
longer routes closes to us (issue 10 item 2), and our sync worker with --threads N serves our
ThreadWorker instead of gunicorn swapping it for stock gthread (issue 17 item 4).

An incompatible gunicorn is simulated in a real gunicorn master: its config file (run
before the worker class is checked) renames or rewrites what we depend on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gunicorn
import pytest

from graceful_close.diagnostics.launch import ServerProcess, gunicorn_server
from graceful_close.diagnostics.scenarios import Target, early_response_upload
from graceful_close.gunicorn import _compat
from tests.helpers import (
    SAMPLE_WSGI,
    SHORT_LINGER,
    assert_early_413s_intact,
    exchange_on_one_connection,
    expect_stock_failure,
)

REPO = Path(__file__).resolve().parent.parent

# Each simulates one upstream change, as Python run in the master before start-up.
INCOMPATIBLE = {
    "close_graceful removed": (
        "import gunicorn.util\n"
        "del gunicorn.util.close_graceful\n",
        "gunicorn.util.close_graceful is gone"),
    "TConn renamed": (
        "import inspect, textwrap\n"
        "from gunicorn.workers import gthread\n"
        "gthread.Connection = gthread.TConn\n"
        "source = textwrap.dedent(inspect.getsource(gthread.ThreadWorker.accept))\n"
        "names = {}\n"
        "exec(source.replace('TConn(', 'Connection('), vars(gthread), names)\n"
        "gthread.ThreadWorker.accept = names['accept']\n",
        "gthread.ThreadWorker.accept no longer builds connections with TConn"),
    "sync closes another way": (
        "import inspect, textwrap\n"
        "from gunicorn.workers import sync\n"
        "source = textwrap.dedent(inspect.getsource(sync.SyncWorker.handle))\n"
        "names = {}\n"
        "exec(source.replace('util.close_graceful(', 'util.close('), vars(sync), names)\n"
        "sync.SyncWorker.handle = names['handle']\n",
        "sync.SyncWorker.handle no longer calls util.close_graceful"),
}


def _run_gunicorn(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "gunicorn", "-b", "127.0.0.1:0", "-w", "1", *args, SAMPLE_WSGI]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ))


def _our_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("graceful-close:")]


def _our_lines_in(log: str) -> list[str]:
    """Our start-up line(s) in gunicorn's log (after its timestamp and pid)."""
    return [line for line in log.splitlines() if "graceful-close:" in line and "linger_time=" in line]


def test_the_installed_gunicorn_passes_the_self_check() -> None:
    assert _compat.problems() == []
    assert _compat.check() is None


@pytest.mark.parametrize("worker", ["SyncLingerWorker", "ThreadWorker"])
@pytest.mark.parametrize("change", list(INCOMPATIBLE))
def test_incompatible_gunicorn_refuses_to_start_with_one_line(tmp_path: Path, change: str,
                                                              worker: str) -> None:
    code, what = INCOMPATIBLE[change]
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(code)
    done = _run_gunicorn(["-k", f"graceful_close.gunicorn.{worker}", "-c", str(conf)])
    lines = _our_lines(done.stderr)
    assert done.returncode != 0, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"graceful-close: gunicorn {gunicorn.__version__} is not supported:")
    assert what in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert "Booting worker" not in done.stderr  # refused in the master: no stock close served


def _serving(args: list[str], conf: Path | None = None, env: dict[str, str] | None = None) -> ServerProcess:
    config = ["-c", str(conf)] if conf is not None else []
    return gunicorn_server(SAMPLE_WSGI, args[1], args=[*args[2:], *config],
                           env={**SHORT_LINGER, **(env or {})})


@pytest.mark.parametrize("worker", ["sync", "graceful_close.gunicorn.SyncLingerWorker"])
def test_documented_sync_class_with_threads_and_no_config_serves_our_thread_worker(
        start_server, worker: str) -> None:
    """Issue 17 item 4: gunicorn swaps any class named "*SyncWorker" for stock gthread when
    --threads > 1. The documented sync class is not so named: with --threads 2 and no config
    file it serves our ThreadWorker (as gunicorn serves gthread for sync), and an early 413
    arrives whole; stock sync with --threads 2 (stock gthread) cuts it with RST."""
    server = start_server(_serving(["-k", worker, "--threads", "2"]))
    if worker == "sync":
        result = early_response_upload(Target("127.0.0.1", server.port), "/upload?size=1000000",
                                       8 << 20, timeout=20)
        expect_stock_failure(not (result.intact and result.ending == "FIN"),
                             f"stock sync --threads 2: {result.as_dict()}")
        return
    assert_early_413s_intact(Target("127.0.0.1", server.port))
    lines = _our_lines_in(server.log_text())
    assert len(lines) == 1 and "served by graceful_close.gunicorn.ThreadWorker" in lines[0], lines
    responses, ending = exchange_on_one_connection(server.port, [{}] * 2)  # gthread keeps alive
    assert [r.header("connection") for r in responses] == ["keep-alive", "keep-alive"], ending


def test_documented_sync_class_with_threads_runs_our_code_so_a_bad_value_is_refused() -> None:
    """Our code runs with --threads > 1: a bad GRACEFUL_CLOSE_* value stops gunicorn with one
    line (stock gthread would have ignored it)."""
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-b", "127.0.0.1:0", "-w", "1",
                           "-k", "graceful_close.gunicorn.SyncLingerWorker", "--threads", "2",
                           SAMPLE_WSGI], capture_output=True, text=True, timeout=30, cwd=REPO,
                          env={**os.environ, "GRACEFUL_CLOSE_LINGER_TIME": "abc"})
    assert done.returncode != 0
    assert _our_lines(done.stderr) == ["graceful-close: invalid GRACEFUL_CLOSE_LINGER_TIME='abc': "
                                       "expected a number of seconds > 0 and <= 86400"], done.stderr
    assert "Booting worker" not in done.stderr


def test_old_sync_name_with_threads_is_ours_when_a_config_imports_graceful_close(
        start_server, tmp_path: Path) -> None:
    """The old name SyncWorker still ends in "SyncWorker": with a gunicorn.conf.py that calls
    configure() (the recipes' `from graceful_close import configure`), the master loads it as
    named and it serves our ThreadWorker: the 413 arrives whole."""
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("from graceful_close import configure\nconfigure()\n")
    server = start_server(_serving(["-k", "graceful_close.gunicorn.SyncWorker", "--threads", "2"],
                                   conf))
    assert_early_413s_intact(Target("127.0.0.1", server.port))
    assert "Using worker: graceful_close.gunicorn.SyncWorker" in server.log_text()


def test_sync_worker_guard_leaves_other_classes_alone(tmp_path: Path) -> None:
    """Stock sync with threads still becomes stock gthread (that is gunicorn's rule, not
    ours), and ThreadWorker with threads starts normally: the guard changes nothing else."""
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("from graceful_close import configure\nconfigure()\n"
                    "def when_ready(server):\n    import os, signal\n"
                    "    os.kill(os.getpid(), signal.SIGTERM)\n")
    for worker, using in (("sync", "Using worker: gthread"),
                          ("graceful_close.gunicorn.ThreadWorker",
                           "Using worker: graceful_close.gunicorn.ThreadWorker")):
        done = _run_gunicorn(["-k", worker, "--threads", "2", "-c", str(conf)])
        assert done.returncode == 0, done.stderr
        assert using in done.stderr
        assert not [line for line in _our_lines(done.stderr) if "served by" in line]
