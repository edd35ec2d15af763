"""`graceful-close demo`: every supported worker/protocol, stock and ours, one table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from rich.console import Console

from graceful_close.diagnostics import demo as demo_module
from graceful_close.diagnostics.cli import main
from graceful_close.diagnostics.demo import DemoResult, DemoRow, DemoServer, render_demo, run_demo
from graceful_close.diagnostics.probe import FAIL, PASS, WARN, ProbeReport, Verdict
from tests.helpers import expect_stock_failure


@pytest.mark.slow
def test_demo_runs_every_server_and_ours_pass() -> None:
    """Graceful rows pass every scenario with no stall of 1 s, under 2 minutes on 2 cores.
    Stock rows fail where the issues measured them failing (uvicorn, UvicornWorker, gunicorn
    asgi and gevent: 2 MB response cut with RST; gunicorn sync/gthread/asgi: the 413 cut
    with RST; sync/gthread: 2 s stalls); a stock row that
    stops failing is reported as a StockFixed warning, not a red run."""
    start = time.monotonic()
    result = run_demo()
    elapsed = time.monotonic() - start
    assert elapsed < 120
    assert not result.errors, [(r.server.label, r.error) for r in result.errors]
    rows = {row.server.label: row for row in result.rows}
    assert len(rows) == 20
    for label, row in rows.items():
        statuses = {v.scenario: v.status for v in row.report.verdicts}
        if row.server.graceful:
            # A worker without keep-alive (sync) leaves the idle scenario nothing to test.
            if row.server.kind == "sync":
                assert row.verdict("idle").finding == "no-keep-alive", (label, statuses)
                statuses.pop("idle")
            assert set(statuses.values()) == {"pass"}, (label, statuses)
            assert row.worst_stall < 1.0, label
        else:
            expect_stock_failure("fail" in statuses.values(), f"{label}: {statuses}")
    for kind in ("uvicorn-worker", "h11", "httptools", "zttp", "asgi", "gevent", "asyncio", "wsgi"):
        stock = next(r for r in result.rows if r.server.kind == kind and not r.server.graceful)
        expect_stock_failure(stock.verdict("close-pipeline").status == "fail",
                             f"{stock.server.label} close-pipeline")
    stock_asgi = next(r for r in result.rows if r.server.kind == "asgi" and not r.server.graceful)
    expect_stock_failure(stock_asgi.verdict("upload").status == "fail", "gunicorn asgi stock upload")
    for kind in ("sync", "gthread"):
        stock = next(r for r in result.rows if r.server.kind == kind and not r.server.graceful)
        upload = stock.verdict("upload")
        expect_stock_failure(upload.status == "fail", f"{stock.server.label} upload")
        if upload.status == "fail":  # the 413 was cut: fewer bytes than it had, then a reset
            assert upload.data["received"] < upload.data["expected"], upload.data
            assert "RST" in str(upload.data["ending"]), upload.data
        expect_stock_failure(stock.worst_stall >= 1.5, f"{stock.server.label} stall")

    assert not result.failed  # the demo exits 0
    console = Console(record=True, width=100, color_system=None)
    render_demo(result, console=console)
    table = console.export_text()
    assert all(row.server.kind in table for row in result.rows)
    assert "n/a" in table  # the sync rows' idle cells: no keep-alive
    assert "whole, FIN" in table and "…" not in table  # readable at 100 columns
    assert max(len(line.rstrip()) for line in table.splitlines()) <= 100
    for cut in re.findall(r"(\d+) kB, RST", table):  # a cut response: fewer bytes than sent
        assert int(cut) < 2_000
    assert "Red" not in table  # not a terminal: the legend cannot speak of colours
    json.dumps(result.as_dict())  # --json output is serialisable


# ---- issue 17 items 9-12: exit status, 100 columns, marks that agree with the legend, rich ----

def _verdict(scenario: str, status: str, **data: object) -> Verdict:
    return Verdict(scenario, status, "-", str(data.get("ending", "")), "-", data=dict(data))


def _row(kind: str, graceful: bool, verdicts: list[Verdict], stall: float) -> DemoRow:
    server = DemoServer("gunicorn", kind, graceful, "spec")
    return DemoRow(server, ProbeReport("http://127.0.0.1:1/", "x", verdicts, 1.0), stall, 10)


def _stock_and_ours() -> list[DemoRow]:
    """Rows with each kind of cell the stock servers produce, and a clean graceful row."""
    stock = [
        _verdict("close-pipeline", FAIL, received=128000, expected=2000000, ending="RST"),
        _verdict("upload", WARN, received=1000000, expected=1000000, ending="OPEN"),
        _verdict("pipeline", PASS, complete=200, requests=200, ending="FIN"),
        _verdict("idle", WARN, idle_timeout=1.0, ending="RST"),
        _verdict("drain", FAIL, drained_for=0.0, ending="RST"),
    ]
    ours = [
        _verdict("close-pipeline", PASS, received=2000000, expected=2000000, ending="FIN"),
        _verdict("upload", PASS, received=1000000, expected=1000000, ending="FIN"),
        _verdict("pipeline", PASS, complete=100, requests=200, ending="FIN"),
        _verdict("idle", PASS, idle_timeout=1.0, ending="FIN"),
        _verdict("drain", PASS, drained_for=3.0, ending="FIN"),
    ]
    return [_row("uvicorn-worker", False, stock, 1.994), _row("uvicorn-worker", True, ours, 0.002)]


def _rendered(result: DemoResult) -> str:
    console = Console(record=True, width=100, color_system=None)
    render_demo(result, console=console)
    return console.export_text()


def test_every_bad_cell_carries_the_mark_the_legend_defines() -> None:
    """Stock RST at the idle timeout and a 413 left open used to carry no '!' although the
    legend defines '!' as exactly that."""
    rows = _stock_and_ours()
    text = _rendered(DemoResult(rows, 1.0))
    stock_line = next(line for line in text.splitlines() if line.lstrip().startswith("uvicorn-worker"))
    for bad in ("! 128 kB, RST", "! whole, open", "! RST", "! 0.0 s, RST", "! 1994 ms"):
        assert bad in stock_line, (bad, stock_line)
    assert "! 200/200" not in stock_line  # good stays unmarked
    ours_line = next(line for line in text.splitlines() if line.lstrip().startswith("graceful"))
    assert "!" not in ours_line
    assert ("!: lost response bytes, a reset (RST), a connection left open after the answer, "
            "or a wait >= 1 s.") in text


def test_a_server_that_did_not_start_fails_the_demo_and_says_why_in_its_cells() -> None:
    rows = _stock_and_ours()
    broken = DemoRow(DemoServer("gunicorn", "gevent", True, "spec"),
                     error="server did not start: ModuleNotFoundError: No module named 'packaging'")
    result = DemoResult([*rows, broken], 1.0)
    assert result.failed == [broken]
    text = _rendered(result)
    assert "…" not in text and max(len(line.rstrip()) for line in text.splitlines()) <= 100
    line = next(line for line in text.splitlines() if "not started" in line)
    assert "! not started" in line and "no packaging" in line and "note (1)" in line
    assert "(1) gunicorn gevent graceful: server did not start: ModuleNotFoundError" in text
    assert "row(s) failed: gunicorn gevent graceful" in text


def test_a_graceful_row_that_fails_a_scenario_fails_the_demo() -> None:
    stock, ours = _stock_and_ours()
    assert DemoResult([stock], 1.0).failed == []  # stock failing is the demonstration
    ours.report.verdicts[0] = _verdict("close-pipeline", FAIL, received=1, expected=2, ending="RST")
    assert DemoResult([stock, ours], 1.0).failed == [ours]


def test_demo_exits_1_when_a_real_server_cannot_start(monkeypatch, capsys) -> None:
    """A real gunicorn told to load a worker class that does not exist: the row says so and
    `graceful-close demo` exits 1 (it exited 0 before)."""
    monkeypatch.setitem(demo_module.FAMILIES, "broken", (
        {"missing": ("no_such_module.Worker", "graceful_close.gunicorn.NoSuchWorker")},
        demo_module.FAMILIES["gunicorn"][1]))
    assert main(["demo", "--only", "broken"]) == 1
    out = capsys.readouterr().out
    assert out.count("! not started") == 2 and "(2) broken missing graceful:" in out, out


def test_missing_rich_is_reported_before_anything_runs() -> None:
    code = ("import sys; sys.modules['rich'] = None\n"
            "from graceful_close.diagnostics.cli import main\n"
            "sys.exit(main(['demo']))\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 20  # no server was started (the demo takes a minute)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and 'pip install -e ".[diagnostics]"' in done.stderr, \
        done.stderr
