"""The Commerce Layer backfill through the Exports API, driven through the ``custsync``
command against the fake API on loopback, into SQLite with the flat_customer preset.

A first (or full) read of more than ``export_threshold`` customers is split by id range
into exports of at most ``export_size``, ``exports_in_flight`` at once; the tests read
the fake's request log and export jobs to see how, and compare the table with what the
list API reads from the same fake ("equal to the API").
"""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Db, cli_env, command, default_state_url, parse_ts, sqlite_db, sync, sync_ok

from custsync import Job
from custsync.state import StateStore
from fakes.commercelayer import Export, FakeCommerceLayer, Request

N = 400  # customers in the fake
SIZE = 90  # export_size: five ranges, the last one short
IN_FLIGHT = 2
THRESHOLD = 300
JOB = "cl-backfill"
EXPORT_PATH = re.compile(r"/api/exports/([^/]+)")


def seeded_fake() -> FakeCommerceLayer:
    # Exports complete 0.2 s after they are asked for, so several are in flight at once;
    # rate-limit windows scaled down so the job's fast pacing stays inside them.
    server = FakeCommerceLayer(mode="test", export_delay=0.1, rate_limit_scale=0.01)
    server.seed_customers(N, seed=7)
    return server


@pytest.fixture
def fake() -> Iterator[FakeCommerceLayer]:
    with seeded_fake() as server:
        yield server


@pytest.fixture(scope="module")
def backfilled(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[FakeCommerceLayer, Path, dict[str, Any]]]:
    """One first run over the threshold, untouched afterwards: the fake, the job, the
    run's summary."""
    with seeded_fake() as server:
        job = write_job(tmp_path_factory.mktemp("backfill"), server)
        yield server, job, run_ok(job, server)


def write_job(
    folder: Path,
    fake: FakeCommerceLayer,
    *,
    threshold: int = THRESHOLD,
    size: int = SIZE,
    in_flight: int = IN_FLIGHT,
    batch_size: int = 100,
) -> Path:
    """A job file in DESIGN.md's form: the commercelayer source, SQLite keyed by id."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name = "{JOB}"

            [source]
            connector = "commercelayer"
            base_url = "{fake.base_url}"
            auth_url = "{fake.auth_url}"
            client_id = "{fake.client_id}"
            client_secret = "${{CL_SECRET}}"
            requests_per_minute = 6000
            burst_per_10s = 1000
            export_threshold = {threshold}
            export_size = {size}
            exports_in_flight = {in_flight}

            [target]
            connector = "sql"
            url = "sqlite:///target.db"
            table = "customers"
            key = "id"

            [mapping]
            preset = "flat_customer"

            [sync]
            batch_size = {batch_size}
            """
        ),
        encoding="utf-8",
    )
    return path


def env(fake: FakeCommerceLayer) -> dict[str, str]:
    return {"CL_SECRET": fake.client_secret}


def run_ok(job: Path, fake: FakeCommerceLayer, *flags: str) -> dict[str, Any]:
    return sync_ok(job, *flags, env=env(fake))


def target(job: Path) -> Db:
    return sqlite_db(job.parent)


def since(fake: FakeCommerceLayer, mark: int) -> list[Request]:
    """The requests the fake received after the first ``mark``."""
    return fake.requests[mark:]


def export_posts(requests: list[Request]) -> list[Request]:
    return [r for r in requests if r.method == "POST" and r.path == "/api/exports"]


def created(fake: FakeCommerceLayer, mark: int = 0) -> list[Export]:
    """The exports created after the first ``mark`` requests, in creation order."""
    count = sum(r.status == 201 for r in export_posts(since(fake, mark)))
    return list(fake.exports.values())[len(fake.exports) - count :]


def peak_active(fake: FakeCommerceLayer) -> int:
    """The most exports pending or in progress at once, seen at each creation."""
    posts = [r for r in export_posts(fake.requests) if r.status == 201]
    exports = list(fake.exports.values())
    assert len(posts) == len(exports)
    return max(
        1 + sum(other.completes > post.time and not other.failed for other in exports[:i])
        for i, post in enumerate(posts)
    )


def assert_equal_to_api(job: Path, fake: FakeCommerceLayer) -> None:
    """Every row equals what the list API reads from the fake now, and every customer's
    updated_at is the API's to the millisecond."""
    reference = write_job(job.parent / "reference", fake, threshold=0)
    # In this process: the reference is the list API's read, not the command under test.
    result = Job.from_file(reference, env=env(fake)).run()
    assert result.ok, result.error
    expected, got = target(reference).by_key("id"), target(job).by_key("id")
    assert sorted(got) == sorted(fake.customers)
    assert got == expected
    for ident, customer in fake.customers.items():
        api = parse_ts(customer["attributes"]["updated_at"])
        assert parse_ts(got[ident]["updated_at"]) == api, ident


def export_hook(
    fake: FakeCommerceLayer, action: Callable[[Export], None]
) -> Callable[[Request], None]:
    """A request hook calling ``action`` with the export each GET /api/exports/:id reads."""

    def hook(request: Request) -> None:
        match = EXPORT_PATH.fullmatch(request.path)
        if request.method == "GET" and match and match[1] in fake.exports:
            action(fake.exports[match[1]])

    return hook


# --- the backfill ------------------------------------------------------------------------


def test_a_first_run_over_the_threshold_reads_through_exports_of_bounded_size(
    backfilled: tuple[FakeCommerceLayer, Path, dict[str, Any]],
) -> None:
    fake, job, summary = backfilled

    assert (summary["read"], summary["inserted"]) == (N, N)
    exports = created(fake)
    assert len(exports) == -(-N // SIZE)
    assert all(e.records_count <= SIZE for e in exports)
    assert sum(e.records_count for e in exports) == N
    assert peak_active(fake) == IN_FLIGHT
    # The list API only bounded the ranges (ids), it read no customer.
    lists = [r for r in fake.requests if r.path == "/api/customers"]
    assert {r.query.get("fields[customers]") for r in lists} == {"id"}
    assert_equal_to_api(job, fake)


def test_the_exports_ask_only_for_what_the_mapping_reads(
    backfilled: tuple[FakeCommerceLayer, Path, dict[str, Any]],
) -> None:
    fake, _, _ = backfilled

    first = created(fake)[0]

    assert first.includes == ["customer_group"]
    assert first.fields is not None
    assert {"id", "email", "updated_at", "customer_group_id"} <= set(first.fields)


def test_ranges_are_contiguous_and_inside_one_frozen_window(
    backfilled: tuple[FakeCommerceLayer, Path, dict[str, Any]],
) -> None:
    fake, _, _ = backfilled

    filters = [e.filters for e in created(fake)]

    assert len({f["updated_at_lteq"] for f in filters}) == 1
    assert "id_gt" not in filters[0]
    assert "id_lteq" not in filters[-1]
    for before, after in itertools.pairwise(filters):
        assert after["id_gt"] == before["id_lteq"]


def test_below_the_threshold_the_list_api_reads(tmp_path: Path, fake: FakeCommerceLayer) -> None:
    job = write_job(tmp_path / "job", fake, threshold=N + 1)

    summary = run_ok(job, fake)

    assert summary["read"] == N
    assert not export_posts(fake.requests)
    rows = target(job).by_key("id")
    assert sorted(rows) == sorted(fake.customers)


def test_an_export_threshold_of_zero_never_exports(tmp_path: Path, fake: FakeCommerceLayer) -> None:
    job = write_job(tmp_path / "job", fake, threshold=0)

    run_ok(job, fake)
    run_ok(job, fake, "--full-refresh")

    assert not export_posts(fake.requests)
    assert sorted(target(job).by_key("id")) == sorted(fake.customers)


def test_a_full_refresh_over_the_threshold_reads_through_exports_again(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    job = write_job(tmp_path / "job", fake)
    run_ok(job, fake)
    mark = len(fake.requests)

    summary = run_ok(job, fake, "--full-refresh")

    assert (summary["read"], summary["unchanged"]) == (N, N)
    assert len(created(fake, mark)) == -(-N // SIZE)


# --- faults --------------------------------------------------------------------------------


def test_an_expired_attachment_link_is_renewed(tmp_path: Path, fake: FakeCommerceLayer) -> None:
    expired: list[str] = []

    def expire_first_link(export: Export) -> None:
        # The first link handed out for a completed export is dead on arrival.
        if not expired and time.monotonic() >= export.completes:
            expired.append(export.id)
            fake.attachment_ttl = 0.0
        else:
            fake.attachment_ttl = 300.0

    fake.on_request(export_hook(fake, expire_first_link))
    job = write_job(tmp_path / "job", fake)

    summary = run_ok(job, fake)

    assert summary["read"] == N
    downloads = [r.status for r in fake.requests if r.path.startswith("/attachments/")]
    assert downloads.count(403) == 1
    assert downloads.count(200) == len(created(fake))
    assert_equal_to_api(job, fake)


def test_a_failed_export_is_created_once_more(tmp_path: Path, fake: FakeCommerceLayer) -> None:
    failed: list[str] = []

    def fail_the_second_export(export: Export) -> None:
        if not failed and list(fake.exports).index(export.id) == 1:
            failed.append(export.id)
            fake.fail_export(export.id)

    fake.on_request(export_hook(fake, fail_the_second_export))
    job = write_job(tmp_path / "job", fake)

    summary = run_ok(job, fake)

    assert summary["read"] == N
    exports = created(fake)
    assert len(exports) == -(-N // SIZE) + 1
    [retry] = [e for e in exports if e.filters == fake.exports[failed[0]].filters and not e.failed]
    assert retry.status == "completed"
    assert_equal_to_api(job, fake)


def test_an_export_failing_twice_fails_the_run_and_the_next_run_resumes(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    doomed: list[dict[str, Any]] = []

    def fail_the_second_range(export: Export) -> None:
        if list(fake.exports).index(export.id) == 1:
            doomed.append(export.filters)
        if export.filters in doomed:
            fake.fail_export(export.id)

    fake.on_request(export_hook(fake, fail_the_second_range))
    job = write_job(tmp_path / "job", fake)

    failed = sync(job, env=env(fake))

    assert failed.returncode == 1, str(failed)
    assert failed.summary["status"] == "failed"
    assert "also after 2 attempts" in failed.stderr
    state = StateStore(default_state_url(job)).get(JOB)
    first_boundary = created(fake)[0].filters["id_lteq"]
    assert state.cursor is not None
    assert state.cursor["last_boundary"] == first_boundary
    assert target(job).count() == SIZE

    doomed.clear()
    doomed.append({"never": "again"})
    mark = len(fake.requests)
    summary = run_ok(job, fake)

    assert summary["read"] == N - SIZE
    assert created(fake, mark)[0].filters["id_gt"] == first_boundary
    assert_equal_to_api(job, fake)


def test_a_killed_backfill_resumes_at_the_next_range(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    job = write_job(tmp_path / "job", fake)
    committed, released = threading.Event(), threading.Event()
    store: list[StateStore] = []

    def hold_after_the_first_range(request: Request) -> None:
        # Once a range is committed, the run's next API request waits here to be killed.
        if released.is_set() or not request.path.startswith("/api/"):
            return
        if not store:
            store.append(StateStore(default_state_url(job)))
        cursor = store[0].get(JOB).cursor
        if cursor and cursor.get("last_boundary"):
            committed.set()
            released.wait(30)

    fake.on_request(hold_after_the_first_range)
    process = subprocess.Popen(
        command("sync", str(job), "--json"),
        cwd=job.parent,
        env=cli_env(env(fake)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert committed.wait(30), "the run never committed a range"
        process.send_signal(signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL
    finally:
        released.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    cursor = store[0].get(JOB).cursor
    assert cursor is not None
    assert cursor["mode"] == "export"
    boundary = cursor["last_boundary"]
    done = sum(ident <= boundary for ident in fake.customers)  # the server's "C" collation
    assert target(job).count() == done
    mark = len(fake.requests)

    summary = run_ok(job, fake)

    assert summary["read"] == N - done
    resumed = created(fake, mark)
    assert resumed[0].filters["id_gt"] == boundary
    assert all(e.filters["id_gt"] >= boundary for e in resumed)
    assert_equal_to_api(job, fake)


# --- after the backfill ----------------------------------------------------------------------


def test_after_the_backfill_an_incremental_run_reads_only_changes(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    ids = sorted(fake.customers)
    edited: list[str] = []

    def edit_during_the_backfill(export: Export) -> None:
        # A customer of the last range changes while the backfill runs: it leaves the
        # frozen window, and the next run reads it.
        if not edited:
            edited.append(ids[-1])
            fake.update_customer(ids[-1], reference="EDITED-DURING")

    fake.on_request(export_hook(fake, edit_during_the_backfill))
    job = write_job(tmp_path / "job", fake)
    run_ok(job, fake)
    fake.update_customer(ids[0], reference="EDITED-AFTER")
    fake.update_customer(ids[N // 2], total_orders_count=9)
    # The window ends at the server's Date, which has whole seconds: an edit made in the
    # same second as the next probe falls after the window (and into the next run's).
    time.sleep(1.1)
    mark = len(fake.requests)

    summary = run_ok(job, fake)

    assert summary["read"] == 3
    assert summary["inserted"] + summary["updated"] == 3
    assert not export_posts(since(fake, mark))
    assert_equal_to_api(job, fake)
