"""The command line (``run-study``, or ``python run_study.py``): it parses, checks what a user can get
wrong before anything is written, and dispatches to study/, experiments/, analysis/ and bench/, where
tests and Optuna call the work directly. The top floor of the house: it alone imports every layer.

Errors a user can cause end in one line on stderr and exit status 2; Ctrl-C, SIGTERM and SIGHUP end a
command the same recorded way, with 128 + the signal's number.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import click

from experiments.presets import PRESETS
from experiments.studies import STUDIES
from study import signals
from study.config import ConfigError


def _fail(message: str) -> None:
    """A user error: one line on stderr and exit status 2, before anything is written."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _version() -> str:
    """The installed distribution's version, or pyproject.toml's where the checkout runs uninstalled
    (as on the GPU machine, whose check runs python run_study.py from the carried tree)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("realnvp-study")
    except importlib.metadata.PackageNotFoundError:
        import re  # not tomllib: Python 3.10 is supported

        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
        version = re.search(r'(?m)^version = "([^"]+)"', text).group(1)
        return f"{version} (uninstalled checkout)"


def _print_version(ctx: click.Context, _param, value: bool) -> None:
    # looked up only when asked: the distribution lookup costs ~50 ms, on every command if done at import
    if value and not ctx.resilient_parsing:
        click.echo(f"run-study, version {_version()}")
        ctx.exit()


def _interrupted(e: BaseException, again: str) -> None:
    click.echo(f"interrupted by {signals.name(e)}: {again}", err=True)
    sys.exit(signals.exit_code(e))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # not the source line Python prints by default


def _config(preset: str, data: str | None, overrides: tuple[str, ...], variant: str | None = None):
    """The preset, with --data and --set applied, then the overrides of an ablation variant (which a
    --set may not contradict: a run's variant tag never disagrees with its config)."""
    from experiments.presets import preset_config
    from study.config import apply_values

    return _or_fail(lambda: apply_values(preset_config(preset), _requested(data, overrides, variant)))


def _requested(data: str | None, overrides: tuple[str, ...], variant: str | None) -> dict[str, object]:
    """The config values a command line sets explicitly (--data, --set, a variant's overrides)."""
    from experiments.studies import find_variant
    from study.config import parse_overrides
    from study.data import parse_data_spec

    values: dict[str, object] = dict(parse_data_spec(data)) if data else {}
    values.update(parse_overrides(overrides))
    if variant is not None:
        v = find_variant(variant)
        clash = sorted(k for k in parse_overrides(overrides) if k in v.overrides)
        if clash:
            raise ConfigError(f"--set {clash[0]} contradicts variant {variant!r}, which sets it: drop one of them")
        values.update(v.overrides)
    return values


def _described(preset: str, cfg) -> str:
    """A plain run's MLflow description (a variant's is its rationale): what it trains, in one paragraph."""
    from study.config import flatten

    stab = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in flatten(cfg).items() if k.startswith("stabilizers."))
    m, t = cfg.model, cfg.train
    return (f"Real NVP at preset {preset}: {m.num_scales} scales x {m.mid_channels} maps x {m.num_blocks} residual "
            f"blocks on {cfg.data.source} data, batch {t.batch_size}, {t.epochs} epochs at learning rate {t.lr:g}, "
            f"seed {t.seed}. Stabilizers: {stab}.")  # fmt: skip


def _or_fail(make):
    """``make()``, with an unknown name or a bad config or data value as a one-line exit 2."""
    from study.data import DataError

    try:
        return make()
    except KeyError as e:
        _fail(str(e.args[0]))
    except (ConfigError, DataError) as e:
        _fail(str(e))


def _check_store(tracking_uri: str | None, must_exist: bool = False) -> str:
    from study.tracking import check_tracking_uri

    try:
        return check_tracking_uri(tracking_uri, must_exist)
    except ConfigError as e:
        _fail(str(e))


def _open_store(tracking_uri: str | None, must_exist: bool = False):
    """The command's one tracking store (study.store.Store), checked first: a bad one is one line, exit 2."""
    from study.store import Store

    return Store(_check_store(tracking_uri, must_exist))


def _check_storage(storage: str | None) -> None:
    from study.tracking import check_database_url

    if storage:
        try:
            check_database_url(storage, "--storage")
        except ConfigError as e:
            _fail(str(e))


def _invocation(command: str) -> str:
    """This command's arguments as typed, for a report's header, whichever entry point ran it (python
    run_study.py, the run-study console script, python -m); called from Python (CliRunner, a test), the
    command rebuilt from the options given: never a bare command name that would write elsewhere."""
    import shlex

    argv = sys.argv[1:]
    if argv[:1] == [command]:
        return shlex.join(argv)
    ctx = click.get_current_context()
    given = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or value is None or value == param.default or value == ():
            continue
        flag = param.opts[0]
        if param.is_flag:
            given.append(flag if value else param.secondary_opts[0])
        else:
            for v in value if param.multiple else (value,):
                given += [flag, *(map(str, v) if isinstance(v, tuple) else (str(v),))]
    return shlex.join([command, *given])


def _stage(command: str):
    """Stage lines on stderr for a long command that has no bar: 'report: figures (12 s)'."""
    import time

    start = time.perf_counter()
    return lambda line: click.echo(f"{command}: {line} ({time.perf_counter() - start:.0f} s)", err=True)


def _seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: a count N (seeds 0..N-1) or a comma-separated list."""
    try:
        if "," in text:
            seeds = tuple(int(x) for x in text.split(",") if x.strip())
        else:
            seeds = tuple(range(int(text)))
    except ValueError:
        _fail(f"--seeds {text!r}: give a count (3) or a comma-separated list (0,1,2)")
    if not seeds:
        _fail(f"--seeds {text!r}: give at least one seed")
    return seeds


PRESET = click.option("--preset", type=click.Choice(list(PRESETS)), default="demo", show_default=True)
DATA = click.option("--data", default=None, help="patches | npz:DIR | cifar10:DIR (default: the preset's)")
SET = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="override a config value")
TRACKING = click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI", show_envvar=True,
                        help="MLflow store (default: sqlite:///mlflow.db here)")  # fmt: skip
DEVICE = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
CHECKPOINT_DIR = click.option("--checkpoint-dir", default="checkpoints", show_default=True, type=click.Path())
STORAGE = click.option("--storage", default=None, envvar="OPTUNA_STORAGE", show_envvar=True,  # Optuna's own CLI's
                       help="Optuna storage (default: sqlite:///optuna.db here)")  # fmt: skip
WORKERS = click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                       help="local worker processes")  # fmt: skip
EPOCHS = click.option("--epochs", type=click.IntRange(min=1), default=None, help="epochs per run (train.epochs)")


EXAMPLES = {  # each command's help ends with these; a test parses every one
    "summary": (
        "summary --preset paper",
        "summary --preset cifar-study --data npz:../shared/data/cifar10-slices",
    ),
    "train": (
        "train --preset demo --epochs 2",
        "train --preset demo --variant no-gradclip --seed 1",
        "train --preset demo --resume RUN_ID",
    ),
    "ablation": (
        "ablation --list",
        "ablation stabilizers --preset demo --seeds 2 --workers 2",
        "ablation headline --preset cifar-study --data npz:../shared/data/cifar10-slices --seeds 5 --dry-run",
    ),
    "lr-search": (
        "lr-search --preset demo --trials 4 --epochs 2 --workers 2",
        "lr-search --preset demo --variant seed-report --sampler grid --range 1e-4 1e-2",
    ),
    "report": (
        "report --experiment stabilizers-demo --out demo-report",
        "report --tracking-uri sqlite:///studies/headline/mlflow.db --out /tmp/headline --no-log",
    ),
    "probe-init": (
        "probe-init --seeds 2 --widths 8,16 --blocks 2 --out probe.csv --report probe-report",
    ),
    "evaluate": (
        "evaluate --run RUN_ID --split test",
        "evaluate --run RUN_ID --split val --mode train",
    ),
    "ui": (
        "ui",
        "ui --tracking-uri sqlite:///studies/headline/mlflow.db --port 5001",
    ),
    "dashboard": (
        "dashboard",
        "dashboard --storage sqlite:///studies/headline/optuna.db --port 8081",
    ),
    "sample": (
        "sample --run RUN_ID --temperature 0.7 -n 36",
    ),
    "bench": (
        "bench --preset cifar-study --device cpu --batch 64",
        "bench --preset rung-32x4 --cell 1 --data npz:../shared/data/cifar10-slices",
        "bench --preset paper --batch 16 --steps 6 --matrix",
    ),
}


def _examples(command: str) -> str:
    """A command's help epilog: its usage examples, one per line (\b keeps click from rewrapping them)."""
    return "\b\nExamples:\n" + "\n".join(f"  python run_study.py {c}" for c in EXAMPLES[command])


def _grace(what: str):
    return click.option("--grace", type=click.IntRange(min=1), default=30, show_default=True,
                        help=f"seconds without heartbeat before a {what} is retried")  # fmt: skip


class _Cli(click.Group):
    """A click group whose usage errors are one line too ("error: Invalid value for '--grace' ...")."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            _fail(e.format_message())
        except click.exceptions.Abort as e:  # an interruption outside a command's own handler
            sys.exit(signals.exit_code(e.__cause__) if isinstance(e.__cause__, KeyboardInterrupt) else 1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")  # fmt: skip
def cli():
    """Real NVP on CIFAR-10: which of the seed report's stabilizers does it need?"""
    signals.install()
    warnings.formatwarning = _one_line_warning


@cli.command(epilog=_examples("summary"))
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


@cli.command(epilog=_examples("train"))
@PRESET
@DATA
@click.option("--seed", type=int, default=None, help="the run's seed (train.seed)")
@EPOCHS
@SET
@click.option("--experiment", default="realnvp", show_default=True, help="MLflow experiment name")
@TRACKING
@DEVICE
@click.option("--variant", default=None, help="an ablation variant: its overrides are applied and its name recorded")
@CHECKPOINT_DIR
@click.option("--resume", "resume_run_id", default=None, help="continue this MLflow run from its last checkpoint")
@click.option("--fresh", is_flag=True, help="start a new run even if one with the same identity exists")
def train(preset, data, seed, epochs, overrides, experiment, tracking_uri, device, variant, checkpoint_dir,
          resume_run_id, fresh):  # fmt: skip
    """Train one Real NVP run, logged to MLflow; re-running the same command resumes it."""
    extra = tuple(overrides) + ((f"train.seed={seed}",) if seed is not None else ()) + (
        (f"train.epochs={epochs}",) if epochs is not None else ())  # fmt: skip
    cfg = _config(preset, data, extra, variant)
    from experiments.studies import find_variant
    from study.data import DataError
    from study.run.engine import train as train_run
    from study.run.spec import RunSpec

    spec = RunSpec(cfg=cfg, preset=preset, variant=variant or "default", experiment=experiment,
                   tracking_uri=tracking_uri, device=device, checkpoint_root=Path(checkpoint_dir), fresh=fresh,
                   echo=click.echo, description=find_variant(variant).rationale if variant else _described(preset, cfg),
                   source="run_study.py train",
                   requested=_or_fail(lambda: _requested(data, extra, variant)) if resume_run_id else {})  # fmt: skip
    try:
        train_run(spec, resume_run_id=resume_run_id)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    except KeyboardInterrupt as e:
        _interrupted(e, "run the same command again (or --resume RUN_ID) to continue")


@cli.command(epilog=_examples("ablation"))
@click.argument("study_name", required=False, metavar="STUDY", type=click.Choice(list(STUDIES)))
@click.option("--list", "list_", is_flag=True, help="list the studies and exit")
@click.option("--dry-run", is_flag=True, help="print the plan (families, variants x seeds) and touch nothing")
@PRESET
@DATA
@click.option("--seeds", default="3", show_default=True, metavar="N|LIST",
              help="a count (seeds 0..N-1) or a list: 0,1,2")  # fmt: skip
@click.option("--only", multiple=True, metavar="VARIANT", help="run only these variants (repeatable)")
@EPOCHS
@SET
@WORKERS
@STORAGE
@click.option("--experiment", default=None, help="MLflow experiment (default: STUDY-PRESET)")
@TRACKING
@DEVICE
@CHECKPOINT_DIR
@_grace("cell")
def ablation(study_name, list_, dry_run, preset, data, seeds, only, epochs, overrides, workers, storage, experiment,
             tracking_uri, device, checkpoint_dir, grace):  # fmt: skip
    """Run an ablation study: every (variant, seed) cell, resumable, over workers (Optuna + MLflow)."""
    from experiments.studies import STUDY_DESCRIPTIONS

    if list_ or not study_name:
        for name, variants in STUDIES.items():
            click.echo(f"{name}: {len(variants)} variants; {STUDY_DESCRIPTIONS[name]}")
            for v in variants:
                click.echo(f"  {v.name:<22} {v.rationale}")
        return
    from experiments.studies import describe, plan_study
    from study.sweep import ablation as ab

    base = _config(preset, data, tuple(overrides) + ((f"train.epochs={epochs}",) if epochs is not None else ()))
    try:
        plan = plan_study(study_name, preset, base, _seeds(seeds), only, device, experiment=experiment,
                          storage=storage, tracking_uri=tracking_uri, checkpoint_root=Path(checkpoint_dir),
                          grace=grace, heartbeat=max(1, grace // 3))  # fmt: skip
    except ConfigError as e:
        _fail(str(e))
    _check_storage(storage)  # before the plan is printed: a bad store is the one line the user sees
    _check_store(tracking_uri)
    click.echo(describe(plan))
    if dry_run:
        _print_rung_costs(study_name, plan, workers)
        return
    try:
        ab.run(plan, workers=workers, echo=click.echo)
    except ConfigError as e:
        _fail(str(e))
    except KeyboardInterrupt as e:
        _interrupted(e, "run the same command again to continue where it stopped")


def _print_rung_costs(study_name: str, plan, workers: int) -> None:
    """A ladder's dry run: each rung's training step timed here (a few steps, on the threads one of
    ``workers`` gets), then each rung's cost at that speed (experiments.ladder.cost)."""
    import os

    import pandas as pd
    import torch

    from bench.timing import bench
    from experiments.ladder import cost
    from experiments.studies import RUNGS
    from study.data import DataError, load_splits

    if study_name not in RUNGS:
        return
    try:
        train_images = len(load_splits(plan.base.data).train)
    except DataError as e:
        _fail(str(e))
    threads = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    device = "cpu" if plan.device == "auto" and not torch.cuda.is_available() else plan.device
    click.echo(f"\ntiming each rung's training step on {device} ({threads} thread(s) a worker, batch "
               f"{plan.base.train.batch_size}; a few seconds a rung)")
    speed = {name: bench(f"rung-{name}", device, batch=plan.base.train.batch_size, steps=3, warmup=1).train_ips
             for name, _, _ in RUNGS[study_name]}  # fmt: skip
    click.echo(pd.DataFrame(cost(plan, speed, workers, train_images)).to_string(index=False))


@cli.command("lr-search", epilog=_examples("lr-search"))
@PRESET
@DATA
@click.option("--variant", default=None, help="an ablation variant whose switches the search uses (default: preset)")
@click.option("--trials", type=click.IntRange(min=1), default=8, show_default=True,
              help="finished trials the study should hold")  # fmt: skip
@EPOCHS
@SET
@STORAGE
@WORKERS
@click.option("--sampler", type=click.Choice(["tpe", "grid", "gp"]), default="tpe", show_default=True)
@click.option("--pruner", type=click.Choice(["median", "hyperband", "none"]), default="median", show_default=True)
@click.option("--range", "lr_range", nargs=2, type=float, default=(1e-4, 1e-2), show_default=True, metavar="LOW HIGH",
              help="learning-rate range, searched log-uniformly")  # fmt: skip
@click.option("--search-warmup", is_flag=True, help="also search the warm-up length (0-200 steps)")
@click.option("--experiment", default=None, help="MLflow experiment (default: lr-search-PRESET)")
@TRACKING
@DEVICE
@CHECKPOINT_DIR
@_grace("trial")
def lr_search(preset, data, variant, trials, epochs, overrides, storage, workers, sampler, pruner, lr_range,
              search_warmup, experiment, tracking_uri, device, checkpoint_dir, grace):  # fmt: skip
    """Search the learning rate with Optuna (objective: validation bits/dim), each trial an MLflow run."""
    import pandas as pd

    from experiments.studies import plan_search
    from study.sweep import lrsearch

    base = _config(preset, data, tuple(overrides) + ((f"train.epochs={epochs}",) if epochs is not None else ()))
    try:
        search = plan_search(base, preset, variant, trials, lr_range[0], lr_range[1], sampler, pruner,
                             storage=storage, tracking_uri=tracking_uri, experiment=experiment,
                             checkpoint_root=Path(checkpoint_dir), device=device, search_warmup=search_warmup,
                             grace=grace, heartbeat=max(1, grace // 3))  # fmt: skip
    except ConfigError as e:
        _fail(str(e))
    _check_storage(storage)
    _check_store(tracking_uri)
    try:
        frame, best = lrsearch.run(search, workers, echo=click.echo)
    except ConfigError as e:
        _fail(str(e))
    except KeyboardInterrupt as e:
        _interrupted(e, "run the same command again to continue the search")
    click.echo(pd.DataFrame(frame).drop(columns=["mlflow_run_id", "duplicate"]).to_string(index=False))
    pruned = int((frame["state"] == "PRUNED").sum())
    if best is None:
        click.echo(f"no trial completed ({pruned} pruned)")
    else:
        click.echo(f"best: lr {best['lr']:.4g} -> validation {best['value']:.4f} bits/dim (trial {int(best['trial'])}, "
                   f"{len(frame)} trials, {pruned} pruned); use it with --set train.lr={best['lr']:.4g}")  # fmt: skip


@cli.command(epilog=_examples("report"))
@click.option("--experiment", default=None, help="the study's MLflow experiment (default: the store's only study)")
@TRACKING
@click.option("--out", default="report", show_default=True, type=click.Path(), help="folder for README.md and figures/")
@click.option("--window", type=click.IntRange(min=1), default=40, show_default=True,
              help="last-N-epoch window of the validation statistic (the seed report's: 40)")  # fmt: skip
@click.option("--data", default=None, help="where the diagnosis and audit find the runs' data, if not where they were")
@click.option("--audit/--no-audit", default=True, show_default=True, help="run the diagnosis and accounting audit")
@click.option("--lr-experiment", default=None, help="MLflow experiment of the lr searches (default: lr-search-PRESET)")
@click.option("--log/--no-log", default=True, show_default=True,
              help="also log the report to the study's parent run (--no-log leaves the store untouched, "
                   "as for a committed study)")  # fmt: skip
@click.option("--beside", multiple=True, nargs=2, metavar="URI EXPERIMENT",
              help="a short study's store and experiment whose test bits/dim a long study's Table 2 shows beside "
                   "its own (repeatable)")  # fmt: skip
def report(experiment, tracking_uri, out, window, data, audit, lr_experiment, log, beside):
    """Regenerate the report (tables, figures, diagnosis, audit) from a study's MLflow runs."""
    from analysis.collect import NoRunsError, only_study
    from analysis.report import generate_report
    from analysis.transfer import PaperCheckError
    from study.data import DataError, parse_data_spec

    store = _open_store(tracking_uri, must_exist=True)
    try:
        experiment = experiment or only_study(store)
        override = {k.split(".", 1)[1]: v for k, v in parse_data_spec(data).items()} if data else None
        args = _invocation("report")
        others = tuple((_open_store(uri_b, must_exist=True), name) for uri_b, name in beside)
        path = generate_report(store, experiment, Path(out), window, override, audit,
                               command=f"python run_study.py {args}", lr_experiment=lr_experiment,
                               log_to_parent=log, beside=others, say=_stage("report"))  # fmt: skip
    except (NoRunsError, DataError, PaperCheckError) as e:
        _fail(str(e))
    click.echo(f"wrote {path}")


@cli.command("probe-init", epilog=_examples("probe-init"))
@DATA
@click.option("--out", default="studies/init-probe/probe.csv", show_default=True, type=click.Path(dir_okay=False),
              help="CSV the probe appends to (an interrupted probe continues)")  # fmt: skip
@click.option("--report", "report_dir", default="report/init-probe", show_default=True,
              type=click.Path(file_okay=False), help="folder of the probe's README.md")  # fmt: skip
@click.option("--seeds", default="10", show_default=True, metavar="N|LIST", help="seeds per recipe and size")
@click.option("--widths", default="8,16,32,64", show_default=True, help="feature maps (model.mid_channels)")
@click.option("--blocks", default="2,8", show_default=True, help="residual blocks (model.num_blocks)")
@click.option("--report-only", is_flag=True, help="only write the report from the CSV")
def probe_init(data, out, report_dir, seeds, widths, blocks, report_only):
    """Is step 0 finite? One forward pass of each recipe's initial model per size and seed, on real
    training images, at any size (the paper's too) on a CPU; then report/init-probe/README.md."""
    from analysis.init_probe import write_report
    from experiments.init_probe import cells, run_probe
    from study.data import DataError, load_splits

    try:
        sizes = [tuple(int(x) for x in v.split(",")) for v in (widths, blocks)]
    except ValueError:
        _fail(f"--widths {widths!r} / --blocks {blocks!r}: give comma-separated integers (8,16,32,64)")
    if not report_only:
        cfg = _config("cifar-study", data or "npz:../shared/data/cifar10-slices", ())
        try:
            images = load_splits(cfg.data).train
        except DataError as e:
            _fail(str(e))
        run_probe(cfg, images, Path(out), cells(sizes[0], sizes[1], seeds=_seeds(seeds)), echo=click.echo)
    if not Path(out).exists():
        _fail(f"{out} does not exist: run `run_study.py probe-init` without --report-only first")
    import shlex

    args = shlex.join(a for a in shlex.split(_invocation("probe-init")) if a != "--report-only")
    path = write_report(Path(out), Path(report_dir), f"python run_study.py {args} --report-only".replace("  ", " "))
    click.echo(f"wrote {path}")


@cli.command(epilog=_examples("evaluate"))
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

    store = _open_store(tracking_uri, must_exist=True)
    try:
        r = evaluate_run(store, run_id, data, split, mode, bn_recalibrate, batch, log)
    except (ValueError, DataError) as e:
        _fail(str(e))
    recal = f", batch norm re-estimated from {r.recalibrate} training batches" if r.recalibrate else ""
    click.echo(f"run {run_id}: {r.split} split of {r.data} data, {r.mode} mode{recal}: {r.bpd:.4f} +- {r.se:.4f} "
               f"bits/dim (standard error over {r.n} images)" + (f"; logged as {r.metric}" if log else ""))


@cli.command(epilog=_examples("ui"))
@TRACKING
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
def ui(tracking_uri, port):
    """Serve the MLflow UI for the study's store on 127.0.0.1; Ctrl-C, SIGTERM or SIGHUP stop it."""
    from study_cli.ui import serve_ui

    store = _open_store(tracking_uri, must_exist=True)
    try:
        serve_ui(store, port, echo=click.echo)
    except ValueError as e:
        _fail(str(e))
    except KeyboardInterrupt as e:  # the server and its workers are stopped
        sys.exit(signals.exit_code(e))


@cli.command(epilog=_examples("dashboard"))
@STORAGE
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
def dashboard(storage, port):
    """Serve optuna-dashboard, Optuna's viewer, for the study's Optuna storage on 127.0.0.1: each sweep's
    trials, states, parameters and values. Ctrl-C, SIGTERM or SIGHUP stop it."""
    from study.sweep.driver import default_storage
    from study_cli.dashboard import serve_dashboard

    storage = storage or default_storage()
    _check_storage(storage)
    try:
        serve_dashboard(storage, port, echo=click.echo)
    except ConfigError as e:
        _fail(str(e))
    except KeyboardInterrupt as e:  # optuna-dashboard and its workers are stopped
        sys.exit(signals.exit_code(e))


@cli.command(epilog=_examples("sample"))
@click.option("--run", "run_id", required=True, help="MLflow run id whose checkpoint to sample from")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("-n", "--num", type=click.IntRange(min=1), default=64, show_default=True, help="number of samples")
@click.option("--out", default=None, type=click.Path(), help="PNG to write (default: samples-RUN-tT.png)")
@TRACKING
def sample(run_id, temperature, num, out, tracking_uri):
    """Write a grid of samples from a run's last checkpoint."""
    from study.run.state import sample_from_run

    store = _open_store(tracking_uri, must_exist=True)
    try:
        path = sample_from_run(store, run_id, temperature, num, out)
    except ValueError as e:
        _fail(str(e))
    click.echo(f"wrote {path}")


def _bench_sizes() -> list[str]:
    from experiments.presets import model_sizes

    return list(model_sizes())


@cli.command(epilog=_examples("bench"))
@click.option("--preset", type=click.Choice(_bench_sizes()), default="demo", show_default=True,
              help="the model size to time: a preset's, or bench's extra 'small' and 'rung-32x4'")  # fmt: skip
@DEVICE
@click.option("--amp", type=click.Choice(["off", "fp16", "bf16"]), default="off", show_default=True)
@click.option("--channels-last", is_flag=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile log_prob (a cold compile takes ~1 min)")
@click.option("--compile-mode", type=click.Choice(["default", "reduce-overhead", "max-autotune"]), default="default",
              show_default=True, help="with --compile; reduce-overhead adds CUDA graphs on a GPU")  # fmt: skip
@click.option("--model", "arch", type=click.Choice(["ours", "usual-repro"]), default="ours", show_default=True,
              help="usual-repro: the usual PyTorch reproduction's s/t net shape (the targets' baseline)")  # fmt: skip
@click.option("--batch", type=click.IntRange(min=2), default=16, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=5, show_default=True,
              help="timed steps after 2 warm-up steps")  # fmt: skip
@click.option("--matrix", is_flag=True, help="usual-repro fp32, then ours in each amp x channels_last, in one table")
@click.option("--log", "log_", is_flag=True, help="record the table as an MLflow run (experiment 'bench')")
@TRACKING
@click.option("--cell", "cell_epochs", type=click.IntRange(min=1), default=None, metavar="EPOCHS",
              help="instead, time one whole cell of the cifar-study preset at this size for EPOCHS epochs in a "
                   "fresh process, split into start-up, step parts, data, validation, test, checkpoints, logging")
@click.option("--data", default=None, help="with --cell: the cell's data (default: the preset's)")
def bench(preset, device, amp, channels_last, compile_, compile_mode, arch, batch, steps, matrix, log_, tracking_uri,
          cell_epochs, data):  # fmt: skip
    """Time the training step and the evaluation pass; print images/s, GFLOP/s, the fraction of the
    machine's matmul peak and peak memory (or, with --cell, where one whole cell's time goes)."""
    from bench import timing as b

    if cell_epochs is not None:
        from bench.cell import main as cell

        cell_preset = preset if preset in PRESETS else "cifar-study"  # a bench-only size: cifar-study's data
        try:
            cell(["--preset", cell_preset, "--size", preset, "--epochs", str(cell_epochs),
                  *(["--data", data] if data else [])])  # fmt: skip
        except RuntimeError as e:
            _fail(str(e))
        return
    store = _open_store(tracking_uri) if log_ else None
    mode = compile_mode if compile_ else "off"
    try:
        if matrix:
            results = b.matrix(preset, device, batch, steps, mode)
        else:
            results = [b.bench(preset, device, amp, channels_last, mode, batch, steps, arch=arch)]
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    click.echo(b.table(results).to_string(index=False))
    click.echo(f"machine: {b.machine(results[0].device)}")
    if log_:
        click.echo(f"logged as MLflow run {b.log_results(results, store)}")


def main() -> None:
    cli(prog_name="run-study")
