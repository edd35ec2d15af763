"""The rich console the command-line tables print to."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported only when a table is printed
    from rich.console import Console


def table_console(width_when_piped: int = 130) -> Console:
    """A rich Console; when piped without COLUMNS, wider than rich's default 80 columns."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=width_when_piped)
    return console
