"""gunicorn with graceful-close's gthread worker: lingering closes and the keep-alive policy.

    gunicorn -c integrations/gunicorn.conf.py                 # serves flask_app:app
    gunicorn -c integrations/gunicorn.conf.py myproject.wsgi  # any WSGI app

GRACEFUL_CLOSE_* environment variables fill in what configure() leaves out.
"""

import multiprocessing
import os

from graceful_close import configure

wsgi_app = "flask_app:app"
pythonpath = os.path.dirname(os.path.abspath(__file__))  # where flask_app.py lives
bind = "0.0.0.0:8000"

worker_class = "graceful_close.gunicorn.ThreadWorker"
workers = multiprocessing.cpu_count()
threads = 8
worker_connections = 1000
keepalive = 5            # idle keep-alive seconds (keepalive_header=True announces it)
timeout = 30
graceful_timeout = 35    # SIGTERM: requests in flight, then lingering sockets, get this long
max_requests = 10000     # restart now and then; lingering then gets only linger_timeout
max_requests_jitter = 1000

configure(
    linger_time=30.0,            # nginx lingering_time: total cap of one lingering close
    linger_timeout=5.0,          # nginx lingering_timeout: idle cap between client reads
    max_lingering=10000,         # lingering sockets per worker; the oldest goes first
    keepalive_requests=1000,     # nginx keepalive_requests
    keepalive_time=3600.0,       # nginx keepalive_time
    nokeepalive_user_agents=["legacy"],
    keepalive_header=True,       # send "Keep-Alive: timeout=5, max=..." (off by default, like nginx)
)
