"""Layer progress for long commands. On a terminal: a rich bar, created on the first layer (so an early
error never leaves an empty ``layers 0/None`` bar behind). Anywhere else (a CI log, a pipe): one plain line per
finished layer, ``layer i/n done in X s (total Y s)``, flushed at once."""
from __future__ import annotations

import sys
import time

from rich.console import Console


class LayerProgress:
    """Use as a context manager; pass `on_pass` as ``progress`` and `on_layer` as ``on_layer`` to
    `ptq.compress.compress`."""

    def __init__(self, console: Console, label: str = "layer", force_plain: bool | None = None):
        self.console, self.label = console, label
        self.plain = (not console.is_terminal) if force_plain is None else force_plain
        self.bar = self.task = None
        self.t0 = self.t_layer = time.time()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False

    def _ensure_bar(self, n: int):
        if self.bar is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                console=self.console, transient=False)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=n)

    def on_pass(self, i: int, n: int, pname: str) -> None:
        """Called before pass ``pname`` runs on layer ``i`` of ``n``."""
        if not self.plain:
            self._ensure_bar(n)
            self.bar.update(self.task, total=n, completed=i, description=f"{self.label} {i + 1}/{n} {pname}")

    def on_layer(self, i: int, n: int) -> None:
        """Called after layer ``i`` of ``n`` is finished and written."""
        now = time.time()
        if self.plain:
            print(f"{self.label} {i + 1}/{n} done in {now - self.t_layer:.1f} s (total {now - self.t0:.1f} s)",
                  file=sys.stderr, flush=True)
        else:
            self._ensure_bar(n)
            self.bar.update(self.task, total=n, completed=i + 1, description=f"{self.label} {i + 1}/{n} done")
        self.t_layer = now
