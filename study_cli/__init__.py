"""The command line, the house's top floor: `run_study.py` and the `run-study` console script are this
package. It parses options, opens the one tracking store (study.store.Store) of a command, and hands
over to the floors below: analysis/, bench/ and experiments/, then the engine in study/. Nothing
below imports it (tests/test_layout.py)."""

from study_cli.commands import cli, main

__all__ = ["cli", "main"]
