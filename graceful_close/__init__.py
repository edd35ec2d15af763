"""graceful-close: lingering close for gunicorn, uvicorn, hypercorn and waitress.

A server that closes a socket with unread client data makes the kernel send RST,
and the client's kernel then drops response bytes it has not read yet. This
package half-closes instead, drains what the client still sends, and closes
once the client has read everything (or a deadline passes).
"""

from .settings import Settings, SettingsError, configure, current_settings

__version__ = "0.1.0"
__all__ = ["Settings", "SettingsError", "__version__", "configure", "current_settings"]
