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


def _config(preset: str, data: str | None, overrides: tuple[str, ...], variant: str | None = None):
    """The preset, with --data and --set applied, then the overrides of an ablation variant (which a
    --set may not contradict: a run's variant tag never disagrees with its config)."""
    from experiments.presets import preset_config
    from experiments.studies import find_variant
    from study.config import apply_values, parse_overrides
    from study.data import DataError, parse_data_spec

    try:
        cfg = preset_config(preset)
        values: dict[str, object] = dict(parse_data_spec(data)) if data else {}
        values.update(parse_overrides(overrides))
        if variant is not None:
            v = find_variant(variant)
            clash = sorted(k for k in parse_overrides(overrides) if k in v.overrides)
            if clash:
                raise ConfigError(f"--set {clash[0]} contradicts variant {variant!r}, which sets it: drop one of them")
            values.update(v.overrides)
        return apply_values(cfg, values)
    except KeyError as e:
        _fail(str(e.args[0]))
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
    from analysis.summary import model_summary

    try:
        click.echo(model_summary(cfg))
    except ValueError as e:  # DataError and bad model shapes
        _fail(str(e))


TRACKING = click.option(
    "--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)"
)
EXPERIMENT = click.option("--experiment", default="realnvp", show_default=True, help="MLflow experiment name")
DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
CHECKPOINT_DIR = click.option("--checkpoint-dir", default="checkpoints", show_default=True, type=click.Path())
EXPERIMENT_OPT = click.option("--experiment", default=None, help="MLflow experiment (default: STUDY-PRESET)")


@cli.command()
@PRESET
@DATA
@click.option("--seed", type=int, default=None, help="run seed (train.seed)")
@click.option("--epochs", type=int, default=None, help="number of epochs (train.epochs)")
@SET
@EXPERIMENT
@TRACKING
@DEVICE
@click.option("--variant", default=None, help="an ablation variant: its overrides are applied and its name recorded")
@CHECKPOINT_DIR
@click.option("--resume", "resume_run_id", default=None, help="continue this MLflow run from its last checkpoint")
@click.option("--fresh", is_flag=True, help="start a new run even if one with the same identity exists")
def train(
    preset,
    data,
    seed,
    epochs,
    overrides,
    experiment,
    tracking_uri,
    device,
    variant,
    checkpoint_dir,
    resume_run_id,
    fresh,
):
    """Train one Real NVP run, logged to MLflow; re-running the same command resumes it."""
    extra = tuple(overrides)
    if seed is not None:
        extra += (f"train.seed={seed}",)
    if epochs is not None:
        extra += (f"train.epochs={epochs}",)
    cfg = _config(preset, data, extra, variant)
    from pathlib import Path

    from experiments.studies import find_variant
    from study.data import DataError
    from study.run import RunSpec
    from study.run import train as train_run

    spec = RunSpec(
        cfg=cfg,
        preset=preset,
        variant=variant or "default",
        description=find_variant(variant).rationale if variant else "",
        source="run_study.py train",
        experiment=experiment,
        tracking_uri=tracking_uri,
        device=device,
        checkpoint_root=Path(checkpoint_dir),
        fresh=fresh,
        echo=click.echo,
    )
    try:
        train_run(spec, resume_run_id=resume_run_id)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again (or --resume RUN_ID) to continue", err=True)
        sys.exit(130)


@cli.command()
@click.argument("study_name", required=False)
@click.option("--list", "list_", is_flag=True, help="list the studies and exit")
@click.option("--dry-run", is_flag=True, help="print the plan (variant x seed) and touch nothing")
@PRESET
@DATA
@click.option("--seeds", type=int, default=3, show_default=True, help="seeds 0..N-1")
@click.option("--seed-list", default=None, help="explicit comma-separated seeds, e.g. 0,1,2")
@click.option("--only", multiple=True, metavar="VARIANT", help="run only these variants (repeatable)")
@click.option("--epochs", type=int, default=None, help="epochs per cell (train.epochs)")
@SET
@click.option("--workers", type=int, default=1, show_default=True, help="local worker processes")
@click.option("--storage", default=None, help="Optuna storage (default: sqlite:///optuna.db here)")
@EXPERIMENT_OPT
@TRACKING
@DEVICE
@CHECKPOINT_DIR
@click.option(
    "--grace", type=int, default=30, show_default=True, help="seconds without heartbeat before a cell is retried"
)
def ablation(
    study_name,
    list_,
    dry_run,
    preset,
    data,
    seeds,
    seed_list,
    only,
    epochs,
    overrides,
    workers,
    storage,
    experiment,
    tracking_uri,
    device,
    checkpoint_dir,
    grace,
):
    """Run an ablation study: every (variant, seed) cell, resumable, over workers (Optuna + MLflow)."""
    from experiments.studies import STUDIES, STUDY_DESCRIPTIONS

    if list_ or not study_name:
        for name, variants in STUDIES.items():
            click.echo(f"{name}: {len(variants)} variants; {STUDY_DESCRIPTIONS[name]}")
            for v in variants:
                click.echo(f"  {v.name:<20} {v.rationale}")
        return
    from pathlib import Path

    from study.sweep import ablation as ab

    extra = tuple(overrides) + ((f"train.epochs={epochs}",) if epochs is not None else ())
    base = _config(preset, data, extra)
    try:
        if seed_list:
            seed_values = tuple(int(x) for x in seed_list.split(",") if x.strip())
        else:
            seed_values = tuple(range(seeds)) if seeds >= 1 else ()
    except ValueError:
        _fail(f"--seed-list {seed_list!r}: write comma-separated integers, e.g. 0,1,2")
    if workers < 1:
        _fail("--workers must be >= 1")
    try:
        plan = ab.make_plan(
            study_name,
            preset,
            base,
            seed_values,
            only,
            device,
            experiment=experiment,
            storage=storage,
            tracking_uri=tracking_uri,
            checkpoint_root=Path(checkpoint_dir),
            grace=grace,
            heartbeat=max(1, grace // 3),
        )
    except ConfigError as e:
        _fail(str(e))
    click.echo(ab.describe(plan))
    if dry_run:
        return
    try:
        ab.run(plan, workers=workers, echo=click.echo)
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to continue where it stopped", err=True)
        sys.exit(130)


@cli.command("lr-search")
@PRESET
@DATA
@click.option("--variant", default=None, help="an ablation variant whose switches the search uses (default: preset)")
@click.option("--trials", type=int, default=8, show_default=True, help="finished trials the study should hold")
@click.option("--epochs", type=int, default=None, help="epochs per trial (train.epochs)")
@SET
@click.option("--storage", default=None, help="Optuna storage (default: sqlite:///optuna.db here)")
@click.option("--workers", type=int, default=1, show_default=True)
@click.option("--sampler", default="tpe", show_default=True, help="tpe, grid or gp")
@click.option("--pruner", default="median", show_default=True, help="median, hyperband or none")
@click.option(
    "--range",
    "lr_range",
    nargs=2,
    type=float,
    default=(1e-4, 1e-2),
    show_default=True,
    metavar="LOW HIGH",
    help="learning-rate range, searched log-uniformly",
)
@click.option("--search-warmup", is_flag=True, help="also search the warm-up length (0-200 steps)")
@click.option("--experiment", default=None, help="MLflow experiment (default: lr-search-PRESET)")
@TRACKING
@DEVICE
@CHECKPOINT_DIR
@click.option(
    "--grace", type=int, default=30, show_default=True, help="seconds without heartbeat before a trial is retried"
)
def lr_search(
    preset,
    data,
    variant,
    trials,
    epochs,
    overrides,
    storage,
    workers,
    sampler,
    pruner,
    lr_range,
    search_warmup,
    experiment,
    tracking_uri,
    device,
    checkpoint_dir,
    grace,
):
    """Search the learning rate with Optuna (objective: validation bits/dim), each trial an MLflow run."""
    from pathlib import Path

    import pandas as pd

    from study.sweep import lrsearch

    extra = tuple(overrides) + ((f"train.epochs={epochs}",) if epochs is not None else ())
    base = _config(preset, data, extra)
    if workers < 1:
        _fail("--workers must be >= 1")
    try:
        search = lrsearch.make_search(
            base,
            preset,
            variant,
            trials,
            lr_range[0],
            lr_range[1],
            sampler,
            pruner,
            storage=storage,
            tracking_uri=tracking_uri,
            experiment=experiment,
            checkpoint_root=Path(checkpoint_dir),
            device=device,
            search_warmup=search_warmup,
            grace=grace,
            heartbeat=max(1, grace // 3),
        )
        frame, best = lrsearch.run(search, workers, echo=click.echo)
    except ConfigError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        click.echo("interrupted: run the same command again to continue the search", err=True)
        sys.exit(130)
    click.echo(pd.DataFrame(frame).drop(columns=["mlflow_run_id", "duplicate"]).to_string(index=False))
    pruned = int((frame["state"] == "PRUNED").sum())
    if best is None:
        click.echo(f"no trial completed ({pruned} pruned)")
    else:
        click.echo(
            f"best: lr {best['lr']:.4g} -> validation {best['value']:.4f} bits/dim (trial {int(best['trial'])}, "
            f"{len(frame)} trials, {pruned} pruned); use it with --set train.lr={best['lr']:.4g}"
        )


@cli.command()
@click.option("--experiment", default="stabilizers-cifar-cpu", show_default=True, help="the study's MLflow experiment")
@TRACKING
@click.option("--out", default="report", show_default=True, type=click.Path(), help="folder for README.md and figures/")
@click.option(
    "--window", type=int, default=40, show_default=True, help="last-N-epoch window of the validation statistic"
)
@click.option("--data", default=None, help="where the audit finds the runs' data, if not where they were trained")
@click.option("--audit/--no-audit", default=True, show_default=True, help="run the accounting audit")
@click.option("--lr-experiment", default=None, help="MLflow experiment of the lr searches (default: lr-search-PRESET)")
def report(experiment, tracking_uri, out, window, data, audit, lr_experiment):
    """Regenerate the report (tables, figures, audit) from a study's MLflow runs."""
    from pathlib import Path

    from analysis.collect import NoRunsError
    from analysis.report import generate_report
    from study.data import DataError, parse_data_spec

    if window < 1:
        _fail("--window must be >= 1")
    try:
        override = {k.split(".", 1)[1]: v for k, v in parse_data_spec(data).items()} if data else None
        args = " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("run_study.py") else "report"
        path = generate_report(tracking_uri, experiment, Path(out), window, override, audit,
                               command=f"python run_study.py {args}", lr_experiment=lr_experiment)  # fmt: skip
    except (NoRunsError, DataError) as e:
        _fail(str(e))
    click.echo(f"wrote {path}")


@cli.command()
@click.option("--run", "run_id", required=True, help="MLflow run id whose last checkpoint to evaluate")
@click.option("--data", default=None, help="patches | npz:DIR | cifar10:DIR (default: the run's own data)")
@click.option("--split", type=click.Choice(["val", "test", "train"]), default="test", show_default=True)
@click.option("--mode", type=click.Choice(["eval", "train"]), default="eval", show_default=True,
              help="eval: batch norm's running statistics; train: each batch's own")  # fmt: skip
@click.option("--bn-recalibrate", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="re-estimate batch-norm running statistics from N training batches first")  # fmt: skip
@click.option("--batch", type=click.IntRange(min=1), default=None, help="evaluation batch (default: the run's)")
@click.option("--log/--no-log", default=True, show_default=True, help="record the result on the run")
@TRACKING
def evaluate(run_id, data, split, mode, bn_recalibrate, batch, log, tracking_uri):
    """Evaluate a run's checkpoint on any data and split, in eval or train mode: bits/dim +- its
    standard error over images, logged to the run under a name that states data, split and mode."""
    from study.data import DataError
    from study.run.evaluation import evaluate_run

    try:
        r = evaluate_run(run_id, tracking_uri, data, split, mode, bn_recalibrate, batch, log)
    except (ValueError, DataError) as e:
        _fail(str(e))
    recal = f", batch norm re-estimated from {r.recalibrate} training batches" if r.recalibrate else ""
    click.echo(f"run {run_id}: {r.split} split of {r.data} data, {r.mode} mode{recal}: {r.bpd:.4f} +- {r.se:.4f} "
               f"bits/dim (standard error over {r.n} images)" + (f"; logged as {r.metric}" if log else ""))


@cli.command()
@TRACKING
@click.option("--port", type=int, default=5000, show_default=True)
def ui(tracking_uri, port):
    """Serve the MLflow UI for the study's store on 127.0.0.1 (Ctrl-C stops it)."""
    from study.tracking import serve_ui

    try:
        serve_ui(tracking_uri, port, echo=click.echo)
    except ValueError as e:
        _fail(str(e))


@cli.command()
@click.option("--run", "run_id", required=True, help="MLflow run id whose checkpoint to sample from")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("-n", "--num", type=int, default=64, show_default=True, help="number of samples")
@click.option("--out", default=None, type=click.Path(), help="PNG to write (default: samples-RUN-tT.png)")
@TRACKING
def sample(run_id, temperature, num, out, tracking_uri):
    """Write a grid of samples from a run's last checkpoint."""
    from study.run.state import sample_from_run

    try:
        path = sample_from_run(run_id, tracking_uri, temperature, num, out)
    except ValueError as e:
        _fail(str(e))
    click.echo(f"wrote {path}")


@cli.command()
@click.option("--size", type=click.Choice(["paper", "small", "cifar-cpu", "demo"]), default="demo", show_default=True)
@DEVICE
@click.option("--amp", type=click.Choice(["off", "fp16", "bf16"]), default="off", show_default=True)
@click.option("--channels-last", is_flag=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile log_prob (a cold compile takes ~1 min)")
@click.option("--compile-mode", type=click.Choice(["default", "reduce-overhead", "max-autotune"]), default="default",
              show_default=True, help="with --compile; reduce-overhead adds CUDA graphs on a GPU")  # fmt: skip
@click.option("--model", "arch", type=click.Choice(["ours", "usual-repro"]), default="ours", show_default=True,
              help="usual-repro: the usual PyTorch reproduction's s/t net shape (the targets' baseline)")  # fmt: skip
@click.option("--batch", type=int, default=16, show_default=True)
@click.option("--steps", type=int, default=5, show_default=True, help="timed steps after 2 warm-up steps")
@click.option("--matrix", is_flag=True, help="usual-repro fp32, then ours in each amp x channels_last, in one table")
@click.option("--log", "log_", is_flag=True, help="record the table as an MLflow run (experiment 'bench')")
@TRACKING
def bench(size, device, amp, channels_last, compile_, compile_mode, arch, batch, steps, matrix, log_, tracking_uri):
    """Time the training step and the evaluation pass; print images/s, GFLOP/s and peak memory."""
    from bench import timing as b

    mode = compile_mode if compile_ else "off"
    try:
        if matrix:
            results = b.matrix(size, device, batch, steps, mode)
        else:
            results = [b.bench(size, device, amp, channels_last, mode, batch, steps, arch=arch)]
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    click.echo(b.table(results).to_string(index=False))
    click.echo(f"machine: {b.machine(results[0].device)}")
    if log_:
        click.echo(f"logged as MLflow run {b.log_results(results, tracking_uri)}")


if __name__ == "__main__":
    cli()
