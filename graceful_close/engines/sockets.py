"""Small socket operations shared by both drain engines: what the kernel knows about a
connection (unacknowledged and unread bytes), the half-close and the final close.

Decisions are not made here: the RST rule and "bytes at stake" live in core/linger.py.
"""

from __future__ import annotations

import _socket
import fcntl
import os
import socket
import struct
import sys

from ..core.descriptors import DescriptorBudget
from ..core.linger import Ending, nothing_unacked

try:  # Linux: SIOCOUTQ == TIOCOUTQ (bytes sent, not yet acknowledged by the peer) and
    # FIONREAD (bytes received, not yet read by us).
    import termios

    _LINUX = sys.platform.startswith("linux")
    _SIOCOUTQ: int | None = termios.TIOCOUTQ if _LINUX else None
    _FIONREAD: int | None = termios.FIONREAD if _LINUX else None
except (ImportError, AttributeError):  # pragma: no cover - non-Linux
    _SIOCOUTQ = _FIONREAD = None

_LINGER_ZERO = struct.pack("ii", 1, 0)


def _ioctl_int(fd: int, request: int | None) -> int | None:
    if request is None:
        return None
    # A writable buffer, filled in place: given immutable bytes, fcntl.ioctl first tries
    # them as writable, builds and formats a TypeError, then clears it (issue 18:
    # callgrind put that at ~2,000 instructions per call, and a close-at-once makes two).
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, request, buf)
    except OSError:
        return None
    return int.from_bytes(buf, sys.byteorder, signed=True)


def unacked_bytes(fd: int) -> int | None:
    """Bytes in the send queue the peer has not acknowledged; None where unknown."""
    return _ioctl_int(fd, _SIOCOUTQ)


def queued_bytes(fd: int) -> tuple[int | None, int | None]:
    """(unread_bytes, unacked_bytes) of one socket, in one call: a close-at-once asks both."""
    return _ioctl_int(fd, _FIONREAD), _ioctl_int(fd, _SIOCOUTQ)


def unread_bytes(fd: int) -> int | None:
    """Bytes in the receive queue we have not read; None where unknown."""
    return _ioctl_int(fd, _FIONREAD)


def descriptor_budget() -> DescriptorBudget | None:
    """This process's DescriptorBudget: RLIMIT_NOFILE against the descriptors open now.
    None where either is unknown (no resource module, no /proc or /dev/fd) or unlimited."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return None
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            in_use = len(os.listdir(directory)) - 1  # listdir's own descriptor
        except OSError:
            continue
        return DescriptorBudget(soft, in_use)
    return None


def can_abort_safely(fd: int, fin_sent: bool) -> bool:
    """RST destroys nothing of ours (the rule itself: core.linger.nothing_unacked)."""
    return nothing_unacked(unacked_bytes(fd), fin_sent)


def close_for(sock: _socket.socket, ending: Ending) -> bool:
    """Close a half-closed socket after its lingering close ends; True when it sent RST.

    RST on a timeout frees the socket at once instead of leaving an orphan in
    FIN_WAIT_2, and is only sent when no response byte can be lost by it.
    """
    aborted = False
    fd = sock.fileno()
    if ending.abort_if_acked and fd >= 0 and ending.aborts(unacked_bytes(fd)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            aborted = True
        except OSError:
            pass
    try:
        sock.close()
    except OSError:
        pass
    return aborted


def half_close(sock: _socket.socket) -> bool:
    """shutdown(SHUT_WR): the kernel sends FIN after the queued response bytes.

    False when the socket is no longer connected (the peer reset it already).
    """
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return False
    return True
