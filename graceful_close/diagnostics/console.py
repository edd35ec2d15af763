"""The rich console the command-line tables print to."""

from __future__ import annotations

import os
from typing import Any


def table_console(width_when_piped: int = 130) -> Any:
    """A rich Console; when piped without COLUMNS, wider than rich's default 80 columns."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=width_when_piped)
    return console
