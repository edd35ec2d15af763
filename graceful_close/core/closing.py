"""Sans-io: does a connection that ends need a lingering close at all? (issue 18)

`lingering_close` takes the names of nginx's directive:

- always: every close lingers (flush, FIN, read and discard until the client's EOF or a
  deadline).
- auto (the default): a close lingers unless the client itself ended the connection
  with an explicit `Connection: close` header (RFC 9112 §9.6: it must send nothing after
  that request), the request had no body or its body was read whole, and nothing is
  unread when we close (neither in the kernel's receive queue nor in the parser's buffer),
  and the response has left entirely (nothing queued in our buffers, nothing
  unacknowledged in the kernel's send queue). Such a connection can receive no byte that
  would turn our close into an RST, so it is closed at once, as the stock servers close it.

  The last condition is not in RFC 9112: it keeps a response still in flight safe from a
  client that breaks section 9.6 and sends more after its own Connection: close (the
  pipelined-after-close scenario: 2 MB in flight, requests arriving 50 ms later). A small
  response is acknowledged at once on loopback (nginx or a sidecar in front on the same
  host); across a network it usually is not yet when we close, and then the close lingers,
  which costs a linger and loses nothing. Everything else lingers: every close the
  server decides (the app's Connection: close, the keep-alive caps, the User-Agent rule,
  errors, timeouts, a stop), every unread or partly read body, any pending input, and an
  HTTP/1.0 request that ends the connection only implicitly (old clients are the ones the
  Apache notes warn about).

This is stricter than nginx's `lingering_close on` heuristic, which lingers only on input
already pending and so loses requests pipelined in flight.

No sockets here: adapters pass what they know (header values, a body flag, byte counts).
"""

from __future__ import annotations

from collections.abc import Iterable

AUTO = "auto"
ALWAYS = "always"
MODES = (AUTO, ALWAYS)


def says_close(value: bytes | str) -> bool:
    """A Connection header value that carries the `close` token."""
    if isinstance(value, str):
        value = value.encode("latin-1")
    low = value.lower()
    if low == b"close":  # what clients send (nginx, wrk, curl): no split
        return True
    if b"close" not in low:  # the common case, one scan
        return False
    return any(part.strip() == b"close" for part in low.split(b","))


def headers_say_close(headers: Iterable[tuple[bytes | str, bytes | str]]) -> bool:
    """Some Connection header of `headers` (a request's or a response's; names and values as
    bytes or str, any case) carries the `close` token. Of a request: the client ended the
    connection explicitly; an HTTP/1.0 request without the header closes only implicitly,
    and gets False."""
    for name, value in headers:
        if len(name) == 10 and name.lower() in (b"connection", "connection"):
            if says_close(value):
                return True
    return False


def closes_at_once(mode: str, client_closed: bool, body_complete: bool,
                   unread: int | None, unsent: int | None) -> bool:
    """Close without lingering? `client_closed`: headers_say_close() of the last request's headers;
    `body_complete`: that request had no body or all of it was received; `unread`: bytes
    received and not consumed (receive queue + parser buffer); `unsent`: response bytes not
    yet acknowledged (our buffers + the kernel's send queue). Unknown counts (None) linger."""
    return mode == AUTO and client_closed and body_complete and unread == 0 and unsent == 0


__all__ = ["ALWAYS", "AUTO", "MODES", "closes_at_once", "headers_say_close", "says_close"]
