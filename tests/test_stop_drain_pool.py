"""Issue 16, short form: a pool client that behaves like a load balancer (16 persistent
connections, reused until a response says Connection: close, 0-50 ms pauses, no retries)
against every server we support while its workers recycle (--max-requests /
--limit-max-requests) and SIGHUP reloads them; stock and ours side by side.

Stock uvicorn (alone, under --workers, and gunicorn's UvicornWorker) closes idle pooled
connections at every stop and loses about one request per idle connection; stock gasgi closes
a connection right after a response that promised keep-alive when its worker stops meanwhile.
Those stock halves are xfail(strict=False). Stock gunicorn 27 gthread and gevent already keep
idle connections through the stop and answer with Connection: close: their stock halves pass
too (ours must not be worse). The full form is `python -m benchmarks --items pool`.
"""

from __future__ import annotations

import pytest

from benchmarks.churn import BY_NAME, pool_run
from tests.helpers import churn_cases

SECONDS = 4.0
HUP_EVERY = 2.0
# Recycles often enough for several stops per run at the pool's ~600 requests/s.
MAX_REQUESTS = 150

WHY_STOCK_LOSES = "closes idle pooled connections under the pool at a stop"


@pytest.mark.parametrize(("name", "variant"), churn_cases(BY_NAME, WHY_STOCK_LOSES))
def test_pool_loses_nothing_while_workers_recycle(name: str, variant: str) -> None:
    result = pool_run(BY_NAME[name], variant, SECONDS, HUP_EVERY, max_requests=MAX_REQUESTS,
                      jitter=50)
    print(f"{name} {variant}: failed / requests {result.row()}, {result.closes_announced} "
          f"answered with Connection: close, {result.connections_opened} connections")
    assert result.completed > 200, result.as_dict()  # it served: the churn meant something
    assert result.closes_announced > 0, result.as_dict()  # workers did stop under the pool
    assert result.failed == 0, result.as_dict()
