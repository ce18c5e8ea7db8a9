#!/usr/bin/env python
"""Re-run the mutations that real bugs in this harness would look like, each against the tests meant
to catch it, on a throw-away copy of the tree. Prints a Markdown table: caught or missed.

    .venv/bin/python scripts/known_mutations.py            # all
    .venv/bin/python scripts/known_mutations.py clip-at-inf # one

A mutation whose text is no longer in the code is reported as "stale" (the code moved: update the
pattern here), never silently skipped. mutmut (pyproject.toml [tool.mutmut]) generates mutations
mechanically; this list is the hand-written complement: the bugs a reviewer actually worried about.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".venv*", ".git", "mutants", "mlartifacts", "checkpoints", "*.db-journal",
                                "__pycache__", ".gpu-bundle", "demo-report")  # fmt: skip


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    expect: str = "caught"  # or "harmless": a test proves the mutated code cannot matter


MUTATIONS = (
    Mutation("clip-at-inf", "study/run/step.py",
             "norm = torch.nn.utils.clip_grad_norm_(params, max_norm)",
             "norm = torch.nn.utils.clip_grad_norm_(params, math.inf)",
             ("tests/test_step.py",)),
    Mutation("nonfinite-grad-applied", "study/run/step.py",
             "finite = math.isfinite(loss_v) and math.isfinite(norm_v)",
             "finite = math.isfinite(loss_v)",
             ("tests/test_step.py",)),
    Mutation("train-bpd-sign", "study/run/loop.py",
             "bits_per_dim(-acc.nll_sum / max(acc.images, 1), num_dims)",
             "bits_per_dim(acc.nll_sum / max(acc.images, 1), num_dims)",
             ("tests/test_training.py::test_logged_metrics_equal_a_hand_computation",)),
    Mutation("unpaired-p-value", "analysis/stats.py",
             '"p_value": paired_t_pvalue(diffs),',
             '"p_value": (__import__("scipy.stats").stats.ttest_ind([runs.loc[s, value] for s in ok], '
             '[base.loc[s, value] for s in ok]).pvalue if len(ok) > 1 else math.nan),',
             ("tests/test_analysis.py",)),
    Mutation("save-in-place", "study/run/checkpoint.py",
             'tmp = directory / f".{LAST}.tmp-{pid}"',
             "tmp = directory / LAST",
             ("tests/test_checkpoint.py",)),
    Mutation("bn-momentum-flipped", "study/flows/transforms.py",
             "self.running_var.lerp_(var.detach().to(self.running_var.dtype), self.momentum)",
             "self.running_var.lerp_(var.detach().to(self.running_var.dtype), 1 - self.momentum)",
             ("tests/test_transforms.py",)),
    Mutation("resume-without-global-rng", "study/run/state.py",
             'torch.set_rng_state(state["rng_torch"])',
             "pass",
             ("tests/test_step.py::test_step_and_evaluation_never_draw_from_the_global_rng",),
             expect="harmless"),
    Mutation("bpd-divisor", "study/metrics.py",
             "return -log_prob / (num_dims * math.log(2.0)) + 8.0",
             "return -log_prob / math.log(2.0) + 8.0",
             ("tests/test_realnvp.py",)),
    Mutation("temperature-ignored", "study/flows/realnvp.py",
             "* temperature",
             "* 1.0",
             ("tests/test_realnvp.py",)),
    # evaluation in train mode must be caught by more than one test: each pair is run on its own
    Mutation("eval-in-train-mode", "study/run/step.py",
             "    model.eval()\n    total = torch.zeros(2",
             "    model.train()\n    total = torch.zeros(2",
             ("tests/test_training.py::test_logged_metrics_equal_a_hand_computation",)),
    Mutation("eval-in-train-mode (2)", "study/run/step.py",
             "    model.eval()\n    total = torch.zeros(2",
             "    model.train()\n    total = torch.zeros(2",
             ("tests/test_analysis.py::test_audit_correct_row_equals_the_models_bits_per_dim_and_shifts_are_known",)),
)  # fmt: skip


def run_one(m: Mutation, python: str) -> tuple[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(ROOT, tree, ignore=IGNORE)
        path = tree / m.file
        if not path.exists() or m.old not in path.read_text():
            return "stale", 0.0
        path.write_text(path.read_text().replace(m.old, m.new, 1))
        start = time.perf_counter()
        # -p no:cacheprovider: nothing written into the copy's tests; the copy's study/ is first on sys.path
        out = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests], cwd=tree,
                             capture_output=True, text=True)  # fmt: skip
        seconds = time.perf_counter() - start
    failed = out.returncode != 0
    if m.expect == "harmless":
        return ("harmless (proven)" if not failed else "caught"), seconds
    return ("caught" if failed else "MISSED"), seconds


def main(names: list[str]) -> int:
    python = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    print("| mutation | file | tests | result | seconds |\n| --- | --- | --- | --- | ---: |")
    bad = 0
    for m in chosen:
        result, seconds = run_one(m, python)
        bad += result in ("MISSED", "stale")
        print(f"| {m.name} | `{m.file}` | {', '.join(f'`{t}`' for t in m.tests)} | {result} | {seconds:.0f} |",
              flush=True)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
