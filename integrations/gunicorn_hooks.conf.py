"""Stock gunicorn gthread with only graceful-close's hooks: the keep-alive policy, no lingering.

    gunicorn -c integrations/gunicorn_hooks.conf.py

The hooks end a connection at the request cap, at the age cap (counted from its
first request) and for User-Agents without working keep-alive, with
"Connection: close". They cannot linger: closes stay gunicorn's own (blocking,
2 s / 64 KiB), so an app's early 413 to a large upload can still be reset, and
there is no "Keep-Alive" header. For those, use gunicorn.conf.py (our worker).
"""

import os

from graceful_close import configure
from graceful_close.gunicorn_hooks import on_starting, pre_request  # noqa: F401 (hooks by name)

wsgi_app = "flask_app:app"
pythonpath = os.path.dirname(os.path.abspath(__file__))
bind = "0.0.0.0:8000"

worker_class = "gthread"
threads = 8
keepalive = 5

# keepalive_requests and keepalive_time come from GRACEFUL_CLOSE_* or the defaults (1000, 1 h).
configure(nokeepalive_user_agents=["legacy", "msie6"])
