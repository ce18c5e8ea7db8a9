"""SIGTERM and SIGHUP handled like Ctrl-C: what Slurm, `docker stop`, `timeout` and a closed terminal
send ends a run the same recorded way (checkpoint kept, run KILLED with outcome ``interrupted``) and
the process exits 128 + the signal's number (143 for SIGTERM, 129 for SIGHUP, 130 for SIGINT)."""

from __future__ import annotations

import signal

HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM or SIGHUP arrives (a KeyboardInterrupt, so every
    ``except KeyboardInterrupt`` that records an interrupted run records this one too)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, _frame):
    raise Terminated(signum)


def install() -> None:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` in this process, and SIGINT into Python's
    KeyboardInterrupt even where it arrived ignored (call from the main thread). A command started in
    the background of a script inherits SIGINT ignored, and Python then installs no handler of its
    own: such a study could not be stopped by Ctrl-C or ``kill -INT``."""
    for sig in HANDLED:
        signal.signal(sig, _raise)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def name(exc: BaseException) -> str:
    return signal.Signals(exc.signum).name if isinstance(exc, Terminated) else "SIGINT"


def exit_code(exc: BaseException) -> int:
    """128 + the signal number of an interruption (SIGINT for a plain KeyboardInterrupt)."""
    return 128 + (exc.signum if isinstance(exc, Terminated) else int(signal.SIGINT))
