"""hypercorn with the lingering close of graceful-close, as a hypercorn config module:

    hypercorn -c python:graceful_close.hypercorn module:app
    hypercorn -c python:graceful_close.hypercorn --workers 4 -k uvloop module:app

Importing this module makes hypercorn's asyncio (and uvloop) worker build our connections
(graceful_close.hypercorn.server). As a config it sets one value, logger_class, whose
class lives here: hypercorn's spawned workers unpickle it, which imports this module in
each of them. With a Python config file of your own, import it there:

    from graceful_close.hypercorn import logger_class  # noqa: F401

Code that starts hypercorn itself calls graceful_close.hypercorn.serve(app, config) in
place of hypercorn.asyncio.serve, or graceful_close.hypercorn.run(config) in place of
hypercorn.run.run. The trio worker is refused with one line.

hypercorn's Config.from_object copies every public name of this module into the config,
so the module keeps few: each one is picklable by reference.
"""

from .server import GracefulLogger as logger_class
from .server import install, run, serve

install()

__all__ = ["install", "logger_class", "run", "serve"]
