"""What happened to a run that ended, in the words a reader needs (the ``result`` tag), beside the
engine's ``outcome`` (what the loop did: completed, recovered, diverged):

- ``fails-at-init``: non-finite before any optimizer update, i.e. at the model's initialisation
  (GradScaler's own skipped steps are not updates): nothing about training stability follows;
- ``diverges-in-training``: non-finite after some updates were applied;
- ``fails-in-eval``: training stayed finite, the eval-mode validation or test did not (its event's
  cause says whether batch statistics score the same images finitely: batch norm's running averages);
- ``trains-badly``: finite, but the final model scores no better than UNIFORM_BPD, the uniform density
  on every pixel value (exactly 8 bits/dim whatever the model's size or the run's length, which is why
  it is the reference rather than the run's first epoch: a 6-epoch and a 100-epoch run are held to the
  same bar, and a model at or above it has learned nothing a constant density does not know);
- ``trained``: finite and better than that.

Runs recorded before the tag existed are classified by the same function from their events (an event
without ``updates`` counts a divergence at global step 0 as before any update).
"""

from __future__ import annotations

import math

from study.metrics import UNIFORM_BPD

LABELS = {
    "fails-at-init": "fails at initialisation",
    "diverges-in-training": "diverges in training",
    "fails-in-eval": "fails in evaluation",
    "trains-badly": f"trains badly (>= {UNIFORM_BPD:g} bits/dim)",
    "trained": "trained",
}


def classify(outcome: str, events: list[dict], final_bpd: float | None) -> str | None:
    """The result of a run from the engine's ``outcome``, its divergence events (in order, each with
    cause, step and, when recorded, updates) and the final model's bits/dim (test, else the last
    validation epoch). None for a run that did not end (interrupted, pruned, skipped, running)."""
    if outcome == "diverged":
        last = events[-1] if events else {}
        cause = str(last.get("cause", ""))
        if cause.startswith(("non-finite validation", "non-finite test")):
            return "fails-in-eval"
        if int(last.get("updates", last.get("step", 1))) == 0:
            return "fails-at-init"
        return "diverges-in-training"
    if outcome in ("completed", "recovered"):
        if final_bpd is None or not math.isfinite(final_bpd) or final_bpd >= UNIFORM_BPD:
            return "trains-badly"
        return "trained"
    return None
