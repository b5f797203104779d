"""Rich consoles for the command line that never cut a table when the output is not a terminal.

On a terminal rich wraps to the terminal's width.  Piped or redirected, rich assumes 80 columns and
folds or ellipsises table cells (``conform`` case names, ``bench`` counters), so a log or a ``grep``
loses text.  :func:`make_console` returns a console that, when its file is not a tty, widens itself
for each table (or anything measurable) to the width that renderable needs, and prints everything
else (rules, plain lines) at the usual width.
"""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement

#: Width for text that is not a table when the output is not a terminal (rules, wrapped prose).
PIPE_WIDTH = 100


class WideConsole(Console):
    """A ``Console`` that prints each table at its natural width when writing to a pipe or file."""

    def print(self, *objects, **kwargs):  # noqa: A003 - rich's name
        if self.is_terminal or not objects:
            return super().print(*objects, **kwargs)
        need = PIPE_WIDTH
        for obj in objects:
            if isinstance(obj, str):
                continue
            try:
                m = Measurement.get(self, self.options.update_width(1 << 16), obj)
            except Exception:                          # not measurable: leave the width alone
                continue
            need = max(need, m.maximum)
        saved = self.width
        self.width = need
        try:
            return super().print(*objects, **kwargs)
        finally:
            self.width = saved


def make_console(*, stderr: bool = False, **kwargs) -> Console:
    """A console on stdout (or stderr) that keeps whole tables when not writing to a terminal."""
    if "width" not in kwargs:
        probe = Console(stderr=stderr)
        if not probe.is_terminal:
            kwargs["width"] = PIPE_WIDTH
    return WideConsole(stderr=stderr, **kwargs)
