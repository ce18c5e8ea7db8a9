#!/usr/bin/env python
"""Command line of the Real NVP reproduction study. It only parses and dispatches: the work lives in
study/, experiments/ and analysis/, where tests and Optuna call it directly."""

from __future__ import annotations

import sys

import click

from study.config import ConfigError


def _fail(message: str) -> None:
    """A user error: one line on stderr and exit status 2, before anything is written."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _config(preset: str, data: str | None, overrides: tuple[str, ...]):
    from experiments.presets import preset_config
    from study.config import apply_values, parse_overrides
    from study.data import DataError, parse_data_spec

    try:
        cfg = preset_config(preset)
        values: dict[str, object] = dict(parse_data_spec(data)) if data else {}
        values.update(parse_overrides(overrides))
        return apply_values(cfg, values)
    except (ConfigError, DataError) as e:
        _fail(str(e))


PRESET = click.option("--preset", default="demo", show_default=True, help="demo, cifar-cpu or paper")
DATA = click.option("--data", default=None, help="patches | npz:DIR | cifar10:DIR (default: the preset's)")
SET = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="override a config value")


@click.group()
def cli():
    """Real NVP on CIFAR-10: which of the seed report's stabilizers does it need?"""


@cli.command()
@PRESET
@DATA
@SET
def summary(preset, data, overrides):
    """Print the model a configuration builds: size, parameters, forward GFLOP per image, data."""
    cfg = _config(preset, data, overrides)
    from study.summary import model_summary

    try:
        click.echo(model_summary(cfg))
    except ValueError as e:  # DataError and bad model shapes
        _fail(str(e))


if __name__ == "__main__":
    cli()
