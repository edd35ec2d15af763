"""RESULTS.md and its two charts (head-of-line p99, throughput ratios) from a results dict
(see __main__)."""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path
from typing import TypeGuard

KEEPALIVE_TARGET = 0.97
CLOSE_TARGET = 0.90
HOL_FACTOR = 2.0
# RSS per lingering socket (issue 9): the uvicorn-based servers keep only a small drain
# protocol per socket, gthread only its socket; the other workers have no memory target.
RSS_TARGET_KIB = {"h11": 2.0, "httptools": 2.0, "uvicorn-worker": 2.0, "zttp": 2.0, "gthread": 1.0,
                  "hypercorn": 2.0, "waitress": 1.0}  # hypercorn: the asyncio drain; waitress: poll
# Issue 18: CPU per request (server process tree), graceful / stock, median of alternating rounds.
CPU_TARGETS = {"keepalive": 1.03, "close": 1.05, "server_close": 1.15}
CPU_LABELS = {"keepalive": "keep-alive", "close": "client-close", "server_close": "server-close"}
# RSS per lingering socket, whoever ended the connection (issue 18).
RSS_PATH_TARGET_KIB = {"sync": 0.6, "gthread": 0.6}
RSS_PATH_DEFAULT_KIB = 1.0
NOTES = Path(__file__).with_name("notes.md")
CHART = "hol_p99.png"
RATIO_CHART = "throughput_ratio.png"
CPU_CHART = "cpu_ratio.png"


def _ms(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    return f"{seconds * 1000:.1f}" if seconds < 10 else f"{seconds * 1000:.0f}"


def _mark(ok: bool | None) -> str:
    return "" if ok is None else (" ✅" if ok else " ❌")


def _ok(item: dict | None) -> TypeGuard[dict]:
    """A measured item (not missing, not failed)."""
    return item is not None and bool(item) and "error" not in item


def hol_verdict(hol: dict) -> tuple[bool | None, float, float]:
    """(target met, graceful N=0 p99, worst graceful p99 at N>0)."""
    graceful = hol["median"]["graceful"]
    base = graceful.get("0", {}).get("p99")
    others = [p["p99"] for n, p in graceful.items() if n != "0"]
    if base is None or not others:
        return None, float("nan"), float("nan")
    worst = max(others)
    return worst <= HOL_FACTOR * base, base, worst


def rss_kib_per_socket(rss: dict) -> float:
    return rss["growth"] / max(1, rss["clients"]) / 1024


def _cpu_cell(data: dict | None) -> str:
    cpu = data.get("cpu_us_per_request") if _ok(data) else None
    return f"{cpu['stock']:.0f} → {cpu['graceful']:.0f}" if cpu else "-"


def _summary(targets: dict) -> list[str]:
    lines = ["| worker / protocol | keep-alive req/s ratio (≥ 0.97) | Connection: close ratio (≥ 0.90) "
             "| worker CPU µs per request, keep-alive, stock → graceful "
             "| worker CPU µs per request, close, stock → graceful "
             "| HOL worst p99 vs 2× N=0 p99, graceful | HOL p99 at max N, stock → graceful (ms) "
             "| RSS per lingering socket (< 2 KiB uvicorn-based, < 1 KiB gthread) "
             "| intact under load, graceful (stock) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, entry in targets.items():
        if "skipped" in entry:
            lines.append(f"| {entry['label']} | skipped: {entry['skipped']} ||||||||")
            continue
        cells = [entry["label"]]
        for item, goal in (("keepalive", KEEPALIVE_TARGET), ("close", CLOSE_TARGET)):
            data = entry.get(item)
            cells.append(f"{data['ratio']:.3f}{_mark(data['ratio'] >= goal)}" if _ok(data) else "-")
        cells += [_cpu_cell(entry.get("keepalive")), _cpu_cell(entry.get("close"))]
        hol = entry.get("hol")
        if _ok(hol):
            met, base, worst = hol_verdict(hol)
            cells.append(f"{_ms(worst)} vs {_ms(HOL_FACTOR * base)} ms{_mark(met)}")
            top = max(hol["median"]["graceful"], key=int)
            cells.append(f"{_ms(hol['median']['stock'][top]['p99'])} → "
                         f"{_ms(hol['median']['graceful'][top]['p99'])} (N={top})")
        else:
            cells += ["-", "-"]
        rss = entry.get("rss")
        if _ok(rss):
            kib, limit = rss_kib_per_socket(rss), RSS_TARGET_KIB.get(key)  # no limit: no verdict
            verdict = None if limit is None else kib < limit and rss["all_held"]
            cells.append(f"{kib:.2f} KiB{_mark(verdict)} ({rss['growth'] / 2**20:.1f} MiB for "
                         f"{rss['clients']}{'' if rss['all_held'] else ', not all held'})")
        else:
            cells.append("-")
        corr = entry.get("correctness")
        if _ok(corr):
            parts = []
            for name in corr["graceful"]:
                g, s = corr["graceful"][name], corr["stock"][name]
                parts.append(f"{name.split('_')[0]} {g['intact']}/{g['total']} ({s['intact']}/{s['total']})"
                             f"{_mark(g['intact'] == g['total'])}")
            cells.append("<br>".join(parts))
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _cpu_ratio_cell(data: dict | None, goal: float) -> str:
    if not _ok(data) or "cpu_ratio" not in data:
        return "-"
    low, high = data.get("cpu_ratio_spread") or (float("nan"), float("nan"))
    ratio = data["cpu_ratio"]
    return (f"**{ratio:.2f}**{_mark(ratio <= goal)} ({low:.2f}–{high:.2f}, {data['rounds']}); "
            f"{data['cpu_us_per_request']['stock']:.0f} → {data['cpu_us_per_request']['graceful']:.0f} µs")


def cpu_headline(targets: dict) -> list[str]:
    """The headline table (issue 18): CPU per request ours / stock for the three workloads,
    then the throughput ratios."""
    heads = " | ".join(f"{CPU_LABELS[i]} (≤ {g:.2f})" for i, g in CPU_TARGETS.items())
    lines = ["CPU per request = user + system CPU of the server's whole process tree over the "
             "requests wrk completed; **graceful / stock, median of the alternating rounds**, then "
             "(the lowest–highest per-round ratio, the number of rounds); then stock → graceful "
             "µs per request. Throughput: graceful / stock req/s, median.", "",
             f"| worker / protocol | {heads} | throughput ratio keep-alive / client-close / "
             "server-close |", "|---|---|---|---|---|"]
    for entry in targets.values():
        if "skipped" in entry:
            lines.append(f"| {entry['label']} | skipped: {entry['skipped']} ||||")
            continue
        cells = [entry["label"]]
        cells += [_cpu_ratio_cell(entry.get(i), g) for i, g in CPU_TARGETS.items()]
        cells.append(" / ".join(f"{entry[i]['ratio']:.2f}" if _ok(entry.get(i)) else "-"
                                for i in CPU_TARGETS))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _rss_paths(targets: dict) -> list[str]:
    """RSS per lingering socket by who ended the connection (issue 18)."""
    hows = ("app", "client", "cap", "timeout")
    rows = []
    for key, entry in targets.items():
        paths = entry.get("rss_paths")
        if not _ok(paths):
            continue
        limit = RSS_PATH_TARGET_KIB.get(key, RSS_PATH_DEFAULT_KIB)
        cells = [f"{entry['label']} (< {limit:g})"]
        for how in hows:
            r = paths.get(how)
            if not _ok(r):
                cells.append("-")
                continue
            kib = rss_kib_per_socket(r)
            cells.append(f"{kib:.2f}{_mark(kib < limit and r['all_held'])}"
                         f"{'' if r['all_held'] else ' (not all held)'}")
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["### RSS per lingering socket, by who ended the connection (KiB)", "",
            "Never-closing clients (each reads its response and the server's FIN and keeps its "
            "socket); RSS growth of the worker over the clients. app: the ASGI app answers "
            "`Connection: close` (gunicorn's WSGI workers ignore it: `--keep-alive 0`); client: the "
            "client sends `Connection: close` (measured with lingering_close=always: under the "
            "default auto these close at once and nothing lingers); cap: keepalive_requests=1; "
            "timeout: the server's 1 s keep-alive timeout.", "",
            "| worker / protocol (target KiB) | app | client | cap | timeout |", "|---|---|---|---|---|",
            *rows, ""]


def _throughput(targets: dict, item: str, title: str) -> list[str]:
    lines = [f"### {title}", "", "| worker / protocol | stock req/s (median) | graceful req/s (median) "
             "| ratio | CPU µs per request (process tree), stock / graceful "
             "| context switches per request, stock / graceful "
             "| socket errors + non-2xx, stock / graceful | runs stock | runs graceful "
             "| other processes' cores (median, max) | runs repeated |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    command = ""
    for entry in targets.values():
        data = entry.get(item)
        if not _ok(data):
            if data:
                lines.append(f"| {entry['label']} | error: {data['error']} ||||||||")
            continue
        command = data["command"]
        runs = {v: ", ".join(f"{r:.0f}" for r in data["runs"][v]) for v in data["runs"]}
        cpu, sw = data.get("cpu_us_per_request"), data.get("switches_per_request")
        cpu_cell = f"{cpu['stock']:.1f} / {cpu['graceful']:.1f}" if cpu else "-"
        sw_cell = f"{sw['stock']:.2f} / {sw['graceful']:.2f}" if sw else "-"
        lines.append(f"| {entry['label']} | {data['median']['stock']:.0f} | "
                     f"{data['median']['graceful']:.0f} | {data['ratio']:.3f} | {cpu_cell} | {sw_cell} | "
                     f"{data['errors']['stock']} / {data['errors']['graceful']} | "
                     f"{runs['stock']} | {runs['graceful']} | {_foreign(data)} | "
                     f"{data.get('repeated_runs', '-')} |")
    return lines + ["", f"wrk command (per run, PORT = the server's): `{command}`", ""]


def _foreign(data: dict) -> str:
    loads = [x for runs in data.get("foreign_cores", {}).values() for x in runs]
    if not loads:
        return "-"
    return f"{statistics.median(loads):.2f}, {max(loads):.2f}"


def _hol(targets: dict) -> list[str]:
    lines = ["### 3. Head-of-line blocking", "",
             "Latency of one normal client (a new connection per request, 10 ms between requests) "
             "while N clients that read their response and never close arrive at 100/s. "
             "Medians over repetitions; a request still waiting when the window closed counts "
             "with its wait so far (so stock numbers are lower bounds).", "",
             "| worker / protocol | N | window s | stock p50 / p99 / max ms | stock requests | "
             "graceful p50 / p99 / max ms | graceful requests | crowd answered stock / graceful |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in targets.values():
        hol = entry.get("hol")
        if not _ok(hol):
            continue
        med = hol["median"]
        for n in sorted(med["graceful"], key=int):
            s, g = med["stock"][n], med["graceful"][n]
            lines.append(f"| {entry['label']} | {n} | {g['window']:.1f} | "
                         f"{_ms(s['p50'])} / {_ms(s['p99'])} / {_ms(s['max'])} | {s['requests']:.0f} | "
                         f"{_ms(g['p50'])} / {_ms(g['p99'])} / {_ms(g['max'])} | {g['requests']:.0f} | "
                         f"{s['crowd_answered']:.0f}/{s['arrived']:.0f} / "
                         f"{g['crowd_answered']:.0f}/{g['arrived']:.0f} |")
    return lines + [""]


def _rss(targets: dict) -> list[str]:
    lines = ["### 4. One graceful worker holding many lingering sockets", "",
             "| worker / protocol | lingering clients | RSS before → while holding (MiB) | growth MiB "
             "| KiB per socket | fds before → holding → after clients close | server FIN-WAIT-2 "
             "| normal requests meanwhile (failed) |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in targets.values():
        for key, label in (("rss", entry["label"]),
                           ("rss_idle_stock", f"{entry['label']}: reference, STOCK holding idle "
                                              "keep-alive connections")):
            lines += _rss_row(entry.get(key), label)
    return lines + ["", "The reference rows hold the same number of idle keep-alive clients on the "
                    "stock server (keep-alive timeout raised to 900 s): the memory any open "
                    "connection costs that server, lingering or not.", ""]


def _rss_row(r: dict | None, label: str) -> list[str]:
    if not _ok(r):
        return [f"| {label} | error: {r['error']} |||||||"] if r else []
    return [f"| {label} | {r['clients']} | {r['base_rss'] / 2**20:.1f} → "
            f"{r['rss'] / 2**20:.1f} | {r['growth'] / 2**20:.1f} | "
            f"{rss_kib_per_socket(r):.2f} | {r['base_fds']} → {r['fds']} → "
            f"{r['fds_after_release']} | {r['server_fin_wait_2']} | "
            f"{r['probe_requests']} ({r['probe_failed']}) |"]


def _census(targets: dict, plan: dict) -> list[str]:
    if not any(_ok(e.get("census")) for e in targets.values()):
        return ["### 5. Aftermath census", "", "Not measured in this run.", ""]
    lines = ["### 5. Aftermath census", "",
             f"{plan['census_clients']} clients read their response and never close; "
             f"{plan['census_after']:g} s after the last one was answered, `ss` counts the sockets "
             "on the server port (server side, orphans included) and on the clients' side. "
             f"Graceful runs with linger_timeout={plan['census_linger_timeout']:g} s, the 2 s stock "
             "gunicorn lingers.", "",
             "| worker / protocol | variant | served in s | server FIN-WAIT-2 | server TIME-WAIT "
             "| server CLOSE-WAIT | server ESTAB | client CLOSE-WAIT | client ESTAB | clients saw RST |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for entry in targets.values():
        c = entry.get("census")
        if not _ok(c):
            continue
        for variant, r in c.items():
            s, k = r["server"], r["client"]
            lines.append(f"| {entry['label']} | {variant} | {r['served_after']:.1f} | "
                         f"{s['FIN-WAIT-2']} | {s['TIME-WAIT']} | {s['CLOSE-WAIT']} | {s['ESTAB']} | "
                         f"{k['CLOSE-WAIT']} | {k['ESTAB']} | {r['reset_seen']}/{r['clients']} |")
    return lines + [""]


def _correctness(targets: dict, plan: dict) -> list[str]:
    lines = ["### 6. Correctness under load", "",
             f"{plan['correctness_clients']} clients at once run each scenario of "
             "graceful_close.diagnostics.scenarios: `pipelined_after_close` (a 2,000,000-byte response with "
             "Connection: close, 5 requests pipelined behind it) and `early_response_upload` "
             f"(a {plan['upload_size'] // 2**20} MiB upload answered early by a 1,000,000-byte 413).",
             "", "| worker / protocol | scenario | stock intact | stock endings | graceful intact "
             "| graceful endings |", "|---|---|---|---|---|---|"]
    for entry in targets.values():
        c = entry.get("correctness")
        if not _ok(c):
            continue
        for name in c["graceful"]:
            s, g = c["stock"][name], c["graceful"][name]
            lines.append(f"| {entry['label']} | {name} | {s['intact']}/{s['total']} | "
                         f"{s['endings']} | {g['intact']}/{g['total']} | {g['endings']} |")
    return lines + [""]


def write_chart(targets: dict, path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_hol = [(e["label"], e["hol"]["median"]) for e in targets.values() if _ok(e.get("hol"))]
    if not with_hol:
        return False
    cols = min(3, len(with_hol))
    rows = math.ceil(len(with_hol) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    for ax, (label, med) in zip(axes.flat, with_hol, strict=False):  # spare axes stay empty
        ns = sorted(med["graceful"], key=int)
        xs = range(len(ns))
        for variant, style in (("stock", dict(color="tab:red", marker="o")),
                               ("graceful", dict(color="tab:blue", marker="s"))):
            ys = [med[variant][n]["p99"] * 1000 for n in ns]
            ax.plot(xs, ys, label=variant, **style)
            for x, n, y in zip(xs, ns, ys, strict=True):
                if med[variant][n]["censored"]:  # still waiting when the window closed
                    ax.annotate("≥", (x, y), textcoords="offset points", xytext=(-12, 2),
                                color=style["color"], fontsize=11)
        base = med["graceful"][ns[0]]["p99"] * 1000
        ax.axhline(HOL_FACTOR * base, color="tab:blue", linestyle=":", linewidth=1,
                   label=f"target: 2× graceful N={ns[0]}")
        ax.set_yscale("log")
        ax.set_ylim(0.2, 30_000)  # one scale for every panel, so they compare at a glance
        ax.set_xticks(list(xs), ns)
        ax.set_xlabel("never-closing clients arriving (N)")
        ax.set_ylabel("p99 latency of a normal client (ms)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    for ax in list(axes.flat)[len(with_hol):]:
        ax.set_visible(False)
    fig.suptitle("Head-of-line blocking: p99 latency of a normal client vs never-closing clients "
                 "(log scale; ≥: lower bound, a request was still waiting at the window's end)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_cpu_chart(targets: dict, path: Path) -> bool:
    """Grouped bars per server: graceful/stock CPU per request for the three workloads, the
    per-round spread as error bars, each workload's target as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    items = list(CPU_TARGETS)
    rows = [(e["label"], [e.get(i) if _ok(e.get(i)) and "cpu_ratio" in e[i] else None for i in items])
            for e in targets.values()]
    rows = [r for r in rows if any(r[1])]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(max(9.0, 1.5 * len(rows) + 4.0), 5.5))
    width = 0.27
    colors = ("tab:blue", "tab:orange", "tab:green")
    handles: list = []
    top = 1.3
    for n, (item, color) in enumerate(zip(items, colors, strict=True)):
        shift, goal = (n - 1) * width, CPU_TARGETS[item]
        for x, (_, datas) in enumerate(rows):
            data = datas[n]
            if data is None:
                ax.text(x + shift, 0.02, "n/a", ha="center", va="bottom", fontsize=7)
                continue
            value = data["cpu_ratio"]
            low, high = data.get("cpu_ratio_spread") or (value, value)
            top = max(top, high)
            met = value <= goal
            ax.bar(x + shift, value, width, color=color, edgecolor="black" if met else "red",
                   linewidth=0.6 if met else 1.8,
                   yerr=[[max(0.0, value - low)], [max(0.0, high - value)]], capsize=2,
                   error_kw={"elinewidth": 0.8, "ecolor": "dimgrey"})
            ax.text(x + shift, 0.05, f"{value:.2f}", ha="center", va="bottom", fontsize=7,
                    rotation=90, color="black" if met else "red")
        ax.axhline(goal, color=color, linestyle="--", linewidth=1.0)
        handles += [Patch(facecolor=color, edgecolor="black", label=CPU_LABELS[item]),
                    Line2D([], [], color=color, linestyle="--",
                           label=f"{CPU_LABELS[item]} target ≤ {goal:.2f}")]
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [textwrap.fill(r[0], 14) for r in rows], fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, min(top, 3.0) * 1.05)
    ax.set_ylabel("CPU per request: graceful ÷ stock (median)")
    ax.set_title("CPU per request per server, graceful ÷ stock (1.0 = stock's cost; "
                 "bars: per-round spread)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    handles.append(Patch(facecolor="white", edgecolor="red", linewidth=1.8, label="above its target"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_ratio_chart(targets: dict, path: Path) -> bool:
    """Grouped bars per server: graceful/stock req/s for keep-alive and Connection: close,
    with the two targets as horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = [(e["label"], *(e[i]["ratio"] if _ok(e.get(i)) else None for i in ("keepalive", "close")))
            for e in targets.values()]
    rows = [r for r in rows if r[1] is not None or r[2] is not None]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(rows) + 4.0), 5.5))
    width = 0.38
    top = max([1.15] + [v for r in rows for v in r[1:] if v is not None and math.isfinite(v)])
    series = (("keep-alive", 1, -width / 2, "tab:blue", KEEPALIVE_TARGET),
              ("Connection: close", 2, width / 2, "tab:orange", CLOSE_TARGET))
    handles: list = []
    for name, col, shift, color, goal in series:
        for x, row in enumerate(rows):
            value = row[col]
            if value is None:  # not measured or failed: say so instead of a missing bar
                ax.text(x + shift, 0.02, "n/a", ha="center", va="bottom", fontsize=8)
                continue
            met = value >= goal
            ax.bar(x + shift, value, width, color=color, edgecolor="black" if met else "red",
                   linewidth=0.6 if met else 1.8)
            ax.text(x + shift, value + 0.01, f"{value:.3f}", ha="center", va="bottom", fontsize=8,
                    color="black" if met else "red", zorder=3,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.8})
        ax.axhline(goal, color=color, linestyle="--", linewidth=1.2)
        handles += [Patch(facecolor=color, edgecolor="black", label=name),
                    Line2D([], [], color=color, linestyle="--", label=f"{name} target ≥ {goal:.2f}")]
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [textwrap.fill(r[0], 14) for r in rows], fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, top * 1.08)
    ax.set_ylabel("graceful req/s ÷ stock req/s (median)")
    ax.set_title("Throughput per server: graceful ÷ stock req/s (1.0 = stock speed)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    handles.append(Patch(facecolor="white", edgecolor="red", linewidth=1.8, label="below its target"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: dict, out_dir: Path) -> Path:
    meta, targets = results["meta"], results["targets"]
    plan = meta["plan"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines = [
        "# Benchmarks: graceful-close vs the stock servers", "",
        f"Measured {meta['date']}"
        f"{' (QUICK smoke run: small parameters, not a measurement)' if plan['quick'] else ''}"
        f" at commit {meta['git']}.", "",
        f"Command: `{meta['command']}` from the repository root "
        "(`--quick` for a smoke run; `--targets`, `--items` select parts).", "",
        "## Machine", "",
        f"- nproc: {meta['nproc']}; RLIMIT_NOFILE raised to {meta['rlimit_nofile']}",
        f"- uname: `{meta['uname']}`",
        f"- Python {meta['python']}; {versions}; {meta['wrk']}",
        "- free -m:", "", "```", meta["free"], "```", "",
        "Servers run one worker process on 127.0.0.1; wrk, the clients and the servers share the "
        f"same {meta['nproc']} cores. uvicorn runs with `--loop {plan['loop']}` (UvicornWorker picks "
        "its loop itself). Graceful variants use the default settings (linger_time 30 s, "
        "linger_timeout 5 s) unless an item says otherwise. Each comparison alternates stock and "
        f"graceful ({plan['reps']} wrk runs of {plan['throughput_seconds']:g} s each, more for "
        f"{', '.join(f'{k} (+{v})' for k, v in plan.get('extra_reps', {}).items()) or 'none'}, "
        f"{plan['hol_reps']} head-of-line repetitions) and reports medians.", "",
        "## Headline: CPU per request", "", *cpu_headline(targets), "",
        "## Summary", "", *_summary(targets), "",
    ]
    charts = [f"![{alt}]({name})" for alt, name, written in (
        ("graceful/stock CPU per request per server", CPU_CHART,
         write_cpu_chart(targets, out_dir / CPU_CHART)),
        ("graceful/stock throughput ratio per server", RATIO_CHART,
         write_ratio_chart(targets, out_dir / RATIO_CHART)),
        ("p99 latency vs never-closing clients", CHART, write_chart(targets, out_dir / CHART)))
        if written]
    if charts:
        lines += [" ".join(charts), ""]
    if NOTES.exists() and not plan["quick"]:
        lines += ["## Analysis", "", NOTES.read_text().strip(), ""]
    lines += ["## Details", "",
              *_throughput(targets, "keepalive", "1. Keep-alive throughput (GET /, 3-byte body)"),
              *_throughput(targets, "close", "1b. client-close: the client sends Connection: close"),
              *_throughput(targets, "server_close", "1c. server-close: the app answers Connection: "
                           "close (gunicorn's WSGI workers: --keep-alive 0)"),
              *_hol(targets), *_rss(targets), *_rss_paths(targets), *_census(targets, plan),
              *_correctness(targets, plan)]
    errors = [(e["label"], item, data["error"]) for e in targets.values()
              for item, data in e.items() if isinstance(data, dict) and "error" in data]
    if errors:
        lines += ["## Errors during the run", ""] + [f"- {label}, {i}: {e}" for label, i, e in errors] + [""]
    seconds = [f"{e['label']}: " + ", ".join(f"{k} {v:g} s" for k, v in e.get("seconds", {}).items())
               for e in targets.values() if e.get("seconds")]
    lines += ["Time taken per item: " + "; ".join(seconds), ""]
    path = out_dir / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path
