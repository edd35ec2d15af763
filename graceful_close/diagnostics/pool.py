"""A client pool that behaves like a load balancer's upstream pool (issue 16).

    python -m graceful_close.diagnostics.pool 127.0.0.1:8000 --seconds 10

- `connections` persistent HTTP/1.1 connections, each reused until a response says
  Connection: close (then the next request opens a new connection);
- a random pause of 0 to `max_pause` seconds between two requests on a connection, so
  connections sit idle at random moments, as a pool's do;
- no retries: a request without a complete response is a failure, classified as
  `eof` (the connection ended before any byte of the response), `reset` (an RST, before
  or during the response), `partial` (it ended inside the response), `refused` (no
  connection could be opened) or `timeout` (no complete response within `timeout`).

Responses are read with their Content-Length (chunked bodies too); their status codes are
counted, so a proxy's 502 shows as such. Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

FAILURES = ("eof", "reset", "partial", "refused", "timeout")


@dataclass
class PoolResult:
    requests: int = 0          # requests sent (or attempted: refused ones count)
    completed: int = 0         # complete responses
    failures: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    closes_announced: int = 0  # responses that said Connection: close
    connections_opened: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def per_second(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def row(self) -> str:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.failures.items()))
        return f"{self.failed} / {self.requests}" + (f" ({kinds})" if kinds else "")

    def as_dict(self) -> dict[str, object]:
        return {"requests": self.requests, "completed": self.completed, "failed": self.failed,
                "failures": dict(self.failures), "statuses": {str(k): v for k, v in self.statuses.items()},
                "closes_announced": self.closes_announced,
                "connections_opened": self.connections_opened, "seconds": round(self.seconds, 2),
                "per_second": round(self.per_second, 1)}


class _Failed(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the response says Connection: close); _Failed otherwise."""
    got_any = False
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        got_any = True
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, chunked, close = 0, False, lines[0].startswith("HTTP/1.0")
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "connection":
                close = "close" in value
        if chunked:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length:
            await reader.readexactly(length)
        return status, close
    except asyncio.IncompleteReadError as exc:
        raise _Failed("partial" if got_any or exc.partial else "eof") from None
    except (ConnectionResetError, BrokenPipeError):
        raise _Failed("reset") from None
    except (ValueError, IndexError, asyncio.LimitOverrunError):
        raise _Failed("partial") from None


async def _one_connection(host: str, port: int, request: bytes, until: float, max_pause: float,
                          timeout: float, result: PoolResult, rng: random.Random) -> None:
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        if writer is None:
            result.requests += 1
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            except (OSError, asyncio.TimeoutError):
                result.failures["refused"] += 1
                await asyncio.sleep(0.05)
                continue
            result.connections_opened += 1
        else:
            result.requests += 1
        assert reader is not None and writer is not None
        try:
            try:
                writer.write(request)
                await writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                raise _Failed("reset") from None
            status, close = await asyncio.wait_for(_read_response(reader), timeout)
        except _Failed as failed:
            result.failures[failed.kind] += 1
            close = True
        except asyncio.TimeoutError:
            result.failures["timeout"] += 1
            close = True
        else:
            result.completed += 1
            result.statuses[status] += 1
            if close:
                result.closes_announced += 1
        if close:
            writer.close()
            writer = reader = None
        await asyncio.sleep(rng.uniform(0.0, max_pause))
    if writer is not None:
        writer.close()


async def run_pool_async(host: str, port: int, seconds: float, connections: int = 16,
                         max_pause: float = 0.05, method: str = "GET", path: str = "/",
                         body: bytes = b"", timeout: float = 10.0, seed: int | None = None) -> PoolResult:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: pool\r\n"
    if body or method in ("POST", "PUT"):
        head += f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    request = head.encode() + b"\r\n" + body
    result = PoolResult()
    rng = random.Random(seed)
    started = time.monotonic()
    until = asyncio.get_running_loop().time() + seconds
    await asyncio.gather(*(_one_connection(host, port, request, until, max_pause, timeout, result,
                                           random.Random(rng.random()))
                           for _ in range(connections)))
    result.seconds = time.monotonic() - started
    return result


def run_pool(host: str, port: int, seconds: float, **kwargs: object) -> PoolResult:
    """run_pool_async in a loop of its own (call it from a thread of its own while the
    caller churns the server)."""
    return asyncio.run(run_pool_async(host, port, seconds, **kwargs))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="host:port")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--max-pause", type=float, default=0.05)
    parser.add_argument("--post", action="store_true", help="POST a small body instead of GET")
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    result = run_pool(host or "127.0.0.1", int(port), args.seconds, connections=args.connections,
                      max_pause=args.max_pause, method="POST" if args.post else "GET",
                      body=b"x" * 64 if args.post else b"")
    print(f"failed / requests: {result.row()}; statuses {dict(result.statuses)}; "
          f"{result.per_second:.0f} responses/s")
    return 1 if result.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
