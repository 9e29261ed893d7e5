"""Terminal output shared by the commands: a rich console and tables that fit the terminal, and plurals."""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

#: Width when stdout is not a terminal (a pipe, a file, a test): the classic 80 columns.
DEFAULT_WIDTH = 80


def console(width: int | None = None) -> Console:
    """A console on stdout: the terminal's width, else $COLUMNS, else 80; no colour when piped."""
    if width is None and not sys.stdout.isatty():
        width = _columns()
    return Console(width=width, soft_wrap=False, highlight=False, emoji=False, markup=False)  # text as is


def _columns() -> int:
    try:
        return max(40, min(400, int(os.environ.get("COLUMNS", DEFAULT_WIDTH))))
    except ValueError:
        return DEFAULT_WIDTH


def table(*columns: tuple[str, dict[str, Any]]) -> Table:
    """A borderless table whose columns wrap or fold instead of overflowing the terminal."""
    t = Table(
        box=None, pad_edge=False, show_edge=False, expand=False, header_style="bold", padding=(0, 1, 0, 0)
    )
    for name, opts in columns:
        t.add_column(name, **opts)
    return t


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """'1 image', '2 images' (or the plural given)."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def article(word: str) -> str:
    """'an image', 'a text': the indefinite article for a word, by its first letter."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"
