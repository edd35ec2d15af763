"""Issue 16, short form: a real nginx in front (upstream keepalive 16, proxy_http_version 1.1,
Connection "") and clients POSTing small bodies, while the workers behind it recycle and
SIGHUP reloads them. nginx does not retry a POST on another upstream connection, so a request
lost on a pooled upstream connection is a 502. Stock and ours side by side; stock halves that
lose requests are xfail(strict=False). The full form is `python -m benchmarks --items nginx`.
"""

from __future__ import annotations

import os

import pytest

from benchmarks.churn import BY_NAME, NGINX, nginx_run
from tests.helpers import churn_cases

SECONDS = 3.5
HUP_EVERY = 1.5
MAX_REQUESTS = 150

pytestmark = pytest.mark.skipif(not os.path.exists(NGINX) and not os.environ.get("CI"),
                                reason="nginx is not installed (.ci/run installs it)")

WHY_STOCK_LOSES = "nginx answers 502 for POSTs lost on pooled connections"


@pytest.mark.parametrize(("name", "variant"), churn_cases(BY_NAME, WHY_STOCK_LOSES))
def test_no_502_behind_nginx_while_workers_recycle(name: str, variant: str) -> None:
    result = nginx_run(BY_NAME[name], variant, SECONDS, HUP_EVERY, max_requests=MAX_REQUESTS,
                       jitter=50)
    bad = result.statuses.get(502, 0)
    print(f"{name} {variant} behind nginx: {bad} 502s / {result.requests}; {result.row()}")
    assert result.statuses.get(200, 0) > 300, result.as_dict()
    assert result.failed == 0, result.as_dict()  # nginx itself answered every request
    assert bad == 0, result.as_dict()
