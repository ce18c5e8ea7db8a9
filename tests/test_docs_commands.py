"""Every shell command in the README and docs/ works as written.

Each line of a ```bash block (continuations joined, comments dropped) is classed by its program. The
project's own commands (`run_study.py`, `run-study`, `python -m bench.*`) are parsed by click exactly
as written, so a renamed option or a bad value fails here (the README once said `bench --size paper`
after the option had become `--preset`), and then run, shortened where they train (SHORTEN), in a
scratch folder that sees the repository's studies/ and ../shared/ and writes nothing into the
checkout. A command is parsed but not run only for a reason in PARSE_ONLY. Any other program must be
one of OTHER's, each with what runs it instead: a command of an unknown program fails until it is
classed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, WORKING_COPY

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

OTHER = {  # a command's start -> what runs it instead
    "bash scripts/setup.sh": "CI's .ci/run runs the set-up on a fresh clone",
    ".venv/bin/python -m pytest": "the test suite itself",
    ".venv/bin/python scripts/local_cluster.py": "tests/test_multi_machine.py brings a cluster up and down",
    "sudo -u postgres": "administers PostgreSQL on a database host",
    "mlflow server": "a tracking server on a database host (tests/test_multi_machine.py runs one)",
    "srun": "a SLURM cluster",
    "torchrun": "several processes or GPUs (tests/test_distributed.py runs torchrun on the CPU)",
    "PY=.venv/bin/python bash scripts/gpu/check.sh": "a GPU: scripts/gpu/rehearse.sh rehearses the check on the CPU",
    "bash scripts/gpu/": "the GPU check's bundle and rehearsal (minutes, a network)",
    "CHECK_ONLY=paper-stability,paper-stability-table bash scripts/gpu/check.sh":
        "a GPU: tests/test_transfer_report.py rehearses these two steps on the CPU",
}
PARSE_ONLY = {  # a substring of a project command -> why it is parsed but not run here
    "--device cuda": "needs a GPU (scripts/gpu/check.sh runs these on one)",
    "postgresql+psycopg2://": "a PostgreSQL cluster (tests/test_multi_machine.py runs these on a throwaway one)",
    " ui": "serves until stopped (tests/test_ui.py serves it to a browser)",
    " dashboard": "serves until stopped (tests/test_dashboard.py serves it)",
    "report --experiment stabilizers-cifar-study": "a committed report (tests/test_committed_report.py)",
    "--compile": "compiles the paper-size model: minutes on a CPU (test_training.py, test_fast_paths.py compile)",
}
SHORTEN = {  # appended to a command that trains, so that it runs in seconds (click: the last value wins)
    "train": ["--epochs", "1", "--set", "data.train_limit=64"],
    "ablation": ["--seeds", "1", "--epochs", "1", "--set", "data.train_limit=32"],  # and one variant: below
    "lr-search": ["--trials", "2", "--epochs", "1", "--set", "data.train_limit=32"],
    "bench": ["--preset", "demo", "--steps", "1", "--batch", "2"],  # the timing path, at the tiny size
    "probe-init": ["--seeds", "1"],
    "bench.cell": ["--size", "demo", "--epochs", "1", "--set", "data.train_limit=64"],
    "bench.optimisations": ["--preset", "demo", "--steps", "1", "--batch", "2", "--compile-size", "none"],
    "bench.fast_paths": ["--preset", "demo", "--steps", "1", "--batch", "2", "--options", "eager,channels_last"],
}


def shortened(rest: list[str]) -> list[str]:
    """A run_study command's arguments, shortened: an ablation without --only runs its first variant."""
    extra = list(SHORTEN.get(rest[0], []))
    if rest[0] == "ablation" and "--only" not in rest and len(rest) > 1 and not rest[1].startswith("-"):
        from experiments.studies import STUDIES

        extra += ["--only", STUDIES[rest[1]][0].name]
    return [*rest, *extra]


PROJECT = re.compile(r"^(?:\S*python3?\s+(?:run_study\.py|-m\s+(bench\.\w+))|\S*run-study)\s*(.*)$")


def shell_commands(page: Path) -> list[tuple[str, str]]:
    """(page:line, command) for each command in the page's ```bash blocks."""
    found, block, lines = [], False, page.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            block = line.strip() == "```bash" if not block else False
        elif block and line.strip() and not line.lstrip().startswith("#"):
            where, text = f"{page.relative_to(ROOT)}:{i + 1}", line.strip()
            while text.endswith("\\"):
                i += 1
                text = text[:-1].rstrip() + " " + lines[i].strip()
            found.append((where, re.sub(r"\s+#\s.*$", "", text)))
        i += 1
    return found


COMMANDS = [c for page in PAGES for c in shell_commands(page)]


def _runs(text: str) -> bool:
    project = PROJECT.match(text)
    return project is not None and not any(key in f" {project.group(2)}" for key in PARSE_ONLY)


CASES = [pytest.param(where, text, id=where, marks=[pytest.mark.slow(60)] if _runs(text) else [])
         for where, text in COMMANDS]  # fmt: skip


def test_the_pages_hold_the_commands_a_user_starts_with():
    texts = [text for _, text in COMMANDS]
    assert any(t == "bash scripts/setup.sh" for t in texts) and any("-m pytest" in t for t in texts)
    assert any("lr-search --preset demo" in t for t in texts), "a demo learning-rate search example"
    assert len(COMMANDS) >= 30


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder laid out like the checkout for the commands' relative paths (studies/, ../shared/), with
    its own stores, and one trained run for the commands that name RUN_ID."""
    top = tmp_path_factory.mktemp("docs")
    here = top / "repo"
    here.mkdir()
    # a copy of the committed studies as git holds them: a command unpacks its store there, not in the checkout
    shutil.copytree(ROOT / "studies", here / "studies", ignore=shutil.ignore_patterns("checkpoints", *WORKING_COPY))
    if (ROOT.parent / "shared").exists():
        (top / "shared").symlink_to(ROOT.parent / "shared")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{here / 'mlflow.db'}",
           "OPTUNA_STORAGE": f"sqlite:///{here / 'optuna.db'}", "PYTHONPATH": str(ROOT)}  # fmt: skip
    train = [sys.executable, str(ROOT / "run_study.py"), "train", "--preset", "demo", *SHORTEN["train"]]
    out = subprocess.run(train, cwd=here, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    run_id = re.search(r"run ([0-9a-f]{32})", out.stdout + out.stderr)[1]
    return here, env, run_id


def _parse(args: list[str]) -> None:
    """click's own parsing of a run_study command as the shell hands it over: a UsageError on an option
    or value that does not exist."""
    import click

    from study_cli.commands import cli

    assert args and args[0] in cli.commands, f"no command {args[:1]}"
    try:
        cli.commands[args[0]].make_context(args[0], args[1:])
    except click.exceptions.Exit:  # --help and the like
        pass


@pytest.mark.parametrize("where,text", CASES)
def test_each_command_works_as_written(where, text, scratch):
    here, env, run_id = scratch
    project = PROJECT.match(text)
    if project is None:
        assert any(text.startswith(start) for start in OTHER), f"{where}: `{text}`: a program this test does not know"
        return
    module, rest = project.group(1), shlex.split(project.group(2).replace("RUN_ID", run_id))
    if module is None:
        _parse(rest)
    why = next((why for key, why in PARSE_ONLY.items() if key in f" {project.group(2)}"), None)
    if why is not None:
        return
    if module is None:
        args = [sys.executable, str(ROOT / "run_study.py"), *shortened(rest)]
    else:
        args = [sys.executable, "-m", module, *rest, *SHORTEN.get(module, [])]
    out = subprocess.run(args, cwd=here, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{where}: `{text}` exited {out.returncode}:\n{out.stderr[-3000:]}"
