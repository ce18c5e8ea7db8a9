"""The committed reports regenerate byte-identically from the committed studies, as a fresh clone
anywhere on disk would run them: each report names the command that made it, and running that
command in a copy of the studies at another place must rewrite every file identically."""

import filecmp
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from study import committed
from tests.conftest import ROOT, WORKING_COPY

SHARED = ROOT.parent / "shared"
REPORTS = sorted(p.parent for p in (ROOT / "report").rglob("README.md"))


def _command(readme: Path) -> list[str]:
    m = re.search(r"Generated from \S+ by `python run_study\.py ([^`]+)`", readme.read_text())
    assert m, f"{readme} does not name the command that generated it"
    return shlex.split(m.group(1))


def _files(folder: Path) -> set[str]:
    """The report's own files: a report nested inside it (report/factorial/) is its own case."""
    nested = [r for r in REPORTS if r != folder and r.is_relative_to(folder)]
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.is_file() and not any(p.is_relative_to(r) for r in nested)}  # fmt: skip


@pytest.mark.slow(45)
@pytest.mark.parametrize("report", REPORTS, ids=[str(p.relative_to(ROOT)) for p in REPORTS])
def test_a_committed_report_regenerates_byte_identically_elsewhere(report, tmp_path):
    args = _command(report / "README.md")
    if any("../shared" in a for a in args) and not (SHARED / "data").exists():
        pytest.skip("the committed study's data (../shared/data) is not beside this checkout")
    assert "--no-log" in args or args[0] == "probe-init", "a committed report must not write into the committed store"
    clone = tmp_path / "somewhere" / "clone"
    # what the report is made from: a study's MLflow store, or the initialisation probe's CSV
    source = args[args.index("--tracking-uri") + 1] if "--tracking-uri" in args else args[args.index("--out") + 1]
    store = Path(re.sub(r"^sqlite:///", "", source))
    assert not store.is_absolute(), "a committed report must name its store relative to the checkout"
    # the stores it reads: its own, and those a long study's Table 2 shows beside it (--beside URI EXPERIMENT)
    stores = {Path(a[len("sqlite:///"):]).parent for a in args if a.startswith("sqlite:///")} | {store.parent}
    for other in stores:
        assert not other.is_absolute(), "a committed report must name its stores relative to the checkout"
        # what git holds: the compressed MLflow store, not the working copy a command unpacks from it
        shutil.copytree(ROOT / other, clone / other, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*WORKING_COPY))
    (clone.parent / "shared").symlink_to(SHARED)  # ../shared, as beside any checkout
    before = {p: p.stat().st_mtime_ns for d in stores for p in (clone / d).rglob("*") if p.is_file()}
    out = subprocess.run([sys.executable, str(ROOT / "run_study.py"), *args], cwd=clone,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    made = clone / args[args.index("--report" if args[0] == "probe-init" else "--out") + 1]
    made_files = {str(p.relative_to(made)) for p in made.rglob("*") if p.is_file()}
    assert made_files == _files(report)
    _, mismatch, errors = filecmp.cmpfiles(report, made, sorted(_files(report)), shallow=False)
    assert not mismatch and not errors, f"differ from the committed report: {mismatch + errors}"
    after = {p: p.stat().st_mtime_ns for d in stores for p in (clone / d).rglob("*")
             if p.is_file() and p.name not in WORKING_COPY}  # fmt: skip
    assert after == before, "regenerating the report changed the committed study's files"
    if source.startswith("sqlite:///"):  # the store was unpacked from what git holds, as in a fresh clone
        assert committed.packed(clone / store).is_file() and (clone / store).is_file()


def test_the_readme_quotes_every_committed_reports_findings_verbatim():
    sys.path.insert(0, str(ROOT / "scripts"))
    from quote_findings import QUOTE, quoted

    readme = (ROOT / "README.md").read_text()
    named = {ROOT / m.group(1) for m in QUOTE.finditer(readme)}
    assert named == {r / "README.md" for r in REPORTS}, "quote every committed report, and only those"
    assert quoted(readme) == readme, "README.md's findings differ from the reports': run scripts/quote_findings.py"
