"""The commercelayer source through the ``custsync`` command, against the fake Commerce Layer
API on loopback, into SQLite with the flat_customer preset (keyed by id), so the table can
be held against the fake's own records ("equal to the API").

The fake's clock stands still at ``T`` unless a test moves it: the server's ``Date`` header,
and so the end of each run's frozen ``updated_at`` window, is known exactly. Its rate-limit
windows are scaled down by 100, and the jobs pace at 6000 a minute / 1000 in 10 s, the same
ratio as the real limits and the real client, so runs are fast and, when quiet, never 429.
"""

from __future__ import annotations

import itertools
import socket
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import Cli, assert_counts_add_up, parse_ts, run_cli, sync, sync_ok

from custsync._fake import make_customers
from fakes.commercelayer import FakeCommerceLayer, Request

SECRET = "cl-it-secret-5b8e0d2f-never-print"
ENV = {"CL_SECRET": SECRET}
T = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)  # whole seconds: the Date header has no more
JOB = "cl-customers"
LIST = "/api/customers"


class Clock:
    """The fake's clock: it stands still until a test moves it."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self.now += timedelta(seconds=seconds)
            return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(T)


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeCommerceLayer]:
    with FakeCommerceLayer(clock=clock, client_secret=SECRET, rate_limit_scale=0.01) as server:
        yield server


def write_job(
    folder: Path,
    fake: FakeCommerceLayer,
    *,
    mapping: str = 'preset = "flat_customer"',
    max_retry_time: float = 10,
    requests_per_minute: int = 6000,
    burst_per_10s: int = 1000,
    source: str = "",
    batch_size: int = 100,
) -> Path:
    """A job file in DESIGN.md's form: the commercelayer source (secret from the
    environment, never through Exports), the sql target on SQLite keyed by id."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.toml"
    text = f"""\
        name = "{JOB}"

        [source]
        connector = "commercelayer"
        base_url = "{fake.base_url}"
        auth_url = "{fake.auth_url}"
        client_id = "cid"
        client_secret = "${{CL_SECRET}}"
        requests_per_minute = {requests_per_minute}
        burst_per_10s = {burst_per_10s}
        max_retry_time = {max_retry_time}
        export_threshold = 0
        {source}

        [target]
        connector = "sql"
        url = "sqlite:///target.db"
        table = "customers"
        key = "id"

        [mapping]
        {mapping}

        [sync]
        batch_size = {batch_size}
        lookback = "0s"
        """
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def run(job: Path, *flags: str) -> dict[str, Any]:
    """``custsync sync JOB --json`` that must succeed; its summary."""
    return sync_ok(job, *flags, env=ENV, timeout=60)


def run_any(job: Path, *flags: str, env: dict[str, str] | None = None) -> Cli:
    return sync(job, *flags, env=env or ENV, timeout=60)


def state_of(job: Path) -> dict[str, Any]:
    """``custsync state show JOB --json``."""
    result = run_cli("state", "show", str(job), "--json", cwd=job.parent, env=ENV)
    assert result.returncode == 0, str(result)
    return result.summary


def table(job: Path) -> dict[str, dict[str, Any]]:
    import sqlite3

    with sqlite3.connect(job.parent / "target.db") as db:
        db.row_factory = sqlite3.Row
        return {row["id"]: dict(row) for row in db.execute("SELECT * FROM customers")}


def differences(job: Path, fake: FakeCommerceLayer) -> list[str]:
    """Where the table and the API disagree: ids missing on either side, then per id the
    e-mail (as validation strips it), updated_at, reference and customer group."""
    rows = table(job)
    found = [f"{cid}: not in the table" for cid in sorted(set(fake.customers) - set(rows))]
    found += [f"{cid}: not in the API" for cid in sorted(set(rows) - set(fake.customers))]
    for cid, customer in sorted(fake.customers.items()):
        row = rows.get(cid)
        if row is None:
            continue
        attributes = customer["attributes"]
        linkage = (customer.get("relationships") or {}).get("customer_group", {}).get("data")
        group_id = linkage["id"] if linkage else None
        expected = {
            "email": attributes["email"].strip(),
            "updated_at": parse_ts(attributes["updated_at"]),
            "reference": attributes.get("reference"),
        }
        actual = {
            "email": row["email"],
            "updated_at": parse_ts(row["updated_at"]),
            "reference": row["reference"],
        }
        if "customer_group_id" in row:
            expected["customer_group_id"] = group_id
            expected["customer_group_name"] = (
                fake.groups[group_id]["attributes"]["name"] if group_id else None
            )
            actual["customer_group_id"] = row["customer_group_id"]
            actual["customer_group_name"] = row["customer_group_name"]
        if expected != actual:
            found.append(f"{cid}: table {actual} != API {expected}")
    return found


def list_requests(fake: FakeCommerceLayer, since: int = 0) -> list[Request]:
    return [r for r in fake.requests[since:] if r.method == "GET" and r.path == LIST]


def walk_requests(fake: FakeCommerceLayer, since: int = 0) -> list[Request]:
    """The keyset walk's pages (sorted by id), not the probe that takes the server's time."""
    return [r for r in list_requests(fake, since) if r.query.get("sort") == "id"]


def on_page(fake: FakeCommerceLayer, actions: dict[int, Callable[[], None]]) -> None:
    """Run ``actions[n]`` when the n-th page of the walk (1-based) arrives, before it is
    served."""
    pages = 0
    lock = threading.Lock()

    def hook(request: Request) -> None:
        nonlocal pages
        if request.method != "GET" or request.path != LIST or request.query.get("sort") != "id":
            return
        with lock:
            pages += 1
            action = actions.get(pages)
        if action is not None:
            action()

    fake.on_request(hook)


def seed(fake: FakeCommerceLayer, n: int, *, seed: int = 1, **options: Any) -> list[str]:
    """``n`` customers in the fake; their ids in the server's order."""
    fake.add_customers(make_customers(n, seed=seed, mode=fake.mode, groups=0, **options))
    return sorted(fake.customers)


# --- quiet runs ----------------------------------------------------------------------------


def test_after_a_quiet_run_the_table_equals_the_api(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    fake.seed_customers(700, seed=1)  # a quarter share one updated_at; 4 customer groups
    job = write_job(tmp_path, fake)

    summary = run(job)

    assert (summary["read"], summary["inserted"], summary["rejected"]) == (700, 700, 0)
    assert differences(job, fake) == []
    assert parse_ts(summary["watermark"]) == T  # the server's clock, not ours
    assert fake.throttled == 0


def test_no_request_ever_asks_for_more_than_25_records(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    seed(fake, 260)
    run(write_job(tmp_path / "default", fake))
    sizes = [int(r.query["page[size]"]) for r in list_requests(fake)]
    assert max(sizes) <= 25
    assert {int(r.query["page[size]"]) for r in walk_requests(fake)} == {25}

    asked = len(fake.requests)
    refused = run_any(write_job(tmp_path / "big", fake, source="page_size = 100"))
    assert refused.returncode == 2, str(refused)
    assert refused.summary["status"] == "config_error"
    assert len(fake.requests) == asked  # refused before anything was asked


def test_a_bulk_import_sharing_one_updated_at_is_read_across_pages_and_runs(
    tmp_path: Path, fake: FakeCommerceLayer, clock: Clock
) -> None:
    # 2,000 customers stamped with one instant, and 30 more at exactly the window's end.
    seed(fake, 2000, seed=3, start=T - timedelta(hours=1), tie_fraction=1.0)
    seed(fake, 30, seed=4, start=T, tie_fraction=1.0)
    assert len(fake.customers) == 2030
    job = write_job(tmp_path, fake, batch_size=500)

    first = run(job)

    assert first["read"] == 2030
    assert len(walk_requests(fake)) == 82  # 2,030 / 25, across page and batch boundaries
    assert differences(job, fake) == []
    assert parse_ts(first["watermark"]) == T

    # Another bulk import lands at exactly the watermark instant, after the window closed.
    before = set(fake.customers)
    seed(fake, 40, seed=5, start=T, tie_fraction=1.0)
    late = set(fake.customers) - before
    assert len(late) == 40
    clock.advance(60)
    asked = len(fake.requests)

    second = run(job)

    # The next run reads the instant again (>= the watermark): the 30 and the 40 late ones,
    # never the 2,000 below it.
    assert second["read"] == 70
    assert second["inserted"] == 40
    assert {r.query.get("filter[q][updated_at_gteq]") for r in walk_requests(fake, asked)} == {
        "2026-06-01T12:00:00.000Z"
    }
    assert differences(job, fake) == []


def test_an_incremental_run_reads_only_what_changed(
    tmp_path: Path, fake: FakeCommerceLayer, clock: Clock
) -> None:
    ids = seed(fake, 400)
    job = write_job(tmp_path, fake)
    assert run(job)["read"] == 400

    changed = ids[::13][:30]
    assert len(changed) == 30
    for number, cid in enumerate(changed):
        fake.update_customer(
            cid, at=clock.advance(1), email=f"changed{number}@example.com", reference=f"R{number}"
        )
    clock.advance(60)
    asked = len(fake.requests)

    summary = run(job)

    assert (summary["read"], summary["updated"], summary["skipped"]) == (30, 30, 0)
    assert len(walk_requests(fake, asked)) == 2  # 30 records: two pages
    assert len(list_requests(fake, asked)) == 3  # and the probe that reads the server's clock
    assert differences(job, fake) == []


def test_records_changing_while_they_are_read_are_never_skipped(
    tmp_path: Path, fake: FakeCommerceLayer, clock: Clock
) -> None:
    ids = seed(fake, 600)
    job = write_job(tmp_path, fake)
    already_read = [ids[0], ids[57], ids[99]]
    not_yet_read = [ids[100], ids[350], ids[599]]

    def edit() -> None:
        # Four pages (100 records) are read and committed; another system edits now.
        for cid in already_read + not_yet_read:
            fake.update_customer(cid, at=clock.advance(1), email=f"new-{cid.lower()}@example.com")
        # An edit stamped at exactly the window's end stays inside it.
        fake.update_customer(ids[400], at=T, reference="EDITED-AT-T")

    on_page(fake, {5: edit})

    first = run(job)

    # What left the window was not read this time; all the rest was, the edit at T included.
    assert first["read"] == 597
    rows = table(job)
    assert not set(not_yet_read) & set(rows)
    assert rows[ids[400]]["reference"] == "EDITED-AT-T"

    clock.advance(60)
    second = run(job)

    assert second["read"] == 7  # the six edited after T, and the one at T again
    assert differences(job, fake) == []


# --- faults ----------------------------------------------------------------------------------


def test_a_token_expiring_in_the_middle_of_a_run_is_renewed(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    seed(fake, 300)
    on_page(fake, {4: fake.expire_tokens})
    job = write_job(tmp_path, fake)

    summary = run(job)

    assert summary["read"] == 300
    assert [r.status for r in fake.requests if r.path == "/oauth/token"] == [200, 200]
    assert [r.status for r in list_requests(fake)].count(401) == 1
    assert differences(job, fake) == []


def test_5xx_bursts_and_dropped_connections_are_retried(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    seed(fake, 300)
    on_page(
        fake,
        {
            2: lambda: fake.fail_next(2, status=503),
            5: lambda: fake.fail_next(1, status=502),
            7: lambda: fake.fail_next(2, drop=True),
        },
    )
    job = write_job(tmp_path, fake)

    summary = run(job)

    assert summary["read"] == 300
    statuses = [r.status for r in list_requests(fake)]
    assert (statuses.count(503), statuses.count(502), statuses.count(0)) == (2, 1, 2)
    assert differences(job, fake) == []


def test_429s_under_the_fakes_scaled_real_limits_are_honoured(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    # The fake's test-mode limits scaled by 0.15 (25 reads in 1.5 s, 100 in 9 s); the job
    # paces far faster than that, in pages of 5, so the server has to throttle it.
    fake.rate_limit_scale = 0.15
    seed(fake, 300)
    job = write_job(
        tmp_path,
        fake,
        requests_per_minute=600_000,
        burst_per_10s=100_000,
        source="page_size = 5",
    )

    summary = run(job)

    assert summary["read"] == 300
    assert differences(job, fake) == []
    assert fake.throttled >= 1
    answered = [r for r in fake.requests if r.path.startswith("/api/")]
    for throttled, following in itertools.pairwise(answered):
        if throttled.status == 429:
            # X-Ratelimit-Interval said 1.5 s (or 9): nothing went before it passed.
            assert following.time - throttled.time >= 1.5 * 0.95


@pytest.fixture
def outage_run(tmp_path: Path, fake: FakeCommerceLayer) -> tuple[Path, Cli, list[str]]:
    """A run cut by an outage longer than max_retry_time at its 10th page, after two
    batches of 100 were committed; the outage is over when this returns."""
    ids = seed(fake, 600)
    job = write_job(tmp_path, fake, max_retry_time=0.5)
    started: list[float] = []

    def cut() -> None:
        started.append(time.monotonic())
        fake.outage(2.0)

    on_page(fake, {10: cut})
    result = run_any(job)
    wait_until_listening(fake, deadline=started[0] + 10)
    return job, result, ids


def wait_until_listening(fake: FakeCommerceLayer, *, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", fake.port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the fake did not come back")


def test_an_outage_longer_than_max_retry_time_fails_the_run_keeping_what_was_committed(
    outage_run: tuple[Path, Cli, list[str]], fake: FakeCommerceLayer
) -> None:
    job, result, ids = outage_run

    assert result.returncode == 1, str(result)
    assert result.summary["status"] == "failed"
    assert_counts_add_up(result.summary)
    assert sorted(table(job)) == ids[:200]  # the two committed batches stay
    state = state_of(job)
    assert state["cursor"]["last_id"] == ids[199]  # the last id of the last committed batch
    assert parse_ts(state["cursor"]["window"][1]) == T
    assert state["runs"][0]["status"] == "failed"


def test_the_run_after_an_outage_resumes_where_it_stopped(
    outage_run: tuple[Path, Cli, list[str]], fake: FakeCommerceLayer
) -> None:
    job, _, ids = outage_run
    asked = len(fake.requests)

    summary = run(job)

    resumed = list_requests(fake, asked)
    assert resumed[0].query.get("filter[q][id_gt]") == ids[199]  # no probe, no restart
    assert resumed[0].query.get("filter[q][updated_at_lteq]") == "2026-06-01T12:00:00.000Z"
    assert summary["read"] == 400
    assert differences(job, fake) == []
    assert state_of(job)["cursor"] is None


# --- what is asked for -------------------------------------------------------------------------


def test_sparse_fieldsets_ask_only_for_what_the_mapping_reads(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    fake.seed_customers(60, seed=2)
    plain = """[mapping.fields]
        id = "id"
        email = "email"
        reference = "reference"
        tier = { path = "metadata.tier", default = "standard" }"""
    grouped = """[mapping.fields]
        id = "id"
        email = "email"
        group = "customer_group.name" """

    run(write_job(tmp_path / "plain", fake, mapping=plain))
    pages = walk_requests(fake)
    assert {r.query["fields[customers]"] for r in pages} == {"email,metadata,reference,updated_at"}
    assert not any("include" in r.query or "fields[customer_groups]" in r.query for r in pages)

    asked = len(fake.requests)
    job = write_job(tmp_path / "grouped", fake, mapping=grouped)
    run(job)
    pages = walk_requests(fake, asked)
    assert {r.query["fields[customers]"] for r in pages} == {"customer_group,email,updated_at"}
    assert {r.query.get("include") for r in pages} == {"customer_group"}
    assert {r.query.get("fields[customer_groups]") for r in pages} == {"name"}
    rows = table(job)
    for cid, customer in fake.customers.items():
        linkage = customer["relationships"]["customer_group"]["data"]
        name = fake.groups[linkage["id"]]["attributes"]["name"] if linkage else None
        assert rows[cid]["group"] == name


def test_check_reaches_the_api(tmp_path: Path, fake: FakeCommerceLayer) -> None:
    seed(fake, 42)
    job = write_job(tmp_path, fake)

    result = run_cli("check", str(job), cwd=tmp_path, env=ENV, timeout=60)

    assert result.returncode == 0, str(result)
    assert f"source: reached {fake.base_url}: 42 customers" in result.stdout
    assert [r.status for r in list_requests(fake)] == [200]


def test_secrets_never_appear_in_the_output_even_with_vv(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    seed(fake, 120)
    on_page(fake, {2: fake.expire_tokens, 3: lambda: fake.fail_next(1, status=503)})
    job = write_job(tmp_path, fake)
    wrong = "wrong-secret-0c4e9b7a"

    results = [
        run_cli("-vv", "sync", str(job), "--json", cwd=tmp_path, env=ENV),
        run_cli("-vv", "check", str(job), cwd=tmp_path, env=ENV),
        run_cli("-vv", "sync", str(job), "--json", cwd=tmp_path, env={"CL_SECRET": wrong}),
        run_cli("-vv", "state", "show", str(job), "--json", cwd=tmp_path, env=ENV),
    ]

    assert [r.returncode for r in results] == [0, 0, 1, 0], "\n".join(map(str, results))
    assert "retrying" in results[0].stderr  # -vv logs were on
    tokens = {
        r.headers["authorization"].removeprefix("Bearer ")
        for r in fake.requests
        if "authorization" in r.headers
    }
    assert len(tokens) >= 3
    for result in results:
        for secret in (SECRET, wrong, *tokens):
            assert secret not in result.stdout
            assert secret not in result.stderr
