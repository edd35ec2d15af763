"""Issue 20 part 2: a deadline ends with FIN by default, like nginx
(reset_timedout_connection off) and Apache; RST stays an opt-in (abort_on_timeout=true).

A client reads a Connection: close response and the server's FIN, then holds its end open
without a word. linger_timeout (1 s) later our server closes its socket. With the default
the client sees nothing more (it had the FIN; no RST), and the server's side waits in
FIN_WAIT_2 as the kernel's orphan (net.ipv4.tcp_fin_timeout), as it does behind stock,
which closes at once. Until issue 20 the default sent RST once everything was acked.
"""

from __future__ import annotations

import pytest

from benchmarks.reliability import deadline_ending

# One server per drain engine (poll, gevent, asyncio under gunicorn and under uvicorn).
KEYS = ("gthread", "gevent", "asgi", "httptools")


@pytest.mark.parametrize("key", KEYS)
def test_a_deadline_ends_with_fin_like_stock(key: str) -> None:
    stock = deadline_ending(key, "stock", "asyncio")
    ours = deadline_ending(key, "graceful", "asyncio")
    print(f"{key}: stock {stock}, ours {ours}")
    assert stock["client"] == "FIN"  # the reference: stock never resets a finished client
    assert ours["client"] == "FIN", ours
    assert "FIN-WAIT-2" in ours["server"], ours  # the orphan, held by the kernel


@pytest.mark.parametrize("key", ("gthread", "httptools"))
def test_abort_on_timeout_is_the_opt_in_rst(key: str) -> None:
    ours = deadline_ending(key, "graceful", "asyncio", abort=True)
    assert ours["client"] == "RST" and "FIN-WAIT-2" not in ours["server"], ours
