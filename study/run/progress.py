"""The progress bar of a run's epochs, on stderr (per-epoch summary lines go to stdout)."""

from __future__ import annotations

import contextlib
import sys


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def epoch_bar(show: bool | None, steps: int, label: str):
    """A bar over ``steps`` steps when ``show`` (None: when stderr is a terminal), else a no-op."""
    if not (show if show is not None else sys.stderr.isatty()):
        yield _NoBar()
        return
    import click

    with click.progressbar(length=steps, label=label, file=sys.stderr) as bar:
        yield bar
