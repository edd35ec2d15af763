"""The benchmark harness still runs: `python -m benchmarks --quick` on one worker
writes results.json, RESULTS.md, the head-of-line chart and the throughput-ratio chart
(again with --report-only). Numbers are not
checked here (timings belong to benchmarks/RESULTS.md), only that every selected
item produced data without an error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability_servers import missing

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_benchmark_run_writes_its_report(tmp_path: Path) -> None:
    reason = missing("gthread")
    if reason:
        pytest.fail(reason, pytrace=False)
    items = ["hol", "census"] + (["keepalive"] if shutil.which("wrk") else [])
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--targets", "gthread",
         "--items", ",".join(items), "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    entry = results["targets"]["gthread"]
    for item in items:
        assert item in entry and "error" not in entry[item], (item, entry.get(item))
    assert set(entry["hol"]["median"]) == {"stock", "graceful"}
    charts = ["hol_p99.png"] + (["throughput_ratio.png"] if "keepalive" in items else [])
    _assert_report(tmp_path, charts)

    for chart in charts:  # --report-only redraws both charts from results.json
        (tmp_path / chart).unlink()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--report-only", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_report(tmp_path, charts)


def _assert_report(out: Path, charts: list[str]) -> None:
    report = (out / "RESULTS.md").read_text()
    assert "gunicorn gthread" in report and "QUICK smoke run" in report
    for name in charts:
        assert f"]({name})" in report, name
        chart = (out / name).read_bytes()
        assert chart.startswith(b"\x89PNG") and len(chart) > 10_000, name
