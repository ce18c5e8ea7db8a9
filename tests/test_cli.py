import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

import run_study
from tests.conftest import ROOT, has_dist, needs


def test_summary_of_the_paper_model_needs_no_cifar10_files(tmp_path, monkeypatch):
    """The README's `summary --preset paper` on a machine without CIFAR-10: the model (18.52 M parameters,
    12.19 GFLOP per image, as the README states), and the data named as absent."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(run_study.cli, ["summary", "--preset", "paper"])
    assert result.exit_code == 0, result.output
    assert "parameters  18.519 M" in result.stdout and "forward     12.186 GFLOP" in result.stdout
    assert "no CIFAR-10 under data/cifar10: the model alone" in result.stdout


def test_summary_describes_the_demo_model():
    result = CliRunner().invoke(run_study.cli, ["summary", "--preset", "demo"])
    assert result.exit_code == 0, result.output
    assert "patches: 1951 32x32 patches" in result.stdout
    assert "GFLOP per image" in result.stdout and "scale_fn=tanh" in result.stdout


def test_bad_input_is_one_line_and_exit_2():
    cases = [
        (["summary", "--set", "model.width=3"], "unknown config key 'model.width'"),
        (["summary", "--preset", "huge"], "'huge' is not one of"),
        (["summary", "--data", "npz:/nonexistent"], "is not a folder"),
        (["summary", "--set", "model.num_scales=6"], "image_size 32 must be divisible"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(run_study.cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, run_study\ntry:\n    run_study.cli(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


def test_version_from_an_installed_package_or_a_bare_checkout(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "run_study.py"), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("run-study, version ")
    # a checkout nobody installed (the GPU machine runs the carried tree): pyproject.toml's version
    code = ("import importlib.metadata as m\ndef missing(name): raise m.PackageNotFoundError(name)\n"
            "m.version = missing\nimport run_study\nrun_study.cli(['--version'])")  # fmt: skip
    bare = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    version = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
                   if line.startswith("version = "))  # fmt: skip
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout.strip() == f"run-study, version {version} (uninstalled checkout)"


@needs(("the project installed: pip install -e .", has_dist("realnvp-study")))
def test_console_script():
    import shutil

    script = Path(sys.executable).parent / "run-study"  # pip install . (or -e .) puts it beside the interpreter
    assert script.exists() or shutil.which("run-study"), "pip install . should provide the run-study command"
    out = subprocess.run([str(script) if script.exists() else "run-study", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # the same command line as run_study.py: its every command, under the script's own name
    assert out.stdout.startswith("Usage: run-study ")
    listed = {line.split()[0] for line in out.stdout.split("Commands:", 1)[1].splitlines() if line.strip()}
    assert listed == set(run_study.cli.commands)


def test_every_help_example_parses_and_names_what_exists():
    """The examples each command's --help ends with are real: their options parse (types, choices) and
    the variants and studies they name exist."""
    import shlex

    from experiments.studies import STUDIES, find_variant
    from study_cli.commands import EXAMPLES

    assert set(EXAMPLES) == set(run_study.cli.commands), "every command shows examples, and only commands"
    for name, examples in EXAMPLES.items():
        command = run_study.cli.commands[name]
        assert "Examples:" in command.epilog
        for example in examples:
            args = shlex.split(example)
            assert args[0] == name, example
            ctx = command.make_context(name, args[1:])  # raises click.UsageError on a bad option or value
            if ctx.params.get("variant"):
                find_variant(ctx.params["variant"])
            if ctx.params.get("study_name"):
                assert ctx.params["study_name"] in STUDIES


def test_stores_come_from_the_environment_as_click_shows(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent-folder/mlflow.db")
    result = CliRunner().invoke(run_study.cli, ["ablation", "stabilizers", "--dry-run"])
    assert result.exit_code == 2 and "nonexistent-folder" in result.stderr, result.output
    assert result.stdout == "", "the store is checked before the plan is printed"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("OPTUNA_STORAGE", "foo://bar")
    result = CliRunner().invoke(run_study.cli, ["lr-search", "--trials", "1"])
    assert result.exit_code == 2 and "--storage 'foo://bar'" in result.stderr, result.output
    help_text = CliRunner().invoke(run_study.cli, ["ablation", "--help"]).stdout
    assert "env var: MLFLOW_TRACKING_URI" in help_text and "env var: OPTUNA_STORAGE" in help_text
