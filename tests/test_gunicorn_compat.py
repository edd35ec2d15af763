"""graceful_close.gunicorn._compat: the start-up self-check refuses a gunicorn that no
longer routes closes to us (issue 10 item 2), and `-k ...SyncWorker --threads N` is
refused instead of silently running stock gthread (issue 12 item 10).

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

from graceful_close.gunicorn import _compat
from tests.helpers import SAMPLE_WSGI

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


def test_the_installed_gunicorn_passes_the_self_check() -> None:
    assert _compat.problems() == []
    assert _compat.check() is None


@pytest.mark.parametrize("worker", ["SyncWorker", "ThreadWorker"])
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


def test_sync_worker_with_threads_is_refused_with_one_line(tmp_path: Path) -> None:
    """gunicorn swaps any "*SyncWorker" for stock gthread when --threads > 1, without
    importing ours. With our module imported in the master (a gunicorn.conf.py calling
    configure(), as the recipes do) the start is refused instead."""
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("from graceful_close.gunicorn import configure\nconfigure()\n")
    done = _run_gunicorn(["-k", "graceful_close.gunicorn.SyncWorker", "--threads", "2",
                          "-c", str(conf)])
    lines = _our_lines(done.stderr)
    assert done.returncode != 0, done.stderr
    assert lines == [_compat.SYNC_SWAP_LINE.format(threads=2)], done.stderr
    assert "Traceback" not in done.stderr and "Booting worker" not in done.stderr


def test_sync_worker_guard_leaves_other_classes_alone(tmp_path: Path) -> None:
    """Stock sync with threads still becomes stock gthread (that is gunicorn's rule, not
    ours), and ThreadWorker with threads starts normally: the guard refuses nothing else."""
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("from graceful_close.gunicorn import configure\nconfigure()\n"
                    "def when_ready(server):\n    import os, signal\n"
                    "    os.kill(os.getpid(), signal.SIGTERM)\n")
    for worker in ("sync", "graceful_close.gunicorn.ThreadWorker"):
        done = _run_gunicorn(["-k", worker, "--threads", "2", "-c", str(conf)])
        assert done.returncode == 0, done.stderr
        assert not [line for line in _our_lines(done.stderr) if "SyncWorker" in line]
