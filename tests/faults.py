"""Fault injection for command-line runs: patch the run's Hooks, then run the command line.

    python tests/faults.py poison-step=1 crash-after-checkpoint=2 -- train --preset demo ...

``poison-step=N`` makes the loss of global step N NaN once per process (as a real NaN would be,
once); ``crash-after-checkpoint=E`` exits like SIGKILL right after epoch E's checkpoint, before MLflow
hears of the epoch; ``slow-save=S`` and ``slow-log=S`` pause S seconds inside every checkpoint write
(after the temporary file is written, before it is renamed into place) and before every batch of
metrics goes to MLflow, so that a kill at a random moment often lands there; ``host=NAME`` makes the
process stand for another machine (its owner tags read NAME:PID), ``grace=S`` and ``beat=S`` shorten
the ownership grace and the heartbeat interval; ``fill-disk=E:FOLDER`` fills FOLDER's filesystem
right after epoch E's checkpoint (a file ``FOLDER/filler`` grown until the disk refuses);
``hold-at-epoch=E`` holds the start of epoch E for 300 s, so that a signal a test sends on reading
epoch E-1's line reaches a live run however loaded the machine is. Nothing here is
imported by the harness: production runs use study.run.Hooks as is.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # run as a script, before ROOT is on sys.path: not conftest's


class PoisonAt:
    """A Hooks.loss that makes one global step's loss NaN, once (not again after a restore)."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, step, loss):  # a plain callable on the class: not bound to the Hooks instance
        if self.step is not None and step == self.step:
            self.step = None
            return loss * float("nan")
        return loss


def install(faults: list[str]) -> None:
    from study.run.spec import Hooks

    for fault in faults:
        name, _, value = fault.partition("=")
        if name == "poison-step":
            Hooks.loss = PoisonAt(int(value))
        elif name == "crash-after-checkpoint":
            Hooks.after_checkpoint = lambda _hooks, epoch, at=int(value): os._exit(137) if epoch == at else None
        elif name == "slow-save":
            import study.run.checkpoint as ck

            real_save, pause = ck.torch.save, float(value)

            def slow_save(obj, f, *args, real_save=real_save, pause=pause, **kwargs):
                real_save(obj, f, *args, **kwargs)
                time.sleep(pause)  # the temporary file is written, not yet renamed over last.pt

            ck.torch.save = slow_save
        elif name == "slow-log":
            from study.store import RunLogger

            real_metrics, pause = RunLogger.metrics, float(value)

            def slow_metrics(self, values, step, real_metrics=real_metrics, pause=pause):
                time.sleep(pause)
                real_metrics(self, values, step)

            RunLogger.metrics = slow_metrics
        elif name == "host":  # this process stands for another machine: its owner tags say host:pid
            import socket

            socket.gethostname = lambda host=value: host
        elif name in ("grace", "beat"):  # a short ownership grace or heartbeat interval, in seconds
            import study.run.ownership as own

            setattr(own, "GRACE_S" if name == "grace" else "BEAT_S", float(value))
        elif name == "hold-at-epoch":  # epoch E starts only after 300 s: a signal sent once the line of
            import study.run.loop as loop  # epoch E-1 is read lands mid-run, however late it is read

            real_epoch, at = loop.train_epoch, int(value)

            def held(run, st, epoch, real_epoch=real_epoch, at=at):
                if epoch == at:
                    time.sleep(300)
                return real_epoch(run, st, epoch)

            loop.train_epoch = held
        elif name == "fill-disk":
            at, _, folder = value.partition(":")
            Hooks.after_checkpoint = lambda _hooks, epoch, at=int(at), folder=folder: (
                fill(Path(folder) / "filler") if epoch == at else None)
        else:
            raise SystemExit(f"unknown fault {fault!r}")


def fill(path: Path) -> None:
    """Grow ``path`` until its filesystem is full (a real ENOSPC, not a mock)."""
    import errno

    with open(path, "ab", buffering=0) as f:  # unbuffered: nothing left to flush at close
        for block in (65536, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise


def run_cli(faults: list[str], args: list[str], cwd: str, out: str) -> None:
    """The command line with FAULTS installed, in this process: a target for a multiprocessing
    forkserver that has torch, mlflow and the harness imported already, so a test that starts many
    runs does not pay ~6 s of imports for each. stdout goes to OUT, stderr to OUT.err (line-buffered)."""
    os.chdir(cwd)
    sys.stdout, sys.stderr = open(out, "w", buffering=1), open(f"{out}.err", "w", buffering=1)
    install(faults)
    import run_study

    run_study.cli(args, prog_name="run_study.py")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    split = sys.argv.index("--")
    install(sys.argv[1:split])
    import run_study

    run_study.cli(sys.argv[split + 1 :], prog_name="run_study.py")
