#!/usr/bin/env python
"""The study's command line, runnable from a checkout: `python run_study.py COMMAND`. Installed, the same
command line is `run-study` (pyproject.toml's console script); both are study_cli/, the top floor."""

from study_cli import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    cli(prog_name="run_study.py")
