"""The state store on PostgreSQL and MariaDB: exact timestamps and server-side locks.

The tables are shared with other runs of the suite, so every test uses job names of its
own and nothing is dropped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from custsync.errors import LockedError, StateError
from custsync.state import StateStore

T0 = datetime(2024, 5, 17, 8, 30, 12, 345678, tzinfo=UTC)

# How long a server may take to notice a dead client and free its locks.
SERVER_NOTICES_DEATH_S = 15.0

# Takes the lock through custsync.state, says so, then waits to be killed.
CHILD_TAKES_LOCK = """
import sys, time
from custsync.state import StateStore
url, job = sys.argv[1:3]
store = StateStore(url)
with store.lock(job):
    print("locked", flush=True)
    time.sleep(300)
"""


@pytest.fixture(
    params=[
        pytest.param("pg_url", marks=pytest.mark.postgres, id="postgres"),
        pytest.param("mysql_url", marks=pytest.mark.mysql, id="mariadb"),
    ]
)
def server_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(request.param)
    return url


@pytest.fixture
def make_store(server_url: str) -> Iterator[Callable[[], StateStore]]:
    stores: list[StateStore] = []

    def make() -> StateStore:
        store = StateStore(server_url)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(make_store: Callable[[], StateStore]) -> StateStore:
    return make_store()


@pytest.fixture
def job() -> str:
    return f"test-{uuid.uuid4().hex}"


def test_checkpoint_round_trips_watermark_with_microseconds_as_utc(
    store: StateStore, job: str
) -> None:
    plus_two = datetime(2024, 5, 17, 10, 30, 12, 345678, tzinfo=timezone(timedelta(hours=2)))
    store.checkpoint(job, watermark=plus_two, cursor=None)

    watermark = store.get(job).watermark

    assert watermark == T0
    assert watermark is not None
    assert watermark.utcoffset() == timedelta(0)
    assert watermark.microsecond == 345678


def test_checkpoint_round_trips_cursor_json(store: StateStore, job: str) -> None:
    cursor = {"window": ["2024-05-01T00:00:00Z", None], "last_id": "AbCd", "page": 3, "ü": True}
    store.checkpoint(job, watermark=T0, cursor=cursor)

    assert store.get(job).cursor == cursor


def test_checkpoint_never_moves_watermark_backwards(store: StateStore, job: str) -> None:
    store.checkpoint(job, watermark=T0, cursor=None)
    store.checkpoint(job, watermark=T0 - timedelta(microseconds=1), cursor=None)

    assert store.get(job).watermark == T0


def test_set_watermark_can_move_it_backwards(store: StateStore, job: str) -> None:
    store.checkpoint(job, watermark=T0, cursor={"page": 2})
    store.set_watermark(job, T0 - timedelta(days=30))

    assert store.get(job).watermark == T0 - timedelta(days=30)


def test_job_names_differing_only_in_case_are_separate_jobs(store: StateStore, job: str) -> None:
    store.checkpoint(job.upper(), watermark=T0, cursor=None)

    assert store.get(job).watermark is None


def test_remembered_records_round_trip_and_reset_forgets_them(store: StateStore, job: str) -> None:
    at = datetime(2024, 5, 17, 8, 30, 12, 345678, tzinfo=UTC)
    store.checkpoint(job, watermark=at, cursor=None)
    store.remember(job, {at: [(("cus_B",), "f"), (("cus_a",), "f")]})
    store.remember(job, {at: [(("cus_a",), "f"), (("cus_é",), "g")]})

    assert store.get(job).seen == {at: frozenset({(("cus_a",), "f"), (("cus_é",), "g")})}

    store.reset(job)
    store.checkpoint(job, watermark=at, cursor=None)

    assert store.get(job).seen == {}


def test_run_log_round_trips_newest_first(store: StateStore, job: str) -> None:
    store.start_run(job, run_id=f"{job[-20:]}-1", dry_run=True, watermark_before=None)
    store.start_run(job, run_id=f"{job[-20:]}-2", dry_run=False, watermark_before=T0)
    store.finish_run(
        f"{job[-20:]}-2", status="ok", counts={"read": 5, "inserted": 5}, watermark_after=T0
    )

    newest, oldest = store.runs(job)
    assert (newest.status, newest.dry_run, newest.counts, newest.watermark_after) == (
        "ok",
        False,
        {"read": 5, "inserted": 5},
        T0,
    )
    assert (oldest.status, oldest.dry_run) == ("running", True)


def test_second_store_raises_locked_error_while_the_lock_is_held(
    make_store: Callable[[], StateStore], job: str
) -> None:
    first, second = make_store(), make_store()

    with first.lock(job), pytest.raises(LockedError), second.lock(job):
        pass


def test_lock_can_be_taken_again_after_release(
    make_store: Callable[[], StateStore], job: str
) -> None:
    first, second = make_store(), make_store()
    with pytest.raises(RuntimeError), first.lock(job):
        raise RuntimeError("boom")

    with second.lock(job):
        pass


def test_locks_of_different_jobs_are_independent(
    make_store: Callable[[], StateStore], job: str
) -> None:
    first, second = make_store(), make_store()

    with first.lock(job), second.lock(job.upper()):
        pass


def _lock_is_free(store: StateStore, job: str) -> bool:
    try:
        with store.lock(job):
            return True
    except LockedError:
        return False


def test_lock_held_by_a_child_killed_with_sigkill_is_free_afterwards(
    store: StateStore, server_url: str, job: str
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_TAKES_LOCK, server_url, job],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "locked"
        assert not _lock_is_free(store, job)

        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)

        # The server frees the lock once it sees the connection close: soon, not at once.
        deadline = time.monotonic() + SERVER_NOTICES_DEATH_S
        while not _lock_is_free(store, job):
            assert time.monotonic() < deadline, "the killed child's lock was never freed"
            time.sleep(0.05)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://custsync:s3cret-pw@127.0.0.1:1/test?connect_timeout=3",
        "mysql+pymysql://custsync:s3cret-pw@127.0.0.1:1/test?connect_timeout=3",
    ],
    ids=["postgres", "mariadb"],
)
def test_an_unreachable_server_raises_state_error_without_the_password(url: str) -> None:
    with pytest.raises(StateError) as raised:
        StateStore(url)

    assert "s3cret-pw" not in str(raised.value)
    assert "127.0.0.1" in str(raised.value)
