"""Progress with an ETA: a live bar on a terminal (tqdm, on stderr), periodic lines in logs.

Per-epoch summary lines go to stdout (the run's echo); these go to stderr, so CI logs and redirected
output stay readable: on a terminal a bar with the epoch's ETA, elsewhere one line every LOG_EVERY_S.
"""

from __future__ import annotations

import contextlib
import sys
import time

LOG_EVERY_S = 30.0


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss or m:ss."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Lines:
    """A bar's stand-in where stderr is no terminal: a line every LOG_EVERY_S seconds."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= LOG_EVERY_S and self.done < self.total:
            rate = self.done / (now - self.start)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.label}: step {self.done}/{self.total}, {rate:.2f} steps/s, ETA {clock(eta)}", file=sys.stderr,
                  flush=True)  # fmt: skip
            self.last = now


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def epoch_bar(show: bool | None, steps: int, label: str):
    """Progress over an epoch's ``steps``: a tqdm bar with its ETA on a terminal; elsewhere periodic
    lines. ``show`` False turns both off (sweep workers, whose cells report their own progress);
    None decides by whether stderr is a terminal."""
    if show is False:
        yield _NoBar()
        return
    if show or sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=steps, desc=label, file=sys.stderr, unit="step", leave=False, dynamic_ncols=True) as bar:
            yield bar
        return
    yield _Lines(steps, label)


def remaining(durations: list[float], left: int, parallel: int = 1) -> float:
    """Seconds left for ``left`` items at the mean of ``durations``, ``parallel`` at a time."""
    if not durations:
        return float("nan")
    return sum(durations) / len(durations) * left / max(parallel, 1)
