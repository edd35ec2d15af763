"""A small Flask app whose upload endpoint refuses large bodies before reading them.

Answering early (413 on the Content-Length alone) is what a well-behaved app should
do, and what a plain close punishes: the unread upload makes the kernel reset the
connection, and the client loses the 413. With graceful-close's workers it arrives.

    gunicorn -c integrations/gunicorn.conf.py            # our ThreadWorker
    gunicorn -c integrations/gunicorn_hooks.conf.py      # stock gthread + hooks
"""

from __future__ import annotations

from flask import Flask, jsonify, request

MAX_UPLOAD_BYTES = 1 << 20

app = Flask(__name__)


@app.get("/")
def index() -> str:
    return "ok\n"


@app.post("/upload")
def upload():  # type: ignore[no-untyped-def]
    size = request.content_length or 0
    if size > MAX_UPLOAD_BYTES:
        # Decided from the header alone: the body is never read.
        return jsonify(error="upload too large", limit=MAX_UPLOAD_BYTES, size=size), 413
    data = request.get_data()
    return jsonify(received=len(data))
