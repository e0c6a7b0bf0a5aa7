"""A run killed mid-way, then run again, leaves the target a clean run leaves.

``kill -9`` at an arbitrary batch and SIGTERM (stop after the batch in flight) on 20,000
generated customers, a quarter of them sharing one ``updated_at``, followed by 1,000 later
edits of some of them (the same key again, newer, older or tied), written in batches of
200 into SQLite, PostgreSQL and MariaDB. Each test compares every column of every row
with a clean run of the same input into a table of its own, run alongside.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import pytest
import sqlalchemy as sa
from helpers import (
    SUMMARY_KEYS,
    Db,
    cli_env,
    command,
    server_db,
    sqlite_db,
    state_of,
    sync_ok,
    unique_table,
    write_job,
)

from custsync._fake import make_customers, touch, write_list_documents

pytestmark = pytest.mark.slow

N = 20_000  # distinct customers, each a row
EDITS = 1_000  # later records of the same keys: each one a duplicate in a run
SEED = 11
BATCH_SIZES = (200, 100, 50)  # smaller batches slow a run down when one ends too soon
POLL_S = 0.02
RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def customers_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The N customers, then EDITS edits of some of them: half an hour later (they win),
    or back at their creation (they lose, or tie and win as the last seen)."""
    path = tmp_path_factory.mktemp("crash-input") / "customers.jsonl"
    customers = list(make_customers(N, seed=SEED, tie_fraction=0.25))
    rng = random.Random(SEED)
    edits = []
    for number, original in enumerate(rng.sample(customers, EDITS)):
        attributes = original["attributes"]
        moment = datetime.fromisoformat(attributes["updated_at"]) + timedelta(minutes=30)
        if number % 2:
            moment = datetime.fromisoformat(attributes["created_at"])
        edits.append(touch(original, at=moment, rng=rng))
    write_list_documents(path, customers + edits, page_size=25, seed=SEED)
    return path


MakeDb = Callable[[Path], Db]
_STARTED: list[Run] = []  # background runs, killed at teardown if a test failed first


@pytest.fixture(autouse=True)
def no_run_outlives_its_test() -> Iterator[None]:
    yield
    while _STARTED:
        run = _STARTED.pop()
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("pg_url", marks=pytest.mark.postgres, id="postgres"),
        pytest.param("mysql_url", marks=pytest.mark.mysql, id="mariadb"),
    ]
)
def make_db(request: pytest.FixtureRequest) -> Iterator[MakeDb]:
    """Targets for one test: an SQLite file in the job's folder, or a table on a server."""
    made: list[Db] = []

    def make(folder: Path) -> Db:
        if request.param == "sqlite":
            return sqlite_db(folder)
        target = server_db(request.getfixturevalue(request.param), unique_table("crash"))
        made.append(target)
        return target

    yield make
    for target in made:
        target.drop()


class Run:
    """``custsync sync JOB --json`` in the background."""

    def __init__(self, job: Path, *, env: dict[str, str] | None = None) -> None:
        self.job = job
        self._stderr: IO[str] = (job.parent / "stderr.log").open("w", encoding="utf-8")
        self.process = subprocess.Popen(
            command("sync", str(job), "--json"),
            cwd=job.parent,
            env=cli_env(env),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        _STARTED.append(self)

    def finish(self) -> tuple[int, dict[str, Any] | None]:
        """Wait for the end; the exit code and the --json summary, if one was printed."""
        stdout, _ = self.process.communicate(timeout=RUN_TIMEOUT_S)
        self._stderr.close()
        lines = stdout.strip().splitlines()
        return self.process.returncode, json.loads(lines[-1]) if lines else None

    def stderr(self) -> str:
        return (self.job.parent / "stderr.log").read_text(encoding="utf-8")


def crash_job(folder: Path, db: Db, customers_file: Path, *, batch_size: int) -> Path:
    return write_job(
        folder,
        url=db.job_url,
        table=db.table,
        name=folder.name,
        source=f'path = "{customers_file}"',
        # Several commits a run, so a kill lands after some and inside an open transaction.
        sync=f'batch_size = {batch_size}\ncommit_interval = "0.2s"',
    )


def wait_until_partial(run: Run, db: Db, *, at_least: int) -> int | None:
    """Poll the target until it holds ``at_least`` rows but not all; None when the run
    ended before that."""
    engine = sa.create_engine(db.url)
    query = sa.text(f"SELECT count(*) FROM {engine.dialect.identifier_preparer.quote(db.table)}")
    try:
        while run.process.poll() is None:
            try:
                with engine.connect() as conn:
                    count = int(conn.execute(query).scalar_one())
            except sa.exc.SQLAlchemyError:
                count = 0  # the table is not there yet
            if at_least <= count < N:
                return count
            time.sleep(POLL_S)
        return None
    finally:
        engine.dispose()


def stop_mid_run(
    folder: Path,
    db: Db,
    customers_file: Path,
    sig: signal.Signals,
    *,
    env: dict[str, str] | None = None,
) -> tuple[Path, Run, int]:
    """Start a run and send ``sig`` once a third of the rows are in the table; retried
    with smaller batches (slower runs) when a run ends first. The job, the run, its batch
    size."""
    for batch_size in BATCH_SIZES:
        job = crash_job(folder, db, customers_file, batch_size=batch_size)
        run = Run(job, env=env)
        if wait_until_partial(run, db, at_least=N // 3) is not None:
            run.process.send_signal(sig)
            return job, run, batch_size
        run.finish()
        db.drop()
        shutil.rmtree(folder / ".custsync", ignore_errors=True)
    pytest.fail(f"every run ended before it could be stopped ({BATCH_SIZES=})")


def start_clean_run(tmp_path: Path, make_db: MakeDb, customers_file: Path) -> tuple[Run, Db]:
    folder = tmp_path / "clean"
    folder.mkdir()
    db = make_db(folder)
    return Run(crash_job(folder, db, customers_file, batch_size=BATCH_SIZES[0])), db


def assert_clean_run_ok(run: Run) -> None:
    code, summary = run.finish()
    assert code == 0, run.stderr()
    assert summary is not None
    expected = {"read": N + EDITS, "inserted": N, "duplicates": EDITS, "rejected": 0}
    assert {k: summary[k] for k in expected} == expected


def assert_same_table(got: Db, clean: Db) -> None:
    expected, actual = clean.rows(), got.rows()
    assert len(actual) == len(expected) == N
    mismatched = [(a, e) for a, e in zip(actual, expected, strict=True) if a != e]
    assert not mismatched, f"{len(mismatched)} rows differ, first: {mismatched[0]}"


def test_kill_9_mid_run_then_rerun_ends_as_a_clean_run(
    tmp_path: Path, make_db: MakeDb, customers_file: Path
) -> None:
    clean_run, clean = start_clean_run(tmp_path, make_db, customers_file)
    folder = tmp_path / "killed"
    folder.mkdir()
    db = make_db(folder)

    job, run, batch_size = stop_mid_run(folder, db, customers_file, signal.SIGKILL)
    code, summary = run.finish()

    assert code == -signal.SIGKILL
    assert summary is None
    committed = db.count()
    assert 0 < committed < N
    # The edits come last, so up to here every record read is a row of its own.
    assert committed % batch_size == 0, "a batch is one transaction: all of it or none"
    # An unordered source moves the watermark only once its whole input is committed.
    assert state_of(job)["watermark"] is None

    rerun = sync_ok(job, timeout=RUN_TIMEOUT_S)  # the lock died with the killed process

    assert rerun["read"] == N + EDITS
    assert (rerun["inserted"], rerun["duplicates"]) == (N - committed, EDITS)
    assert_clean_run_ok(clean_run)
    assert_same_table(db, clean)


def test_sigterm_commits_the_batch_in_flight_exits_1_interrupted_and_rerun_completes(
    tmp_path: Path, make_db: MakeDb, customers_file: Path
) -> None:
    clean_run, clean = start_clean_run(tmp_path, make_db, customers_file)
    folder = tmp_path / "stopped"
    folder.mkdir()
    db = make_db(folder)

    job, run, batch_size = stop_mid_run(folder, db, customers_file, signal.SIGTERM)
    code, summary = run.finish()

    assert code == 1, run.stderr()
    assert summary is not None
    assert set(summary) == SUMMARY_KEYS
    assert summary["status"] == "interrupted"
    committed = db.count()
    assert 0 < committed < N
    # Nothing half-done: every batch read was written and counted, the last one included.
    assert summary["read"] == summary["inserted"] == committed
    assert committed % batch_size == 0
    state = state_of(job)
    assert state["watermark"] is None
    assert state["runs"][0]["status"] == "interrupted"

    rerun = sync_ok(job, timeout=RUN_TIMEOUT_S)

    assert rerun["read"] == N + EDITS
    assert (rerun["inserted"], rerun["duplicates"]) == (N - committed, EDITS)
    assert_clean_run_ok(clean_run)
    assert_same_table(db, clean)


def test_no_scratch_data_of_a_killed_run_outlives_the_rerun(
    tmp_path: Path, customers_file: Path
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {"TMPDIR": str(scratch)}
    folder = tmp_path / "killed"
    folder.mkdir()
    job, run, _ = stop_mid_run(folder, sqlite_db(folder), customers_file, signal.SIGKILL, env=env)
    run.finish()

    sync_ok(job, env=env, timeout=RUN_TIMEOUT_S)

    assert sorted(p.name for p in scratch.iterdir()) == []
