"""waitress's channel and task with the lingering close and the keep-alive policy.

waitress closes a connection with a plain socket.close() (HTTPChannel.handle_close), and
stops reading once it has decided to close: a 413 of its own (max_request_body_size), an
error, or a Connection: close response with requests pipelined behind it leave client
bytes unread, and the close turns into RST, cutting the response. GracefulChannel hands
the socket to a PollDrainEngine (graceful_close.engines.poll) instead, in one method,
`_gc_hand_off`; the engine half-closes at once and drains in waitress's own wasyncore
loop, through LingerDispatcher (its epoll descriptor in the socket map), with no thread.

Every waitress name used is listed in graceful_close.waitress._compat.
"""

from __future__ import annotations

import time
from typing import Any

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.task import WSGITask

from ..core.closing import AUTO, closes_at_once, says_close
from ..core.keepalive import KeepAlivePolicy, keep_alive_value
from ..engines.poll import PollDrainEngine
from ..engines.sockets import unacked_bytes, unread_bytes
from ..settings import current_settings

_NO_CAP = 2**62


class _Process:
    policy: KeepAlivePolicy | None = None
    keepalive_header = False
    at_once = False  # lingering_close=auto (issue 18, core.closing)


def policy() -> KeepAlivePolicy:
    found = _Process.policy
    if found is None:
        settings = current_settings()
        _Process.keepalive_header = settings.keepalive_header
        _Process.at_once = settings.lingering_close == AUTO
        found = _Process.policy = KeepAlivePolicy(settings)
    return found


class LingerDispatcher(wasyncore.dispatcher):
    """The drain engine in waitress's loop: its epoll descriptor in the socket map. The loop
    asks readable() every turn (at least once a second): the engine's coarse timer sweep runs
    there; handle_read_event() reads what the lingering sockets sent."""

    def __init__(self, engine: PollDrainEngine, socket_map: dict[int, Any]) -> None:
        wasyncore.dispatcher.__init__(self, None, socket_map)
        self.engine = engine
        self.connected = True
        fd = engine.fileno()
        assert fd is not None  # the engine made its own epoll
        self._fileno = fd
        self.add_channel(socket_map)

    def readable(self) -> bool:
        engine = self.engine
        if engine.lingering:
            engine.sweep(time.monotonic())
        return engine.lingering > 0

    def writable(self) -> bool:
        return False

    def handle_read_event(self) -> None:
        self.engine.poll(0.0)

    def handle_expt_event(self) -> None:
        pass

    def handle_close(self) -> None:
        pass

    def close(self) -> None:
        """waitress closes every dispatcher of its map at its end; the engine stays, to end
        what lingers by the stop rule (serve() calls engine.finish)."""
        self.del_channel()


class GracefulWSGITask(WSGITask):
    """Ends the connection after this response (Connection: close) when the keep-alive policy
    says so. Per request: an integer increment and, with an age cap, one clock read."""

    _gc_policy_closes = False  # our keep-alive policy ended the connection: it lingers

    def build_response_header(self) -> bytes:
        channel = self.channel
        channel._gc_requests = served = channel._gc_requests + 1
        if served == 1:
            channel._gc_first_request(self.request)
        if served >= channel._gc_cap or time.monotonic() >= channel._gc_age_deadline:
            self._gc_decide(channel, served)
        elif _Process.keepalive_header:
            self._gc_decide(channel, served)
        header: bytes = super().build_response_header()
        if self.close_on_finish and _Process.at_once:  # waitress decided to close after this
            self._gc_note_if_client_closed(channel)
        return header

    def _gc_note_if_client_closed(self, channel: GracefulChannel) -> None:
        if not self._gc_policy_closes and says_close(self.request.headers.get("CONNECTION", "")):
            channel._gc_note_client_close()

    def _gc_decide(self, channel: GracefulChannel, served: int) -> None:
        decision = policy().decide(served, channel._gc_accepted, time.monotonic(),
                                   channel._gc_user_agent, self.request.command or "GET")
        if not decision.keep_alive:
            self._gc_policy_closes = True
            self.set_close_on_finish()
        elif _Process.keepalive_header and not self.close_on_finish:
            value = keep_alive_value(channel.adj.channel_timeout, decision.remaining_requests)
            self.response_headers.append(("Keep-Alive", value))




class GracefulChannel(HTTPChannel):
    """HTTPChannel whose close lingers (see the module docstring)."""

    task_class = GracefulWSGITask
    _gc_reading = False  # inside recv(): a close there is the client's EOF or reset
    # lingering_close=auto: the client ended the connection itself with an explicit
    # Connection: close on the request just answered, and nothing came in behind it.
    _gc_client_closed = False

    def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
        super().__init__(server, sock, addr, adj, map=map)
        keep_alive = policy()
        now = time.monotonic()
        self._gc_requests = 0
        self._gc_cap = keep_alive.max_requests or _NO_CAP
        self._gc_accepted = now
        self._gc_age_deadline = now + keep_alive.max_age if keep_alive.max_age else float("inf")
        self._gc_user_agent: str | None = None  # set only when its rules may close
        budget = getattr(server, "_gc_budget", None)
        if budget is not None:  # once per connection: near RLIMIT_NOFILE, free some
            self._gc_make_room(budget)

    def _gc_make_room(self, budget: Any) -> None:
        """Issue 20: lingering sockets hold descriptors a stock server would have freed; near
        the limit the oldest end first, so that new clients are still accepted. The socket map
        holds waitress's channels, listeners and trigger."""
        engine: PollDrainEngine | None = getattr(self.server, "_gc_engine", None)
        if engine is not None and engine.lingering:
            wanted = budget.to_free(len(self._map) + engine.lingering)
            if wanted:
                engine.evict(wanted)

    def _gc_first_request(self, request: Any) -> None:
        """The User-Agent rule, once per connection, on its first request: only a connection
        whose agent a rule matches decides on the slow path from then on."""
        rules = policy().user_agents
        agent = request.headers.get("USER_AGENT") if rules.active else None
        if agent:
            always, on_post = rules.verdict(agent)
            if always or on_post:
                self._gc_user_agent = agent
                self._gc_cap = 0

    def _gc_note_client_close(self) -> None:
        """In the task thread, as the response headers of a request whose explicit Connection:
        close the client sent are built (GracefulWSGITask). waitress is serving it, so its body
        was received whole; behind it nothing may be parsed or held (a request queued, one
        begun). ErrorTask answers (its own 413, 400s) never get here."""
        with self.requests_lock:
            self._gc_client_closed = len(self.requests) == 1 and self.request is None

    def _gc_closes_at_once(self) -> bool:
        """lingering_close=auto (core.closing): the client ended the connection and the close
        loses nothing: no later request begun, every byte flushed from waitress's buffers,
        nothing unread in the socket, the response all acknowledged. Bytes waitress read and
        dropped once it decided to close were read: they cannot turn the close into an RST."""
        if not self._gc_client_closed or self.request is not None or self.total_outbufs_len:
            return False
        try:
            fd = self.socket.fileno()
        except OSError:
            return False
        return fd >= 0 and closes_at_once(AUTO, True, True, unread_bytes(fd), unacked_bytes(fd))

    def recv(self, buffer_size: int) -> bytes:
        self._gc_reading = True
        try:
            data: bytes = super().recv(buffer_size)
            return data
        finally:
            self._gc_reading = False

    def handle_close(self) -> None:
        if not self._gc_reading and self.socket is not None:
            self._gc_hand_off()
        super().handle_close()  # the output buffers, the map; the socket's close is a no-op now

    def _gc_hand_off(self) -> None:
        """The one hand-off (or, under lingering_close=auto, none: _gc_closes_at_once): the
        engine detaches the socket's descriptor, half-closes it (the
        FIN follows what waitress flushed) and drains it until the client's EOF or a deadline."""
        if self._gc_client_closed and self._gc_closes_at_once():
            return  # waitress's own close follows, at once, as stock closes
        engine: PollDrainEngine | None = getattr(self.server, "_gc_engine", None)
        if engine is not None:
            engine.hand_off(self.socket)
