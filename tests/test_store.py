"""The one door to the tracking store (study/store.py): its fast SQL read answers exactly what MLflow's
API answers, two stores live side by side in one process, nothing touches MLflow's process-wide
tracking URI, and a store crosses into a worker process as itself."""

from __future__ import annotations

import math
import pickle

import mlflow
import pytest

from study import schema
from study.schema import HISTORY_METRICS
from study.store import Store


def _via_api(store: Store) -> Store:
    """The same store read through MLflow's client only (as for a server or PostgreSQL store)."""
    api = Store(store.uri)
    api.sqlite_file = lambda: None
    return api


def _fill(store: Store) -> list[str]:
    exp = store.open_experiment("reads")
    runs = []
    for i in range(3):
        run = store.create_run(exp, f"r{i}", {schema.VARIANT: "v", schema.SEED: i})
        rows = [(key, 5.0 - 0.1 * e + 0.01 * i + j * 1e-3, 1000 + e, e)
                for e in range(1, 5) for j, key in enumerate(HISTORY_METRICS)]  # fmt: skip
        store.log_metric_rows(run, rows)
        runs.append(run)
    # a diverged epoch (NaN and inf), and an epoch logged twice (a resume): the later point wins
    store.log_metric_rows(runs[1], [(schema.VAL_BPD, math.nan, 2000, 5), ("train_bpd", math.inf, 2000, 5)])
    store.log_metric_rows(runs[2], [(schema.VAL_BPD, 9.0, 900, 4)])  # older than the epoch's first point
    store.log_metric_rows(runs[2], [(schema.VAL_BPD, 4.25, 3000, 4)])  # newer: this one stands
    runs.append(store.create_run(exp, "empty", {}))  # a run killed before its first epoch
    return runs


def _same(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_the_sql_read_answers_what_the_api_answers(store):
    sql = Store(store)
    runs = _fill(sql)
    fast = sql.histories(runs, HISTORY_METRICS)
    slow = _via_api(sql).histories(runs, HISTORY_METRICS)
    assert sorted(fast) == sorted(slow) == sorted(runs)
    for run in runs:
        assert sorted(fast[run]) == sorted(slow[run]), run
        for epoch, values in fast[run].items():
            assert sorted(values) == sorted(slow[run][epoch])
            assert all(_same(values[k], slow[run][epoch][k]) for k in values), (run, epoch, values, slow[run][epoch])
    assert fast[runs[3]] == {}
    # MLflow's SQL store keeps a NaN as 0 with is_nan set (read back as NaN) and +inf as the largest float:
    # both readings say so alike
    assert math.isnan(fast[runs[1]][5][schema.VAL_BPD]) and fast[runs[1]][5]["train_bpd"] >= 1.7e308
    assert fast[runs[2]][4][schema.VAL_BPD] == 4.25
    j = HISTORY_METRICS.index(schema.VAL_BPD)
    assert fast[runs[0]][2][schema.VAL_BPD] == pytest.approx(5.0 - 0.2 + j * 1e-3)


def test_two_stores_in_one_process_and_no_process_wide_uri(tmp_path, store):
    before = mlflow.get_tracking_uri()
    a, b = Store(store), Store(f"sqlite:///{tmp_path / 'other.db'}")
    run_a = a.create_run(a.open_experiment("same-name"), "in-a", {"where": "a"})
    run_b = b.create_run(b.open_experiment("same-name"), "in-b", {"where": "b"})
    a.log_metrics(run_a, {schema.VAL_BPD: 4.0}, 1)
    b.log_metrics(run_b, {schema.VAL_BPD: 5.0}, 1)
    assert [r.info.run_id for r in a.search_runs([a.experiment("same-name").experiment_id])] == [run_a]
    assert [r.info.run_id for r in b.search_runs([b.experiment("same-name").experiment_id])] == [run_b]
    assert a.metric_history(run_a, schema.VAL_BPD) == [(1, 4.0)]
    assert b.metric_history(run_b, schema.VAL_BPD) == [(1, 5.0)]
    assert not a.is_live(run_b) and a.is_live(run_a)
    assert mlflow.get_tracking_uri() == before


def test_a_store_crosses_into_a_worker_as_itself(store):
    copy = pickle.loads(pickle.dumps(Store(store)))
    assert copy.uri == store and copy.patient
    assert Store(store).impatient.uri == store and not Store(store).impatient.patient
    with pytest.raises(ValueError, match="file store"):
        Store("/some/path/mlruns")


def test_find_run_and_statuses(store):
    s = Store(store)
    exp = s.open_experiment("find")
    assert s.open_experiment("find") == exp  # opened again, not made twice
    first = s.create_run(exp, "one", {schema.RUN_KEY: "k1"}, params={"train.lr": 0.001}, description="why")
    second = s.create_run(exp, "two", {schema.RUN_KEY: "k1"}, parent_run_id=first)
    assert s.find_run(exp, "k1").info.run_id == second and s.find_run(exp, "nope") is None
    # a study's parent: the oldest top-level run with every tag (the child shares the tag, not the level)
    assert s.find_parent(exp, {schema.RUN_KEY: "k1"}) == first and s.find_parent(exp, {schema.RUN_KEY: "k2"}) is None
    got = s.get_run(second)
    assert got.data.tags[schema.PARENT] == first and s.get_run(first).data.params == {"train.lr": "0.001"}
    assert s.get_run(first).data.tags[schema.NOTE] == "why"
    s.set_status(second, "KILLED")
    assert s.get_run(second).info.status == "KILLED"
    s.set_status(second, "RUNNING")
    assert s.get_run(second).info.status == "RUNNING"


def test_a_sqlite_store_names_its_file_whatever_the_uri_adds(tmp_path):
    """One reading of a ``sqlite:///`` URI (study/committed.py) for the store's fast reads, its
    artifact folder and the committed .xz beside it: a driver or a query does not hide the file."""
    db = tmp_path / "m.db"
    for uri in (f"sqlite:///{db}", f"sqlite+pysqlite:///{db}", f"sqlite:///{db}?timeout=30"):
        store = Store(uri)
        assert store.sqlite_file() == db, uri
        assert store.artifact_store() == (tmp_path / "mlartifacts").resolve(), uri
    assert Store("sqlite:///:memory:").sqlite_file() is None


def test_checking_a_sqlite_url_reads_its_file_as_the_store_does(tmp_path):
    """study.tracking.check_database_url reads the file by the same rule: a ?query is not part of it, so an
    existing store with one is found; a missing one is still refused in one line."""
    from study.config import ConfigError
    from study.tracking import check_database_url

    db = tmp_path / "m.db"
    db.touch()
    check_database_url(f"sqlite:///{db}?timeout=30", "tracking URI", must_exist=True)
    check_database_url(f"sqlite+pysqlite:///{db}", "tracking URI", must_exist=True)
    check_database_url("sqlite:///:memory:", "--storage")
    with pytest.raises(ConfigError, match="no such store"):
        check_database_url(f"sqlite:///{tmp_path / 'none.db'}?timeout=30", "tracking URI", must_exist=True)
    with pytest.raises(ConfigError, match="three slashes"):
        check_database_url("sqlite:///", "tracking URI")
