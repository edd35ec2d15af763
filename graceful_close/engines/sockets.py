"""Small socket operations shared by both drain engines."""

from __future__ import annotations

import fcntl
import socket
import struct
import sys

from ..core.linger import Ending

try:  # Linux: SIOCOUTQ == TIOCOUTQ, bytes written but not yet acknowledged by the peer.
    import termios

    _SIOCOUTQ: int | None = termios.TIOCOUTQ if sys.platform.startswith("linux") else None
except (ImportError, AttributeError):  # pragma: no cover - non-Linux
    _SIOCOUTQ = None

_LINGER_ZERO = struct.pack("ii", 1, 0)


def unacked_bytes(fd: int) -> int | None:
    """Bytes in the send queue the peer has not acknowledged; None where unknown."""
    if _SIOCOUTQ is None:
        return None
    try:
        raw = fcntl.ioctl(fd, _SIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return None
    return struct.unpack("i", raw)[0]


def can_abort_safely(fd: int, fin_sent: bool) -> bool:
    """RST destroys nothing only when the peer has acknowledged every byte we sent.

    After shutdown(SHUT_WR) our FIN takes one sequence number of its own, and a
    FIN cannot be acked before the data ahead of it: 1 outstanding then means only
    the FIN is unacked (the client delays that ACK), and no data can be lost.
    """
    outstanding = unacked_bytes(fd)
    return outstanding is not None and outstanding <= (1 if fin_sent else 0)


def close_for(sock: socket.socket, ending: Ending) -> bool:
    """Close a half-closed socket after its lingering close ends; True when it sent RST.

    RST on a timeout frees the socket at once instead of leaving an orphan in
    FIN_WAIT_2, and is only sent when no response byte can be lost by it.
    """
    aborted = False
    if ending.abort_if_acked and sock.fileno() >= 0 and can_abort_safely(sock.fileno(), fin_sent=True):
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


def half_close(sock: socket.socket) -> bool:
    """shutdown(SHUT_WR): the kernel sends FIN after the queued response bytes.

    False when the socket is no longer connected (the peer reset it already).
    """
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return False
    return True
