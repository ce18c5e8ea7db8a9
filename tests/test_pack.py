"""A packed study is found from any copy: artifact locations relocate, sample grids and the checkpoints
the report needs stay (small), and the report regenerates identically from a copy elsewhere on disk."""

from __future__ import annotations

import lzma
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from experiments.presets import preset_config
from experiments.studies import plan_study
from study.config import ConfigError, apply_values
from study.store import Store
from study.sweep import ablation as ab
from tests.conftest import COMMITTED_STUDIES, ROOT, TINY_RUN, WORKING_COPY, copy_committed_study


def absolute_paths(db: Path) -> list[tuple[str, str, str]]:
    """(table, column, value) for each text value in a SQLite file that names a place on the machine
    that wrote it: an absolute path, a file: URI, or one of the usual home/work/temp prefixes inside."""
    found = []
    with sqlite3.connect(db) as con:
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for column in [c[1] for c in con.execute(f"PRAGMA table_info('{table}')")]:
                for (value,) in con.execute(f'SELECT "{column}" FROM "{table}" WHERE typeof("{column}") = \'text\''):
                    if value.startswith(("/", "file:")) or any(p in value for p in ("/work/", "/home/", "/tmp/")):
                        found.append((table, column, value))
    return found


def test_committed_stores_hold_no_path_of_the_machine_that_made_them(tmp_path):
    assert len(COMMITTED_STUDIES) >= 4
    dbs = [copy_committed_study(s, tmp_path / s.name) for s in COMMITTED_STUDIES]  # each MLflow store, unpacked
    dbs += sorted((ROOT / "studies").glob("*/optuna.db"))
    assert {db: absolute_paths(db)[:3] for db in dbs if absolute_paths(db)} == {}


def test_a_committed_store_is_its_xz_unpacked_once_and_again_when_the_xz_changes(tmp_path):
    """study.committed: the .xz is deterministic, unpacks to the very bytes packed, leaves the working
    copy alone while the .xz is unchanged, and replaces it when the .xz changes (a pull)."""
    from study import committed

    db = tmp_path / "mlflow.db"
    shutil.copy(copy_committed_study(COMMITTED_STUDIES[0], tmp_path / "c"), db)  # a real store
    original = db.read_bytes()
    xz = committed.pack(db)
    first = xz.read_bytes()
    assert committed.pack(db).read_bytes() == first  # the same store, the same bytes
    assert not committed.unpack(db)  # packing made db its working copy
    db.unlink()
    assert committed.unpack(db) and db.read_bytes() == original  # a fresh clone: unpacked on first use
    with sqlite3.connect(db) as con:  # a working copy changed here (the UI may migrate it) stays
        con.execute("CREATE TABLE scratch (x)")
    changed = db.read_bytes()
    assert not committed.unpack(db) and db.read_bytes() == changed
    xz.write_bytes(lzma.compress(b"another store"))  # a pull brings another .xz: it wins
    assert committed.unpack(db) and db.read_bytes() == b"another store"
    assert committed.unpack_for(f"sqlite:///{db}") is False  # and once only
    xz.write_bytes(first[: len(first) // 2])  # a broken .xz: one line naming it and the fix, the copy kept
    with pytest.raises(ConfigError, match=r"mlflow.db.xz: not a whole xz file .*git checkout --"):
        committed.unpack(db)
    assert db.read_bytes() == b"another store"
    assert committed.unpack_for(f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}") is False  # no .xz: nothing made
    assert not (tmp_path / "none").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["mlflow.db", "mlflow.db.from-xz",
                                                                        "mlflow.db.xz"]  # no temporary left


def test_a_packed_study_is_found_from_any_copy(tmp_path, _store_template):
    study = tmp_path / "studies" / "tiny"
    study.mkdir(parents=True)
    shutil.copy(_store_template, study / "mlflow.db")
    store = f"sqlite:///{study / 'mlflow.db'}"
    base = apply_values(preset_config("demo"), {**TINY_RUN, "train.epochs": 1, "data.train_limit": 64,
                                                "train.sample_every": 1})  # fmt: skip
    plan = plan_study("stabilizers", "demo", base, (0,), ("seed-report", "paper", "no-l2"), "cpu",
                        experiment="tiny", storage=f"sqlite:///{study / 'optuna.db'}", tracking_uri=store,
                        checkpoint_root=study / "checkpoints")  # fmt: skip
    ab.run(plan, workers=1, echo=lambda s: None)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "pack_study.py"), str(study)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "kept checkpoints of 2 runs" in out.stdout  # seed-report and paper (audited); no-l2 needs none
    with sqlite3.connect(study / "mlflow.db") as db:
        uris = [u for (u,) in db.execute("SELECT artifact_uri FROM runs")]
    assert uris and all(u.startswith("mlflow-artifacts:/tiny/") for u in uris)
    assert not (study / "checkpoints").exists()
    assert absolute_paths(study / "mlflow.db") == [] and absolute_paths(study / "optuna.db") == []
    with sqlite3.connect(study / "mlflow.db") as db:  # the checkpoint layout stays, relative
        dirs = [v for (v,) in db.execute("SELECT value FROM tags WHERE key = 'checkpoint_dir'")]
    assert dirs and all(d.startswith("checkpoints/tiny/") for d in dirs)

    assert "compressed the store" in out.stdout and (study / "mlflow.db.xz").is_file()  # what git holds

    moved = tmp_path / "elsewhere" / "tiny"  # a clone in another place: nothing absolute survives
    shutil.copytree(study, moved, ignore=shutil.ignore_patterns(*WORKING_COPY))  # and only the .xz travels
    shutil.rmtree(study)
    uri = f"sqlite:///{moved / 'mlflow.db'}"
    Store(uri)  # the first touch of any command unpacks it
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              filter_string="tags.variant != ''")  # fmt: skip
    by_variant = {r.data.tags["variant"]: r.info.run_id for r in runs if "variant" in r.data.tags}
    grid = Store(uri).download_artifact(by_variant["no-l2"], "samples/epoch_001_t0.7.png")
    with Image.open(grid) as im:
        assert im.size == (4 * 34 + 2, 4 * 34 + 2)  # cropped to 16 samples
    assert not (grid.parent / "epoch_001_t1.0.png").exists()
    from study.run.state import checkpoint_of_run, model_from_checkpoint

    state = checkpoint_of_run(Store(uri), by_variant["paper"])
    assert "optimizer" not in state and model_from_checkpoint(state)[1].stabilizers.bn_bijector


def test_an_absolute_data_path_is_committed_relative_to_the_repository(tmp_path):
    """A study started with ``--data npz:/ABS/PATH`` records that path as a param; packing it writes the
    path a relative ``--data`` would have recorded, so the committed store names no place of the machine."""
    from study.store import portable_paths

    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = store.open_experiment("abs")
    data = tmp_path / "shared" / "data" / "slices"  # beside the repository, as ../shared is here
    absolute = store.create_run(exp, "a", {})
    store.client.log_param(absolute, "data.path", str(data))
    relative = store.create_run(exp, "r", {})
    store.client.log_param(relative, "data.path", "../shared/data/slices")
    repo = tmp_path / "repo"
    assert portable_paths(tmp_path / "mlflow.db", repo) >= 1
    for run in (absolute, relative):
        assert store.client.get_run(run).data.params["data.path"] == "../shared/data/slices"
    assert not [row for row in absolute_paths(tmp_path / "mlflow.db") if row[0] == "params"]
