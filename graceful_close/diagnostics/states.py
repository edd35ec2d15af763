"""`graceful-close states`: a census of TCP socket states for a port or a process tree.

Sockets a process holds come from psutil. Sockets nobody holds come only from
/proc/net/tcp and tcp6 (inode 0): orphans the application closed that wait for
the peer (FIN_WAIT_2 until net.ipv4.tcp_fin_timeout), TIME_WAIT, and connections
still in the listen queue (ESTABLISHED, not yet accepted). psutil's per-process
view cannot see them, so they are counted from /proc on the port(s) in question
and reported as "no owner".
"""

from __future__ import annotations

import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .console import console_for_table

if TYPE_CHECKING:
    from rich.console import Console

PROC_NET = ("/proc/net/tcp", "/proc/net/tcp6")
FIN_TIMEOUT_PATH = Path("/proc/sys/net/ipv4/tcp_fin_timeout")

# /proc/net/tcp state codes (include/net/tcp_states.h), named as psutil names them.
PROC_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
    "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
    "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING", "0C": "SYN_RECV",
}
STATE_ORDER = ("LISTEN", "ESTABLISHED", "CLOSE_WAIT", "FIN_WAIT2", "TIME_WAIT", "FIN_WAIT1",
               "LAST_ACK", "CLOSING", "SYN_RECV", "SYN_SENT", "CLOSE")
HIGHLIGHT = {"CLOSE_WAIT": "bold red", "FIN_WAIT2": "bold yellow", "TIME_WAIT": "cyan"}


def state_meaning(state: str, fin_timeout: int | None) -> str:
    """One line per state, written for someone looking at a server's sockets."""
    fin = f"{fin_timeout} s" if fin_timeout is not None else "its value"
    return {
        "LISTEN": "accepting new connections",
        "ESTABLISHED": ("open connection; those with no owner are still queued for accept(): "
                        "the server is busy or stalled"),
        "CLOSE_WAIT": ("the client has closed, but the application still has not called close(): "
                       "no kernel timer ends this, so a growing count is a socket leak in the app"),
        "FIN_WAIT2": ("this side sent its FIN and it was acked; waiting for the client's FIN. "
                      "Clients that never close keep it here; once the app lets go (no owner) the "
                      f"kernel drops it after net.ipv4.tcp_fin_timeout = {fin}"),
        "TIME_WAIT": ("closed, this side first; the address pair stays reserved for 2 x MSL so "
                      "late segments cannot reach a new connection. Normal unless in huge numbers"),
        "FIN_WAIT1": ("FIN sent, not yet acked: brief, unless the client stopped reading or "
                      "vanished with response bytes still queued"),
        "LAST_ACK": "the client closed, then this side; waiting for the final ACK (brief)",
        "CLOSING": "both sides sent FIN at once; waiting for the ACK (rare, brief)",
        "SYN_RECV": "handshake in progress (many at once: a SYN flood or a full accept queue)",
        "SYN_SENT": "outgoing connection attempt in progress",
        "CLOSE": "fully closed, about to disappear",
    }.get(state, "")


def read_fin_timeout() -> int | None:
    try:
        return int(FIN_TIMEOUT_PATH.read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class KernelSocket:
    state: str
    local: str
    remote: str
    local_port: int
    inode: int

    @property
    def owned(self) -> bool:
        return self.inode != 0


def _decode(address: str, v6: bool) -> tuple[str, int]:
    host_hex, port_hex = address.split(":")
    raw = bytes.fromhex(host_hex)
    if v6:  # four little-endian 32-bit words
        raw = b"".join(struct.pack("<I", word) for word in struct.unpack(">4I", raw))
        host = socket.inet_ntop(socket.AF_INET6, raw)
    else:
        host = socket.inet_ntop(socket.AF_INET, raw[::-1])
    return host, int(port_hex, 16)


def kernel_sockets(paths: tuple[str, ...] = PROC_NET) -> list[KernelSocket] | None:
    """Every TCP socket the kernel knows (owned or not); None where /proc/net/tcp is missing."""
    found: list[KernelSocket] = []
    seen_any = False
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        seen_any = True
        v6 = path.endswith("6")
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            (lhost, lport), (rhost, rport) = _decode(fields[1], v6), _decode(fields[2], v6)
            found.append(KernelSocket(PROC_STATES.get(fields[3], fields[3]), f"{lhost}:{lport}",
                                      f"{rhost}:{rport}", lport, int(fields[9])))
    return found if seen_any else None


@dataclass
class Census:
    scope: str
    fin_timeout: int | None
    owned: Counter[str] = field(default_factory=Counter)
    unowned: Counter[str] = field(default_factory=Counter)  # orphans and TIME_WAIT, from /proc
    close_wait_by_pid: Counter[int] = field(default_factory=Counter)
    orphans_known: bool = True
    taken_at: float = field(default_factory=time.time)

    def total(self, state: str) -> int:
        return self.owned[state] + self.unowned[state]

    def states(self) -> list[str]:
        present = set(self.owned) | set(self.unowned)
        return [s for s in STATE_ORDER if s in present or s in HIGHLIGHT] + sorted(
            present - set(STATE_ORDER))

    def as_dict(self) -> dict[str, object]:
        return {
            "scope": self.scope, "taken_at": round(self.taken_at, 3),
            "tcp_fin_timeout": self.fin_timeout, "orphans_counted": self.orphans_known,
            "states": {s: {"total": self.total(s), "owned": self.owned[s],
                           "no_owner": self.unowned[s]} for s in self.states()},
            "close_wait_by_pid": {str(pid): n for pid, n in self.close_wait_by_pid.items()},
        }


class CensusError(Exception):
    """Cannot take the census (no such process, no permission): one line for the user."""


def _process_tree(pid: int) -> list[Any]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        raise CensusError(f"no process with pid {pid}") from None


def _connections(proc: Any) -> list[Any]:
    import psutil

    try:
        return proc.net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return []  # it exited meanwhile
    except psutil.AccessDenied:
        raise CensusError(f"no permission to read the sockets of pid {proc.pid} "
                          "(run as its user or root)") from None


def take_census(port: int | None = None, pid: int | None = None) -> Census:
    """States of the sockets of a process tree and/or of a local port, orphans included."""
    kernel = kernel_sockets()
    census = Census(_scope(port, pid), read_fin_timeout(), orphans_known=kernel is not None)
    if pid is not None:
        procs = _process_tree(pid)
        ports: set[int] = set()
        for proc in procs:
            for conn in _connections(proc):
                if conn.status == "LISTEN":
                    ports.add(conn.laddr.port)
                if port is not None and conn.laddr.port != port:
                    continue
                census.owned[conn.status] += 1
                if conn.status == "CLOSE_WAIT":
                    census.close_wait_by_pid[proc.pid] += 1
        if port is not None:
            ports = {port}
        for sock in kernel or []:  # what the processes closed but the kernel still holds
            if not sock.owned and sock.local_port in ports:
                census.unowned[sock.state] += 1
        return census
    if kernel is None:
        return _census_from_psutil(census, port)
    for sock in kernel:
        if port is None or sock.local_port == port:
            (census.owned if sock.owned else census.unowned)[sock.state] += 1
    census.close_wait_by_pid.update(_close_wait_pids(port))
    return census


def _census_from_psutil(census: Census, port: int | None) -> Census:
    """Without /proc (not Linux): what psutil sees; orphans cannot be told apart."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except psutil.AccessDenied:
        raise CensusError("no permission to list the system's sockets (try --pid, or root)") from None
    for conn in conns:
        if port is None or conn.laddr and conn.laddr.port == port:
            census.owned[conn.status] += 1
            if conn.status == "CLOSE_WAIT" and conn.pid:
                census.close_wait_by_pid[conn.pid] += 1
    return census


def _close_wait_pids(port: int | None) -> Counter[int]:
    """Which processes hold the CLOSE_WAIT sockets (only those we may inspect)."""
    import psutil

    holders: Counter[int] = Counter()
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return holders
    for conn in conns:
        if conn.status == "CLOSE_WAIT" and conn.pid and (port is None or conn.laddr.port == port):
            holders[conn.pid] += 1
    return holders


def _scope(port: int | None, pid: int | None) -> str:
    parts = []
    if pid is not None:
        parts.append(f"pid {pid} and its children")
    if port is not None:
        parts.append(f"local port {port}")
    return ", ".join(parts) or "all TCP sockets"


def render_census(census: Census, console: Console | None = None) -> None:
    console = console_for_table(console, lambda: plain_census(census))
    if console is None:
        return
    from rich.table import Table

    fin = f"{census.fin_timeout} s" if census.fin_timeout is not None else "unknown"
    table = Table(title=f"TCP states: {census.scope}  (net.ipv4.tcp_fin_timeout = {fin})",
                  title_justify="left")
    table.add_column("state")
    table.add_column("sockets", justify="right")
    table.add_column("no owner", justify="right")
    table.add_column("meaning", overflow="fold")
    for state in census.states():
        style = HIGHLIGHT.get(state, "") if census.total(state) else "dim"
        unowned = str(census.unowned[state]) if census.orphans_known else "?"
        table.add_row(f"[{style}]{state}[/]" if style else state,
                      f"[{style}]{census.total(state)}[/]" if style else str(census.total(state)),
                      unowned, state_meaning(state, census.fin_timeout))
    console.print(table)
    for line in _footer(census):
        console.print(line, highlight=False)


def _footer(census: Census) -> list[str]:
    lines = []
    if census.close_wait_by_pid:
        holders = ", ".join(f"pid {pid}: {n}" for pid, n in census.close_wait_by_pid.most_common())
        lines.append(f"CLOSE_WAIT held by {holders}")
    if census.orphans_known:
        lines.append("'no owner': sockets no process holds, from /proc/net/tcp{,6}: orphans the "
                     "application closed (FIN_WAIT*, LAST_ACK, CLOSING), TIME_WAIT, and connections "
                     "not yet accepted (ESTABLISHED); psutil only lists sockets a process holds.")
    else:
        lines.append("no /proc/net/tcp here: sockets without an owner are not counted.")
    return lines


def plain_census(census: Census) -> str:
    lines = [f"TCP states: {census.scope} (tcp_fin_timeout={census.fin_timeout})"]
    for state in census.states():
        lines.append(f"{state:12} {census.total(state):6} (no owner {census.unowned[state]})  "
                     f"{state_meaning(state, census.fin_timeout)}")
    return "\n".join(lines + _footer(census))

