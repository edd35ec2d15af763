"""A hypercorn config file of your own, with graceful-close's classes and settings.

    cd integrations && hypercorn -c file:hypercorn_conf.py starlette_app:app
    cd integrations && hypercorn -c file:hypercorn_conf.py --workers 4 starlette_app:app

Importing logger_class is what matters: it makes hypercorn's asyncio and uvloop workers build
our connections, in this process and in every worker hypercorn spawns (they import it when
they unpickle the config). configure() exports the settings to the environment, which the
spawned workers inherit. hypercorn copies every name of this file into its config: keep
them few, and picklable (no `from __future__ import annotations` here).
"""

from graceful_close import configure
from graceful_close.hypercorn import logger_class  # noqa: F401 - the config value itself

configure(linger_time=30.0, linger_timeout=5.0, keepalive_requests=100, keepalive_time=600.0)

bind = ["127.0.0.1:8000"]
keep_alive_timeout = 5
graceful_timeout = 10
