"""The state store on SQLite files: watermark, cursor, run log and the per-job file lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custsync.errors import ConfigError, LockedError, StateError
from custsync.state import JobState, StateStore, utcnow

T0 = datetime(2024, 5, 17, 8, 30, 12, 345678, tzinfo=UTC)

# Takes the lock through custsync.state, says so, then waits to be killed.
CHILD_TAKES_LOCK = """
import sys, time
from pathlib import Path
from custsync.state import StateStore
url, job, lock_dir = sys.argv[1:4]
store = StateStore(url, lock_dir=Path(lock_dir))
with store.lock(job):
    print("locked", flush=True)
    time.sleep(300)
"""


class StepClock:
    """A clock that moves one second forward on every reading."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture(params=["sqlite3", "sqlalchemy"])
def db_url(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The store's SQLite file as a plain URL (served by sqlite3) and with a query
    (served by SQLAlchemy): both run every test, and keep the same tables."""
    url = f"sqlite:///{tmp_path / 'state' / 'state.db'}"
    return url if request.param == "sqlite3" else f"{url}?timeout=30"


@pytest.fixture
def make_store(db_url: str, tmp_path: Path) -> Iterator[Callable[..., StateStore]]:
    stores: list[StateStore] = []

    def make(*, clock: Callable[[], datetime] = utcnow) -> StateStore:
        store = StateStore(db_url, lock_dir=tmp_path / "locks", clock=clock)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(make_store: Callable[..., StateStore]) -> StateStore:
    return make_store(clock=StepClock())


def test_new_job_has_no_state(store: StateStore) -> None:
    assert store.get("never-seen") == JobState("never-seen", None, None, None)


def test_checkpoint_round_trips_watermark_with_microseconds_as_utc(store: StateStore) -> None:
    plus_two = datetime(2024, 5, 17, 10, 30, 12, 345678, tzinfo=timezone(timedelta(hours=2)))
    store.checkpoint("job", watermark=plus_two, cursor=None)

    watermark = store.get("job").watermark

    assert watermark == T0
    assert watermark is not None
    assert watermark.tzinfo is UTC
    assert watermark.microsecond == 345678


def test_checkpoint_round_trips_cursor_json(store: StateStore) -> None:
    cursor = {"window": ["2024-05-01T00:00:00Z", None], "last_id": "AbCd", "page": 3, "ü": True}
    store.checkpoint("job", watermark=T0, cursor=cursor)

    assert store.get("job").cursor == cursor


def test_checkpoint_never_moves_watermark_backwards(store: StateStore) -> None:
    store.checkpoint("job", watermark=T0, cursor=None)
    store.checkpoint("job", watermark=T0 - timedelta(microseconds=1), cursor=None)

    assert store.get("job").watermark == T0


aware_datetimes = st.builds(
    lambda moment, minutes: moment.replace(tzinfo=timezone(timedelta(minutes=minutes))),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)),
    st.integers(min_value=-23 * 60, max_value=23 * 60),
)


# One store serves every example; each example uses a job of its own.
@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(watermarks=st.lists(st.none() | aware_datetimes, max_size=6))
def test_checkpoint_keeps_the_latest_watermark_ever_given(
    store: StateStore, watermarks: list[datetime | None]
) -> None:
    job = uuid.uuid4().hex
    for watermark in watermarks:
        store.checkpoint(job, watermark=watermark, cursor=None)

    given_ones = [watermark for watermark in watermarks if watermark is not None]
    assert store.get(job).watermark == (max(given_ones) if given_ones else None)


def test_checkpoint_moves_watermark_forwards(store: StateStore) -> None:
    store.checkpoint("job", watermark=T0, cursor=None)
    store.checkpoint("job", watermark=T0 + timedelta(microseconds=1), cursor=None)

    assert store.get("job").watermark == T0 + timedelta(microseconds=1)


def test_checkpoint_without_watermark_keeps_the_old_one_and_replaces_cursor(
    store: StateStore,
) -> None:
    store.checkpoint("job", watermark=T0, cursor={"page": 1})
    store.checkpoint("job", watermark=None, cursor={"page": 2})

    state = store.get("job")
    assert (state.watermark, state.cursor) == (T0, {"page": 2})


def test_checkpoint_stamps_updated_at_from_the_clock(
    make_store: Callable[..., StateStore],
) -> None:
    store = make_store(clock=lambda: T0)
    store.checkpoint("job", watermark=None, cursor=None)

    assert store.get("job").updated_at == T0


def test_set_watermark_can_move_it_backwards(store: StateStore) -> None:
    store.checkpoint("job", watermark=T0, cursor=None)
    store.set_watermark("job", T0 - timedelta(days=30))

    assert store.get("job").watermark == T0 - timedelta(days=30)


def test_set_watermark_clears_the_cursor(store: StateStore) -> None:
    store.checkpoint("job", watermark=T0, cursor={"last_id": "x"})
    store.set_watermark("job", T0 + timedelta(days=1))

    assert store.get("job").cursor is None


def test_reset_forgets_watermark_and_cursor(store: StateStore) -> None:
    store.checkpoint("job", watermark=T0, cursor={"last_id": "x"})
    store.reset("job")

    assert store.get("job") == JobState("job", None, None, None)


def test_reset_keeps_the_run_log(store: StateStore) -> None:
    store.start_run("job", run_id="r1", dry_run=False, watermark_before=None)
    store.reset("job")

    assert [run.run_id for run in store.runs("job")] == ["r1"]


def test_start_run_logs_a_running_run(store: StateStore) -> None:
    store.start_run("job", run_id="r1", dry_run=True, watermark_before=T0)

    [run] = store.runs("job")
    assert (run.status, run.dry_run, run.watermark_before, run.ended_at, run.counts) == (
        "running",
        True,
        T0,
        None,
        {},
    )


def test_finish_run_records_outcome_counts_and_watermark(store: StateStore) -> None:
    store.start_run("job", run_id="r1", dry_run=False, watermark_before=None)
    counts = {"read": 10, "inserted": 7, "rejected": 3}
    store.finish_run(
        "r1", status="rejects_exceeded", counts=counts, watermark_after=T0, error="too many"
    )

    [run] = store.runs("job")
    assert (run.status, run.counts, run.watermark_after, run.error) == (
        "rejects_exceeded",
        counts,
        T0,
        "too many",
    )
    assert run.ended_at is not None
    assert run.ended_at > run.started_at


def test_runs_are_newest_first(store: StateStore) -> None:
    for run_id in ("r1", "r2", "r3"):
        store.start_run("job", run_id=run_id, dry_run=False, watermark_before=None)
        store.finish_run(run_id, status="ok", counts={"read": 1}, watermark_after=None)

    assert [run.run_id for run in store.runs("job")] == ["r3", "r2", "r1"]


def test_runs_stops_at_the_limit(store: StateStore) -> None:
    for n in range(5):
        store.start_run("job", run_id=f"r{n}", dry_run=False, watermark_before=None)

    assert [run.run_id for run in store.runs("job", limit=2)] == ["r4", "r3"]


def test_runs_started_at_the_same_instant_are_newest_first(
    make_store: Callable[..., StateStore],
) -> None:
    store = make_store(clock=lambda: T0)
    for run_id in ("r1", "r2"):
        store.start_run("job", run_id=run_id, dry_run=False, watermark_before=None)

    assert [run.run_id for run in store.runs("job")] == ["r2", "r1"]


def test_runs_lists_only_that_job(store: StateStore) -> None:
    store.start_run("a", run_id="ra", dry_run=False, watermark_before=None)
    store.start_run("b", run_id="rb", dry_run=False, watermark_before=None)

    assert [run.run_id for run in store.runs("a")] == ["ra"]


def test_finish_run_of_an_unknown_run_raises_state_error(store: StateStore) -> None:
    with pytest.raises(StateError, match="no run 'nope'"):
        store.finish_run("nope", status="ok", counts={}, watermark_after=None)


def test_finish_run_refuses_an_unknown_status(store: StateStore) -> None:
    store.start_run("job", run_id="r1", dry_run=False, watermark_before=None)

    with pytest.raises(ValueError, match="running"):
        store.finish_run("r1", status="running", counts={}, watermark_after=None)


def test_start_run_with_a_used_run_id_raises_state_error(store: StateStore) -> None:
    store.start_run("job", run_id="r1", dry_run=False, watermark_before=None)

    with pytest.raises(StateError, match="start run 'r1'"):
        store.start_run("job", run_id="r1", dry_run=False, watermark_before=None)


def test_jobs_lists_every_job_with_state_or_runs_by_name(store: StateStore) -> None:
    store.checkpoint("b", watermark=T0, cursor=None)
    store.start_run("a", run_id="r1", dry_run=True, watermark_before=None)

    assert [(state.job, state.watermark) for state in store.jobs()] == [("a", None), ("b", T0)]


def test_a_cursor_that_is_not_json_raises_state_error(store: StateStore) -> None:
    with pytest.raises(StateError, match="cursor"):
        store.checkpoint("job", watermark=T0, cursor={"at": object()})


def test_naive_datetime_is_treated_as_utc(store: StateStore) -> None:
    store.checkpoint("job", watermark=T0.replace(tzinfo=None), cursor=None)

    assert store.get("job").watermark == T0


def test_sqlite_url_creates_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.db"
    with StateStore(f"sqlite:///{path}"):
        assert path.is_file()


def test_for_job_file_puts_the_db_in_dot_custsync_beside_the_job(tmp_path: Path) -> None:
    job_file = tmp_path / "jobs" / "nightly.toml"
    job_file.parent.mkdir()
    job_file.write_text('name = "nightly"\n')

    with StateStore.for_job_file(job_file) as store:
        store.checkpoint("nightly", watermark=T0, cursor=None)

    assert (tmp_path / "jobs" / ".custsync" / "state.db").is_file()


def test_an_invalid_url_raises_config_error() -> None:
    with pytest.raises(ConfigError):
        StateStore("not a url")


def test_an_unknown_database_kind_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown database kind"):
        StateStore("nosuchdb://user:pw@host/db")


def test_second_lock_on_same_job_raises_locked_error_while_first_is_held(
    make_store: Callable[..., StateStore],
) -> None:
    first, second = make_store(), make_store()

    with first.lock("job"), pytest.raises(LockedError) as raised, second.lock("job"):
        pass

    assert raised.value.job == "job"


def test_lock_can_be_taken_again_after_release(make_store: Callable[..., StateStore]) -> None:
    first, second = make_store(), make_store()
    with first.lock("job"):
        pass

    with second.lock("job"):
        pass


def test_lock_is_released_when_the_block_raises(make_store: Callable[..., StateStore]) -> None:
    first, second = make_store(), make_store()
    with pytest.raises(RuntimeError), first.lock("job"):
        raise RuntimeError("boom")

    with second.lock("job"):
        pass


def test_locks_of_different_jobs_are_independent(make_store: Callable[..., StateStore]) -> None:
    first, second = make_store(), make_store()

    with first.lock("job-a"), second.lock("job-b"):
        pass


def test_lock_file_lives_in_lock_dir_and_holds_the_pid(
    make_store: Callable[..., StateStore], tmp_path: Path
) -> None:
    store = make_store()

    with store.lock("nightly"):
        assert (tmp_path / "locks" / "nightly.lock").read_text() == f"{os.getpid()}\n"


def test_lock_dir_defaults_to_the_folder_of_the_sqlite_file(tmp_path: Path) -> None:
    with StateStore(f"sqlite:///{tmp_path / 'db' / 'state.db'}") as store, store.lock("nightly"):
        assert (tmp_path / "db" / "nightly.lock").is_file()


def test_job_names_with_path_characters_lock_inside_lock_dir(
    make_store: Callable[..., StateStore], tmp_path: Path
) -> None:
    first, second = make_store(), make_store()

    with first.lock("../etc/passwd"):
        assert [p.parent for p in (tmp_path / "locks").iterdir()] == [tmp_path / "locks"]
        with second.lock("__etc_passwd"):
            pass


def test_lock_held_by_a_child_killed_with_sigkill_is_free_afterwards(
    make_store: Callable[..., StateStore], db_url: str, tmp_path: Path
) -> None:
    store = make_store()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_TAKES_LOCK, db_url, "job", str(tmp_path / "locks")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError), store.lock("job"):
            pass

        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)

        with store.lock("job"):
            pass
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_runs_left_running_by_a_killed_process_are_closed_as_failed(tmp_path: Path) -> None:
    with StateStore(f"sqlite:///{tmp_path / 's.db'}") as store:
        store.start_run("job", run_id="r1", dry_run=False, watermark_before=None)

        closed = store.close_abandoned_runs("job")

        [run] = store.runs("job")
        assert closed == 1
        assert run.status == "failed"
        assert "killed" in (run.error or "")


# --- a plain SQLite file without SQLAlchemy -------------------------------------------

_PATH_TEXT = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00/"), min_size=1, max_size=12
)


@given(parts=st.lists(_PATH_TEXT, min_size=1, max_size=3), absolute=st.booleans())
def test_a_plain_sqlite_url_names_the_file_sqlalchemy_would_open(
    parts: list[str], absolute: bool
) -> None:
    import sqlalchemy as sa

    from custsync.state import plain_sqlite_file

    raw = ("/" if absolute else "") + "/".join(parts)
    for url in (
        f"sqlite:///{raw}",
        sa.engine.URL.create("sqlite", database=raw).render_as_string(),
    ):
        found = plain_sqlite_file(url)
        database = sa.make_url(url).database
        if found is not None:
            assert database
            assert found == Path(database).expanduser().absolute()
        else:  # left to SQLAlchemy: a query, a fragment, memory or a file: URI
            assert (
                not database
                or "?" in url
                or "#" in url
                or database.startswith(("file:", ":memory:"))
            )


def test_a_plain_sqlite_store_says_its_url_as_sqlalchemy_renders_it(tmp_path: Path) -> None:
    import sqlalchemy as sa

    path = tmp_path / "a b+c%d@e" / "state.db"
    rendered = sa.engine.URL.create("sqlite", database=str(path)).render_as_string()

    with StateStore(rendered) as store:
        assert repr(store) == f"StateStore({rendered!r})"


def _table_shapes(path: Path) -> dict[str, object]:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        shapes: dict[str, object] = {}
        for table in ("custsync_state", "custsync_runs", "custsync_seen"):
            shapes[table] = conn.execute(f"PRAGMA table_info({table})").fetchall()
            indexes = conn.execute(f"PRAGMA index_list({table})").fetchall()
            shapes[f"{table} indexes"] = sorted(
                (unique, origin, conn.execute(f"PRAGMA index_info({name!r})").fetchall())
                for _, name, unique, origin, _partial in indexes
            )
        return shapes
    finally:
        conn.close()


def test_a_plain_sqlite_store_creates_the_tables_sqlalchemy_would(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from custsync._statedb import metadata

    with StateStore(f"sqlite:///{tmp_path / 'plain.db'}"):
        pass
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'sqlalchemy.db'}")
    metadata.create_all(engine)
    engine.dispose()

    assert _table_shapes(tmp_path / "plain.db") == _table_shapes(tmp_path / "sqlalchemy.db")


@pytest.mark.parametrize("writer", ["sqlite3", "sqlalchemy"])
def test_either_way_of_serving_a_sqlite_store_reads_what_the_other_wrote(
    tmp_path: Path, writer: str
) -> None:
    plain = f"sqlite:///{tmp_path / 'state.db'}"
    routed = f"{plain}?timeout=30"
    write, read = (plain, routed) if writer == "sqlite3" else (routed, plain)
    cursor = {"page": 7, "name": "é\u2028", "nested": {"a": [1, None, 2.5]}}
    at = T0 + timedelta(microseconds=1)
    with StateStore(write, clock=StepClock()) as store:
        store.checkpoint("job", watermark=at, cursor=cursor)
        store.remember("job", {at: [(("b",), "f1"), (("a", "x"), "f2")], T0: [(("c",), "f3")]})
        store.start_run("job", run_id="r1", dry_run=True, watermark_before=at)
        store.finish_run("r1", status="ok", counts={"read": 3}, watermark_after=at, error="x")
        written = (store.get("job"), store.jobs(), store.runs("job"))

    with StateStore(read) as store:
        read_back = (store.get("job"), store.jobs(), store.runs("job"))

    assert read_back == written
    state = read_back[0]
    assert (state.watermark, state.cursor) == (at, cursor)
    assert state.seen == {
        at: frozenset({(("a", "x"), "f2"), (("b",), "f1")}),
        T0: frozenset({(("c",), "f3")}),
    }
    assert read_back[2][0].dry_run is True


def test_remember_replaces_what_was_kept_and_reset_forgets_it(store: StateStore) -> None:
    store.remember("job", {T0: [(("a",), "f")]})
    store.remember("job", {T0 + timedelta(seconds=1): [(("b",), "f")]})
    store.checkpoint("job", watermark=T0, cursor=None)

    assert store.get("job").seen == {T0 + timedelta(seconds=1): frozenset({(("b",), "f")})}

    store.reset("job")
    store.checkpoint("job", watermark=T0, cursor=None)

    assert store.get("job").seen == {}


def test_a_store_in_a_missing_folder_it_cannot_make_raises_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    with pytest.raises(StateError, match="cannot create its folder"):
        StateStore(f"sqlite:///{blocker / 'state.db'}")


def test_a_file_that_is_not_a_database_raises_state_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not an SQLite database, but long enough to look like one" * 20)

    with pytest.raises(StateError, match="could not create its tables"):
        StateStore(f"sqlite:///{path}")


USES_A_STORE = """
import sys
from datetime import datetime, timezone
from custsync.state import StateStore
store = StateStore(sys.argv[1])
with store.lock("job"):
    store.close_abandoned_runs("job")
    store.start_run("job", run_id="r1", dry_run=False, watermark_before=None)
    store.checkpoint("job", watermark=datetime(2026, 1, 2, tzinfo=timezone.utc), cursor=None)
    store.remember("job", {datetime(2026, 1, 2, tzinfo=timezone.utc): [(("a",), "f")]})
    store.finish_run("r1", status="ok", counts={"read": 1}, watermark_after=None)
    print(store.get("job").seen, [run.status for run in store.runs("job")])
print("sqlalchemy" in sys.modules)
"""


def test_a_plain_sqlite_store_never_imports_sqlalchemy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    done = subprocess.run(
        [sys.executable, "-c", USES_A_STORE, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert done.stdout.splitlines()[-1] == "False", done.stdout


def test_opening_a_store_and_reading_it_wait_for_no_writer(db_url: str, tmp_path: Path) -> None:
    """Another run may be writing to the store (a checkpoint): opening it and reading a
    job's state take no write lock, so they go on at once."""
    import sqlite3

    with StateStore(db_url, clock=StepClock()) as store:
        store.checkpoint("job", watermark=T0, cursor=None)
    writer = sqlite3.connect(tmp_path / "state" / "state.db", isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE custsync_state SET cursor_json = '{}'")

        with StateStore(db_url) as store:
            assert store.get("job").watermark == T0
    finally:
        writer.execute("ROLLBACK")
        writer.close()
