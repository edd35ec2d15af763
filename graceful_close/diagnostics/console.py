"""The rich console the command-line tables print to."""

from __future__ import annotations

import os
from collections.abc import Callable
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


def console_for_table(console: Console | None, plain: Callable[[], str]) -> Console | None:
    """The console to print a rich table to (`console`, else table_console()); without rich,
    prints `plain()` instead and returns None: rich is in the diagnostics extra only."""
    try:
        import rich.table  # noqa: F401 - only whether it imports
    except ImportError:  # pragma: no cover - rich is in the diagnostics extra
        print(plain())
        return None
    return console if console is not None else table_console()
