"""The asyncio drain engine on real loopback TCP, in process: how each lingering
close ends (EOF, idle and total deadlines, byte cap, eviction, shutdown) and what
the client sees (FIN first; RST only once everything it was sent is acked).

No uvicorn here: a minimal protocol answers, then hands its transport to the engine
with hand_off(), as graceful_close.uvicorn does; from then on the engine is the
transport's protocol.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

import pytest

from graceful_close.core import Counters
from graceful_close.core.descriptors import DescriptorBudget
from graceful_close.engines.aio import SWEEP_INTERVAL, AsyncioDrainEngine, DescriptorReclaimer
from graceful_close.settings import Settings

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"


class Answering(asyncio.Protocol):
    response = RESPONSE

    def __init__(self, engine: AsyncioDrainEngine) -> None:
        self.engine = engine

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(self.response)
        self.engine.hand_off(self.transport)
        assert self.transport.get_protocol() is not self  # the engine owns it now


async def _recv_all(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, str]:
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            data += chunk
    except ConnectionResetError:
        return data, "RST"
    except asyncio.TimeoutError:
        return data, "TIMEOUT"
    return data, "FIN"


def run(settings: Settings, client: Callable[[int, AsyncioDrainEngine], object]) -> Counters:
    counters = Counters()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        engine = AsyncioDrainEngine(loop, settings, counters)
        server = await loop.create_server(lambda: Answering(engine), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await client(port, engine)  # type: ignore[misc]
        finally:
            server.close()

    asyncio.run(main())
    return counters


def short(**overrides: object) -> Settings:
    return Settings(**{"linger_timeout": 0.3, "linger_time": 1.0, **overrides})  # type: ignore[arg-type]


async def _request(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return reader, writer


def test_client_close_is_the_clean_end() -> None:
    async def client(port: int, engine: AsyncioDrainEngine) -> None:
        reader, writer = await _request(port)
        assert await reader.read(65536) == RESPONSE
        writer.write(b"pipelined junk" * 1000)  # arrives while lingering: discarded
        assert await _recv_all(reader, 2) == (b"", "FIN")
        writer.close()
        await asyncio.sleep(0.1)
        assert engine.lingering == 0

    counters = run(short(), client)
    assert counters.ended_eof == 1 and counters.aborted_with_rst == 0
    assert counters.bytes_discarded == 14000


@pytest.mark.parametrize("abort", [False, True], ids=["default", "abort_on_timeout"])
def test_silent_client_after_the_idle_deadline(abort: bool) -> None:
    """Default (issue 20): the deadline closes plainly; the client keeps the FIN it had and
    sees no RST. abort_on_timeout=true: RST once everything is acknowledged."""
    async def client(port: int, engine: AsyncioDrainEngine) -> None:
        reader, writer = await _request(port)
        data = await reader.read(65536)
        assert data == RESPONSE
        assert await reader.read(1) == b""  # our FIN, right behind the response
        await asyncio.sleep(0.6)
        assert engine.lingering == 0
        sock = writer.get_extra_info("socket")
        assert (sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0) == abort  # RST?
        writer.close()

    counters = run(short(abort_on_timeout=abort), client)
    assert counters.ended_idle_timeout == 1 and counters.aborted_with_rst == int(abort)


def test_trickling_client_ends_at_linger_time_and_byte_cap_ends_sooner() -> None:
    async def trickle(port: int, engine: AsyncioDrainEngine) -> None:
        reader, writer = await _request(port)
        for _ in range(6):  # 1.2 s of a byte every 0.2 s: idle never expires
            writer.write(b"t")
            await asyncio.sleep(0.2)
        assert engine.lingering == 0
        writer.close()

    counters = run(short(), trickle)
    assert counters.ended_total_timeout == 1
    counters = run(short(linger_max_bytes=3), trickle)
    assert counters.ended_byte_cap == 1


def test_oldest_is_evicted_beyond_max_lingering() -> None:
    async def client(port: int, engine: AsyncioDrainEngine) -> None:
        writers = []
        for _ in range(3):
            reader, writer = await _request(port)
            assert await reader.read(65536) == RESPONSE
            writers.append(writer)
        await asyncio.sleep(0.05)
        assert engine.lingering == 2
        for writer in writers:
            writer.close()

    counters = run(short(max_lingering=2), client)
    assert counters.ended_evicted == 1


def test_shutdown_ends_lingering_connections_at_its_deadline() -> None:
    async def client(port: int, engine: AsyncioDrainEngine) -> None:
        reader, writer = await _request(port)
        assert await reader.read(65536) == RESPONSE
        writer.write(b"t")  # unread when the stop begins: at stake
        engine.begin_stop(0.1)
        await asyncio.sleep(0.25)
        assert engine.lingering == 0
        writer.close()

    counters = run(short(linger_timeout=5.0, linger_time=10.0), client)
    assert counters.ended_shutdown == 1


@pytest.mark.parametrize("abort", [True, False])
def test_abort_on_timeout_can_be_turned_off(abort) -> None:
    async def client(port: int, engine: AsyncioDrainEngine) -> None:
        reader, writer = await _request(port)
        assert await reader.read(65536) == RESPONSE
        await asyncio.sleep(0.6)
        writer.close()

    counters = run(short(abort_on_timeout=abort), client)
    assert counters.ended_idle_timeout == 1
    assert counters.aborted_with_rst == int(abort)


def test_one_timer_per_loop_however_many_linger() -> None:
    async def client(port: int, engine: AsyncioDrainEngine) -> None:
        conns = [await _request(port) for _ in range(50)]
        for reader, _ in conns:
            assert await reader.read(65536) == RESPONSE
        await asyncio.sleep(0.05)
        assert engine.lingering == 50
        loop = asyncio.get_running_loop()
        # asyncio's heap of timer handles: the sweep, not one per connection
        assert len(loop._scheduled) <= 2  # type: ignore[attr-defined]
        for _, writer in conns:
            writer.close()

    counters = run(short(linger_timeout=5.0, linger_time=10.0), client)
    assert counters.ended_eof == 50


def test_uvloop_transport_is_handed_off_too() -> None:
    uvloop = pytest.importorskip("uvloop")
    counters = Counters()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        engine = AsyncioDrainEngine(loop, short(), counters)
        server = await loop.create_server(lambda: Answering(engine), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await _request(port)
        assert await reader.read(65536) == RESPONSE
        writer.write(b"junk" * 100)
        assert await _recv_all(reader, 2) == (b"", "FIN")
        writer.close()
        silent_reader, silent = await _request(port)
        assert await silent_reader.read(65536) == RESPONSE
        await asyncio.sleep(0.7)  # idle deadline 0.3 s: a plain close (the default)
        assert engine.lingering == 0
        silent.close()
        server.close()

    uvloop.run(main())
    assert counters.ended_idle_timeout == 1 and counters.aborted_with_rst == 0
    assert counters.ended_eof == 1


def test_shutdown_closes_at_once_and_plainly_what_has_nothing_at_stake() -> None:
    """A client holding a finished connection (everything acked, nothing unread) does not
    delay a stop: it is closed at once with a plain close (no RST: it may not have read the
    response yet). One whose last bytes had arrived but were not read yet when the stop
    began is judged again once the loop has read them (the next sweep), and closed then."""
    async def client(port: int, engine: AsyncioDrainEngine) -> None:
        quiet_reader, quiet = await _request(port)
        busy_reader, busy = await _request(port)
        for reader in (quiet_reader, busy_reader):
            assert await reader.read(65536) == RESPONSE
        await asyncio.sleep(0.2)  # everything acked, our FIN included
        busy.write(b"x" * 100)  # in the server's receive queue, not read by the loop yet
        engine.begin_stop(5.0)
        engine.begin_stop(5.0)  # uvicorn calls it once per connection: idempotent
        # the busy one: unread bytes are at stake, until the loop reads them (a detached
        # socket's engine reads what has arrived at once, then judges it quiet)
        assert engine.lingering <= 1
        sock = quiet.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0  # no RST
        await asyncio.sleep(0.5)
        assert engine.lingering == 0  # read, then found quiet: not held to stop_linger
        quiet.close()
        busy.close()

    counters = run(short(linger_timeout=5.0, linger_time=10.0), client)
    assert counters.ended_shutdown == 2 and counters.bytes_discarded == 100


class BigAnswering(Answering):
    response = b"D" * 8_000_000  # more than the socket buffers hold: unacknowledged bytes


def test_stop_gives_what_is_at_stake_stop_linger_from_its_half_close() -> None:
    """Issue 20: a client that stopped reading its response (bytes unacknowledged: at
    stake) ends stop_linger after the hand-off, not at the stop's limit; the one with
    nothing at stake closes at once; the stop ends with SHUTDOWN, nothing is reset."""
    counters = Counters()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        engine = AsyncioDrainEngine(loop, Settings(linger_timeout=30, linger_time=60,
                                                   stop_linger=0.5), counters)
        big = await loop.create_server(lambda: BigAnswering(engine), "127.0.0.1", 0)
        small = await loop.create_server(lambda: Answering(engine), "127.0.0.1", 0)
        stuck_reader, stuck = await _request(big.sockets[0].getsockname()[1])
        quiet_reader, quiet = await _request(small.sockets[0].getsockname()[1])
        assert await quiet_reader.read(65536) == RESPONSE
        await asyncio.sleep(0.2)  # handed off, and everything of the quiet one acknowledged
        assert engine.lingering == 2
        engine.begin_stop(30)
        await asyncio.sleep(0.05)
        assert engine.lingering == 1 and counters.ended_shutdown == 1
        await asyncio.sleep(0.6)
        assert engine.lingering == 0 and counters.ended_shutdown == 2
        assert counters.aborted_with_rst == 0
        for writer in (stuck, quiet):
            writer.close()
        for server in (big, small):
            server.close()

    asyncio.run(main())


def test_descriptor_reclaimer_frees_idle_then_lingering_and_looks_again_while_short() -> None:
    """Issue 20: near the budget, idle connections first (the adapter's close_idle), then
    the least recently active lingering ones; when that is not enough, it looks again at
    the next sweep, by itself."""
    counters = Counters()
    calls: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        engine = AsyncioDrainEngine(loop, short(linger_timeout=30, linger_time=60), counters)
        server = await loop.create_server(lambda: Answering(engine), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clients = [await _request(port) for _ in range(3)]
        for reader, _ in clients:
            assert await reader.read(65536) == RESPONSE
        await asyncio.sleep(0.05)
        held = [60]  # descriptors the adapter says its connections hold

        def close_idle(wanted: int, asking: object) -> int:
            calls.append(wanted)
            return 1  # one idle keep-alive connection closed by the adapter

        reclaimer = DescriptorReclaimer(engine, DescriptorBudget(limit=64, in_use=4), lambda: held[0],
                                        close_idle)
        assert reclaimer.budget.capacity == 57
        reclaimer.check()  # 60 held: 3 beyond capacity + a batch of 3 = 6 wanted
        assert calls == [6] and engine.lingering == 0 and counters.ended_evicted == 3
        await asyncio.sleep(SWEEP_INTERVAL * 1.5)  # still short: it looked again
        assert calls == [6, 6]
        held[0] = 40  # room again: the next look frees nothing, and it stops looking
        await asyncio.sleep(SWEEP_INTERVAL * 3)
        assert calls == [6, 6]
        for _, writer in clients:
            writer.close()
        server.close()

    asyncio.run(main())
