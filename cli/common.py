"""What every sub-command module shares: the stderr console and `fail` (one red line, exit code 2 by default).
Sub-command modules import from here, never from `cli.main`, so the CLI has no import cycle."""
from __future__ import annotations

import typer
from rich.console import Console

console = Console(stderr=True)


def fail(msg: str, code: int = 2):
    """One ``error:`` line on stderr (whitespace collapsed, so a wrapped library message stays one line)."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(' '.join(str(msg).split()))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
