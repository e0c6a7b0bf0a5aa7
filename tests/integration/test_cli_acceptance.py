"""``custsync sync`` as a scheduler and a user drive it: a subprocess, a job file in
DESIGN.md's form, JSON Lines of Commerce Layer list documents, a real target table.

The main flows run against SQLite, PostgreSQL and MariaDB; the rest against SQLite.
Every summary checked here must satisfy "every record read lands in exactly one count".
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    HOLD_LOCK,
    SUMMARY_KEYS,
    Db,
    assert_counts_add_up,
    at,
    cli_env,
    customer,
    default_state_url,
    iso,
    parse_ts,
    rejects_of,
    run_cli,
    server_db,
    sqlite_db,
    state_of,
    sync,
    sync_ok,
    unique_table,
    write_job,
    write_pages,
)

# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "job"
    folder.mkdir()
    return folder


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("pg_url", marks=pytest.mark.postgres, id="postgres"),
        pytest.param("mysql_url", marks=pytest.mark.mysql, id="mariadb"),
    ]
)
def db(request: pytest.FixtureRequest, job_dir: Path) -> Iterator[Db]:
    """The target: an SQLite file beside the job, or a table of its own on a server."""
    if request.param == "sqlite":
        yield sqlite_db(job_dir)
        return
    target = server_db(request.getfixturevalue(request.param), unique_table("accept"))
    try:
        yield target
    finally:
        target.drop()


@pytest.fixture
def sqlite(job_dir: Path) -> Db:
    return sqlite_db(job_dir)


def erp_job(job_dir: Path, db: Db, **kwargs: Any) -> Path:
    """The erp_customer preset into ``db``, batches of 2, no lookback (ties are pinned by
    ``>=`` alone, not by re-reading)."""
    return write_job(job_dir, url=db.job_url, table=db.table, **kwargs)


def erp_sync(*lines: str) -> str:
    return "\n".join(["batch_size = 2", 'lookback = "0s"', *lines])


# --- incremental by updated_at: ties ------------------------------------------------------


def test_ties_on_updated_at_across_a_page_boundary_lose_nothing(db: Db, job_dir: Path) -> None:
    write_pages(
        job_dir / "customers.jsonl",
        [
            customer("A", updated_at=at(1)),
            customer("B", updated_at=at(2)),
            customer("C", updated_at=at(2)),
        ],
        [customer("D", updated_at=at(2)), customer("E", updated_at=at(2))],
    )
    job = erp_job(job_dir, db)

    summary = sync_ok(job)

    assert summary["read"] == 5
    assert summary["inserted"] == 5
    assert sorted(db.by_key()) == ["CUST-A", "CUST-B", "CUST-C", "CUST-D", "CUST-E"]
    assert parse_ts(summary["watermark"]) == at(2)


def test_new_records_at_exactly_the_watermark_instant_are_written_by_the_next_run(
    db: Db, job_dir: Path
) -> None:
    first = [customer("A", updated_at=at(1)), customer("B", updated_at=at(2))]
    write_pages(job_dir / "customers.jsonl", first, [customer("C", updated_at=at(2))])
    job = erp_job(job_dir, db)
    assert parse_ts(sync_ok(job)["watermark"]) == at(2)

    # A bulk import stamps more records with the very instant the watermark holds.
    write_pages(
        job_dir / "customers.jsonl",
        first,
        [customer("C", updated_at=at(2)), customer("D", updated_at=at(2))],
        [customer("E", updated_at=at(2))],
    )
    summary = sync_ok(job)

    assert summary["inserted"] == 2
    # A is below the watermark; B and C, at it, are read again and skipped: the first run
    # wrote them, as they are (D and E, new at that instant, are written)
    assert summary["skipped"] == 3
    assert summary["unchanged"] == 0
    assert sorted(db.by_key()) == ["CUST-A", "CUST-B", "CUST-C", "CUST-D", "CUST-E"]
    assert parse_ts(summary["watermark"]) == at(2)


# --- bad input: rejects -------------------------------------------------------------------


def test_invalid_records_go_to_rejects_at_validate_and_the_run_goes_on(
    db: Db, job_dir: Path
) -> None:
    write_pages(
        job_dir / "customers.jsonl",
        [
            customer("A", updated_at=at(1)),
            customer("BADMAIL", email="not-an-email", updated_at=at(2)),
        ],
        [customer("BADSTATUS", status="vip", updated_at=at(3)), customer("D", updated_at=at(4))],
    )
    job = erp_job(job_dir, db, sync=erp_sync("max_rejects = 5"))

    summary = sync_ok(job)

    assert (summary["read"], summary["inserted"], summary["rejected"]) == (4, 2, 2)
    assert sorted(db.by_key()) == ["CUST-A", "CUST-D"]
    rejects = {line["source_id"]: line for line in rejects_of(job)}
    assert set(rejects) == {"BADMAIL", "BADSTATUS"}
    for source_id, field in (("BADMAIL", "email"), ("BADSTATUS", "status")):
        line = rejects[source_id]
        assert line["stage"] == "validate"
        assert line["run_id"] == summary["run_id"]
        assert [e["field"] for e in line["errors"]] == [field]
        assert all(e["message"] for e in line["errors"])
        assert line["record"]["id"] == source_id
    assert rejects["BADMAIL"]["record"]["email"] == "not-an-email"


def test_every_record_read_lands_in_exactly_one_count(sqlite: Db, job_dir: Path) -> None:
    write_pages(
        job_dir / "customers.jsonl",
        [customer("OLD", updated_at=at(0)), customer("SAME", updated_at=at(5))],
        [customer("CHANGED", updated_at=at(5)), customer("STALE", updated_at=at(9))],
    )
    job = erp_job(job_dir, sqlite, sync=erp_sync("max_rejects = 10"))
    sync_ok(job)

    write_pages(
        job_dir / "customers.jsonl",
        [customer("OLD", updated_at=at(0)), customer("SAME", updated_at=at(5))],
        [
            customer("CHANGED", status="repeat", updated_at=at(6)),
            customer("STALE", updated_at=at(8)),
        ],
        [
            customer("NEW", updated_at=at(7)),
            customer("NEW2", reference="CUST-NEW", updated_at=at(6)),
        ],
        [
            customer("BAD", email="bad", updated_at=at(7)),
            customer("NOKEY", reference="", updated_at=at(7)),
        ],
    )
    summary = sync_ok(job, "--since", iso(at(1)))

    expected = {
        "read": 8,
        "skipped": 1,  # OLD
        "unchanged": 1,  # SAME
        "updated": 1,  # CHANGED
        "stale": 1,  # STALE: the table holds a newer one
        "inserted": 1,  # NEW
        "duplicates": 1,  # NEW2, older, same key as NEW
        "rejected": 2,  # BAD, NOKEY
        "unknown": 0,
    }
    assert {k: summary[k] for k in expected} == expected


def test_record_without_an_external_key_is_rejected_at_map_naming_the_key_column(
    sqlite: Db, job_dir: Path
) -> None:
    write_pages(
        job_dir / "customers.jsonl",
        [
            customer("NOKEY", reference="", metadata={"tier": "gold"}),
            customer("ERP", reference="", metadata={"erp_id": "E0000042"}),
            customer("REF"),
        ],
    )
    job = erp_job(job_dir, sqlite, sync=erp_sync("max_rejects = 5"))

    summary = sync_ok(job)

    assert (summary["inserted"], summary["rejected"]) == (2, 1)
    assert sorted(sqlite.by_key()) == ["CUST-REF", "E0000042"]
    [line] = rejects_of(job)
    assert line["stage"] == "map"
    assert line["source_id"] == "NOKEY"
    assert [e["field"] for e in line["errors"]] == ["customer_no"]
    assert "reference" in line["errors"][0]["message"]
    assert "metadata.erp_id" in line["errors"][0]["message"]


def test_row_the_target_refuses_is_rejected_at_load_and_the_rest_of_its_batch_commits(
    db: Db, job_dir: Path
) -> None:
    too_long = "R" * 300  # the key column is VARCHAR(255)
    write_pages(
        job_dir / "customers.jsonl",
        [
            customer("A", updated_at=at(1)),
            customer("LONG", reference=too_long, updated_at=at(2)),
            customer("B", updated_at=at(3)),
        ],
    )
    job = erp_job(job_dir, db, sync='batch_size = 10\nlookback = "0s"\nmax_rejects = 5')

    summary = sync_ok(job)

    assert (summary["inserted"], summary["rejected"]) == (2, 1)
    assert sorted(db.by_key()) == ["CUST-A", "CUST-B"]
    [line] = rejects_of(job)
    assert (line["stage"], line["source_id"], line["key"]) == ("load", "LONG", too_long)
    assert [e["field"] for e in line["errors"]] == ["customer_no"]
    assert line["errors"][0]["message"]


# --- duplicate keys in one run ------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "first_at", "second_at", "winner", "loser"),
    [
        pytest.param("keep_latest", 5, 3, "X1", "X2", id="keep_latest-earlier-page-newer"),
        pytest.param("keep_latest", 3, 5, "X2", "X1", id="keep_latest-later-page-newer"),
        pytest.param("keep_latest", 4, 4, "X2", "X1", id="keep_latest-tie-last-seen-wins"),
        pytest.param("keep_first", 3, 5, "X1", "X2", id="keep_first"),
    ],
)
def test_same_key_in_two_pages_keeps_one_row_and_rejects_the_loser_as_dedupe(
    db: Db,
    job_dir: Path,
    policy: str,
    first_at: int,
    second_at: int,
    winner: str,
    loser: str,
) -> None:
    write_pages(
        job_dir / "customers.jsonl",
        [
            customer("A", updated_at=at(1)),
            customer("X1", reference="DUP-1", updated_at=at(first_at)),
        ],
        [
            customer("X2", reference="DUP-1", updated_at=at(second_at)),
            customer("B", updated_at=at(2)),
        ],
    )
    job = erp_job(job_dir, db, sync=erp_sync(f'duplicates = "{policy}"', "max_rejects = 0"))

    summary = sync_ok(job)

    assert summary["read"] == 4
    assert (summary["inserted"], summary["duplicates"], summary["rejected"]) == (3, 1, 0)
    rows = db.by_key()
    assert sorted(rows) == ["CUST-A", "CUST-B", "DUP-1"]
    assert rows["DUP-1"]["cl_id"] == winner
    assert rows["DUP-1"]["email"] == f"{winner.lower()}@example.com"
    [line] = rejects_of(job)
    assert line["stage"] == "dedupe"
    assert (line["source_id"], line["duplicate_of"], line["key"]) == (loser, winner, "DUP-1")
    assert [e["field"] for e in line["errors"]] == ["customer_no"]
    assert line["record"]["id"] == loser


def test_same_email_in_another_letter_case_is_one_key_when_the_key_is_lower_email(
    db: Db, job_dir: Path
) -> None:
    write_pages(
        job_dir / "customers.jsonl",
        [customer("ANN1", email="Ann.Smith@Example.COM", updated_at=at(1))],
        [
            customer("ANN2", email="ann.smith@example.com", updated_at=at(2)),
            customer("BOB", email="bob@example.com", updated_at=at(1)),
        ],
    )
    mapping = "\n".join(
        [
            "[mapping.fields]",
            'email = { path = "email", transform = ["strip", "lower"] }',
            'cl_id = "id"',
            'status = "status"',
            'source_updated_at = "updated_at"',
        ]
    )
    job = erp_job(job_dir, db, key="email", mapping=mapping, sync=erp_sync("max_rejects = 0"))

    summary = sync_ok(job)

    assert (summary["inserted"], summary["duplicates"], summary["rejected"]) == (2, 1, 0)
    rows = {row["email"]: row for row in db.rows(order_by="email")}
    assert sorted(rows) == ["ann.smith@example.com", "bob@example.com"]
    assert rows["ann.smith@example.com"]["cl_id"] == "ANN2"
    [line] = rejects_of(job)
    assert line["stage"] == "dedupe"
    assert (line["source_id"], line["duplicate_of"]) == ("ANN1", "ANN2")
    assert line["key"] == "ann.smith@example.com"


# --- never go backwards -------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(("--full-refresh",), id="full-refresh"),
        pytest.param(("--since", "2026-01-01T00:00:00Z"), id="since"),
    ],
)
def test_older_record_than_the_table_holds_is_counted_stale_and_not_written(
    db: Db, job_dir: Path, flags: tuple[str, ...]
) -> None:
    write_pages(
        job_dir / "customers.jsonl",
        [customer("K", email="new@example.com", status="repeat", updated_at=at(10))],
    )
    job = erp_job(job_dir, db)
    sync_ok(job)

    write_pages(
        job_dir / "customers.jsonl",
        [
            customer("K", email="old@example.com", status="prospect", updated_at=at(5)),
            customer("N", updated_at=at(6)),
        ],
    )
    summary = sync_ok(job, *flags)

    assert (summary["stale"], summary["updated"], summary["inserted"]) == (1, 0, 1)
    row = db.by_key()["CUST-K"]
    assert row["email"] == "new@example.com"
    assert row["status"] == "ACTIVE"
    assert parse_ts(row["source_updated_at"]) == at(10)


def test_at_equal_updated_at_the_incoming_row_wins(sqlite: Db, job_dir: Path) -> None:
    write_pages(
        job_dir / "customers.jsonl", [customer("K", email="one@example.com", updated_at=at(5))]
    )
    job = erp_job(job_dir, sqlite)
    sync_ok(job)

    write_pages(
        job_dir / "customers.jsonl", [customer("K", email="two@example.com", updated_at=at(5))]
    )
    summary = sync_ok(job, "--full-refresh")

    assert (summary["updated"], summary["stale"]) == (1, 0)
    assert sqlite.by_key()["CUST-K"]["email"] == "two@example.com"


# --- environment --------------------------------------------------------------------------


@pytest.mark.parametrize(("environment", "wrong"), [("live", "test"), ("test", "live")])
def test_records_of_the_other_environment_are_rejected_and_records_without_mode_pass(
    sqlite: Db, job_dir: Path, environment: str, wrong: str
) -> None:
    write_pages(
        job_dir / "customers.jsonl",
        [
            customer("RIGHT", mode=environment),
            customer("WRONG", mode=wrong),
            customer("NOMODE", mode=None),
        ],
    )
    job = erp_job(
        job_dir,
        sqlite,
        source=f'path = "customers.jsonl"\nenvironment = "{environment}"',
        sync=erp_sync("max_rejects = 5"),
    )

    summary = sync_ok(job)

    assert (summary["inserted"], summary["rejected"]) == (2, 1)
    assert sorted(sqlite.by_key()) == ["CUST-NOMODE", "CUST-RIGHT"]
    [line] = rejects_of(job)
    assert (line["stage"], line["source_id"]) == ("validate", "WRONG")
    assert [e["field"] for e in line["errors"]] == ["meta.mode"]


# --- exit codes and the --json summary ----------------------------------------------------


def test_successful_run_exits_0_and_ends_with_the_json_summary(sqlite: Db, job_dir: Path) -> None:
    write_pages(job_dir / "customers.jsonl", [customer("A", updated_at=at(1))])
    job = erp_job(job_dir, sqlite)

    result = sync(job)

    assert result.returncode == 0, str(result)
    summary = result.summary
    assert set(summary) == SUMMARY_KEYS
    assert summary["status"] == "ok"
    assert summary["job"] == "erp-nightly"
    assert isinstance(summary["run_id"], str)
    assert summary["watermark"].endswith("Z")
    assert parse_ts(summary["watermark"]) == at(1)
    assert isinstance(summary["duration_s"], int | float)


BAD_JOBS = {
    "unknown-key": (
        {"sync": erp_sync("batchsize = 10")},
        "sync.batchsize",
    ),
    "unset-variable": (
        {"source": 'path = "${CUSTSYNC_TEST_UNSET_FOLDER}/customers.jsonl"'},
        "source.path",
    ),
    "unknown-mapping-path": (
        {"mapping": 'preset = "erp_customer"\n[mapping.fields]\nloyalty = "loyalty_points"'},
        "mapping.fields.loyalty",
    ),
    "unknown-transform": (
        {
            "mapping": 'preset = "erp_customer"\n[mapping.fields]\n'
            'email = { path = "email", transform = "lowercase" }'
        },
        "mapping.fields.email",
    ),
}


@pytest.mark.parametrize("case", [*BAD_JOBS, "missing-target"])
def test_bad_job_file_exits_2_naming_key_and_file_and_writes_nothing(
    sqlite: Db, job_dir: Path, case: str
) -> None:
    write_pages(job_dir / "customers.jsonl", [customer("A")])
    if case == "missing-target":
        job = job_dir / "job.toml"
        job.write_text(
            'name = "erp-nightly"\n\n[source]\nconnector = "file"\npath = "customers.jsonl"\n\n'
            '[mapping]\npreset = "erp_customer"\n',
            encoding="utf-8",
        )
        key = "target"
    else:
        overrides, key = BAD_JOBS[case]
        job = erp_job(job_dir, sqlite, **overrides)

    result = sync(job)

    assert result.returncode == 2, str(result)
    assert f"'{key}'" in result.stderr
    assert "job.toml" in result.stderr
    if case == "unset-variable":
        assert "CUSTSYNC_TEST_UNSET_FOLDER" in result.stderr
    summary = result.summary
    assert set(summary) == SUMMARY_KEYS
    assert summary["status"] == "config_error"
    assert not (job_dir / "target.db").exists()
    assert not (job_dir / ".custsync").exists()


def test_usage_error_exits_2_and_still_ends_with_the_json_summary(job_dir: Path) -> None:
    result = run_cli("sync", "job.toml", "--json", "--limit", "0", cwd=job_dir)

    assert result.returncode == 2, str(result)
    assert set(result.summary) == SUMMARY_KEYS
    assert result.summary["status"] == "config_error"


def test_failed_run_exits_1_and_still_ends_with_the_json_summary(sqlite: Db, job_dir: Path) -> None:
    job = erp_job(job_dir, sqlite, source='path = "no-such-export.jsonl"')

    result = sync(job)

    assert result.returncode == 1, str(result)
    assert set(result.summary) == SUMMARY_KEYS
    assert result.summary["status"] == "failed"
    assert "no-such-export.jsonl" in result.stderr
    assert state_of(job)["watermark"] is None


def test_rejects_over_max_rejects_exit_3_and_the_watermark_still_moves(
    sqlite: Db, job_dir: Path
) -> None:
    write_pages(
        job_dir / "customers.jsonl",
        [customer("A", updated_at=at(1)), customer("B", email="b-at-example", updated_at=at(2))],
        [customer("C", email="c@", updated_at=at(3)), customer("D", updated_at=at(4))],
    )
    job = erp_job(job_dir, sqlite, sync=erp_sync("max_rejects = 1"))

    result = sync(job)

    assert result.returncode == 3, str(result)
    summary = result.summary
    assert set(summary) == SUMMARY_KEYS
    assert summary["status"] == "rejects_exceeded"
    assert_counts_add_up(summary)
    assert (summary["inserted"], summary["rejected"]) == (2, 2)
    assert parse_ts(summary["watermark"]) == at(4)
    assert parse_ts(state_of(job)["watermark"]) == at(4)
    assert sorted(line["source_id"] for line in rejects_of(job)) == ["B", "C"]
    assert sorted(sqlite.by_key()) == ["CUST-A", "CUST-D"]


def hold_lock(job: Path, name: str = "erp-nightly") -> subprocess.Popen[str]:
    """A helper process holding the job's lock, as a concurrent run would."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, default_state_url(job), name],
        cwd=job.parent,
        env=cli_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_run_while_another_holds_the_lock_exits_75_touching_nothing(
    sqlite: Db, job_dir: Path
) -> None:
    write_pages(job_dir / "customers.jsonl", [customer("A", updated_at=at(1))])
    job = erp_job(job_dir, sqlite)
    holder = hold_lock(job)
    try:
        result = sync(job, timeout=30)
        dry = sync(job, "--dry-run", timeout=30)  # a dry run takes no lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    assert result.returncode == 75, str(result)
    summary = result.summary
    assert set(summary) == SUMMARY_KEYS
    assert summary["status"] == "locked"
    assert "erp-nightly" in result.stderr
    assert not sqlite.exists()
    assert rejects_of(job) == []
    state = state_of(job)
    assert (state["watermark"], state["runs"]) == (None, [])
    assert dry.returncode == 0, str(dry)
    assert dry.summary["inserted"] == 1
    # The lock died with its holder: the next run goes ahead.
    assert sync_ok(job)["inserted"] == 1


# --- incremental runs ---------------------------------------------------------------------


def four_customers() -> list[dict[str, Any]]:
    return [customer(c, updated_at=at(n)) for n, c in enumerate("ABCD", start=1)]


def test_second_run_with_nothing_new_writes_nothing(db: Db, job_dir: Path) -> None:
    write_pages(job_dir / "customers.jsonl", four_customers())
    job = erp_job(job_dir, db)
    first = sync_ok(job)
    assert first["inserted"] == 4
    before = db.rows()

    second = sync_ok(job)

    assert (second["inserted"], second["updated"]) == (0, 0)
    # D sits exactly at the watermark: read again, and skipped as the first run wrote it
    assert (second["skipped"], second["unchanged"]) == (4, 0)
    assert db.rows() == before
    assert second["watermark"] == first["watermark"]


def test_run_after_two_records_changed_updates_exactly_those_two(db: Db, job_dir: Path) -> None:
    write_pages(job_dir / "customers.jsonl", four_customers())
    job = erp_job(job_dir, db)
    sync_ok(job)
    before = db.by_key()

    a, b, c, d = four_customers()
    b = customer("B", status="repeat", updated_at=at(5))
    c = customer("C", email="c.new@example.com", updated_at=at(6))
    write_pages(job_dir / "customers.jsonl", [a, b], [c, d])
    summary = sync_ok(job)

    assert summary["updated"] == 2
    assert summary["inserted"] == 0
    after = db.by_key()
    assert {k for k in after if after[k] != before[k]} == {"CUST-B", "CUST-C"}
    assert after["CUST-B"]["status"] == "ACTIVE"
    assert after["CUST-C"]["email"] == "c.new@example.com"
    assert parse_ts(summary["watermark"]) == at(6)


def test_full_refresh_reads_everything_again_and_finds_it_unchanged(
    sqlite: Db, job_dir: Path
) -> None:
    write_pages(job_dir / "customers.jsonl", four_customers())
    job = erp_job(job_dir, sqlite)
    sync_ok(job)

    summary = sync_ok(job, "--full-refresh")

    assert (summary["read"], summary["unchanged"], summary["skipped"]) == (4, 4, 0)


def test_dry_run_on_a_first_run_creates_no_table_and_no_state_yet_reports_inserts(
    sqlite: Db, job_dir: Path
) -> None:
    write_pages(job_dir / "customers.jsonl", [*four_customers(), customer("BAD", email="bad")])
    job = erp_job(job_dir, sqlite, sync=erp_sync("max_rejects = 5"))

    summary = sync_ok(job, "--dry-run")

    assert (summary["inserted"], summary["rejected"]) == (4, 1)
    assert summary["watermark"] is None
    assert not sqlite.exists()
    assert rejects_of(job) == []
    state = state_of(job)
    assert (state["watermark"], state["runs"]) == (None, [])


def test_dry_run_after_a_run_changes_no_row_and_keeps_the_watermark(
    sqlite: Db, job_dir: Path
) -> None:
    write_pages(job_dir / "customers.jsonl", four_customers())
    job = erp_job(job_dir, sqlite)
    watermark = sync_ok(job)["watermark"]
    before = sqlite.rows()
    write_pages(
        job_dir / "customers.jsonl",
        [*four_customers(), customer("B", status="repeat", updated_at=at(5))],
        [customer("E", updated_at=at(6))],
    )

    dry = sync_ok(job, "--dry-run")

    assert (dry["inserted"], dry["updated"]) == (1, 1)
    assert sqlite.rows() == before
    assert state_of(job)["watermark"] is not None
    assert parse_ts(state_of(job)["watermark"]) == parse_ts(watermark)
    real = sync_ok(job)
    assert (real["inserted"], real["updated"]) == (1, 1)


def test_since_reads_only_records_updated_at_or_after_it(sqlite: Db, job_dir: Path) -> None:
    write_pages(job_dir / "customers.jsonl", four_customers())
    job = erp_job(job_dir, sqlite)

    summary = sync_ok(job, "--since", iso(at(2)))

    assert (summary["skipped"], summary["inserted"]) == (1, 3)
    assert sorted(sqlite.by_key()) == ["CUST-B", "CUST-C", "CUST-D"]


def test_limit_stops_after_about_n_records_and_leaves_the_watermark_for_the_rerun(
    sqlite: Db, job_dir: Path
) -> None:
    six = [customer(c, updated_at=at(n)) for n, c in enumerate("ABCDEF", start=1)]
    write_pages(job_dir / "customers.jsonl", six)
    job = erp_job(job_dir, sqlite)

    limited = sync_ok(job, "--limit", "3")

    assert 3 <= limited["read"] < 3 + 2  # stops at the end of the batch that reaches N
    assert sqlite.count() == limited["inserted"] == limited["read"]
    # A file source moves the watermark only once its whole input is committed.
    assert state_of(job)["watermark"] is None
    rerun = sync_ok(job)
    assert rerun["read"] == 6
    assert rerun["inserted"] == 6 - limited["inserted"]
    assert sqlite.count() == 6
    assert parse_ts(rerun["watermark"]) == at(6)


def test_state_show_reports_the_watermark_and_the_runs(sqlite: Db, job_dir: Path) -> None:
    write_pages(job_dir / "customers.jsonl", four_customers())
    job = erp_job(job_dir, sqlite)
    summary = sync_ok(job)

    state = state_of(job)
    text = run_cli("state", "show", str(job), cwd=job_dir)

    assert state["job"] == "erp-nightly"
    assert parse_ts(state["watermark"]) == at(4)
    [run] = state["runs"]
    assert (run["run_id"], run["status"]) == (summary["run_id"], "ok")
    assert run["counts"]["inserted"] == 4
    assert state["remembered_rows"] == 1  # D, at the watermark (the lookback is 0s)
    assert text.returncode == 0
    assert summary["run_id"] in text.stdout
    assert "watermark" in text.stdout
    assert "rows remembered at the watermark: 1" in text.stdout


def test_state_reset_makes_the_next_run_read_everything(sqlite: Db, job_dir: Path) -> None:
    write_pages(job_dir / "customers.jsonl", four_customers())
    job = erp_job(job_dir, sqlite)
    sync_ok(job)

    reset = run_cli("state", "reset", str(job), cwd=job_dir)

    assert reset.returncode == 0, str(reset)
    assert state_of(job)["watermark"] is None
    summary = sync_ok(job)
    assert (summary["skipped"], summary["unchanged"]) == (0, 4)


def test_state_set_watermark_sets_where_the_next_run_starts(sqlite: Db, job_dir: Path) -> None:
    write_pages(job_dir / "customers.jsonl", four_customers())
    job = erp_job(job_dir, sqlite)

    done = run_cli("state", "set", str(job), "--watermark", iso(at(3)), cwd=job_dir)

    assert done.returncode == 0, str(done)
    assert parse_ts(state_of(job)["watermark"]) == at(3)
    summary = sync_ok(job)
    assert (summary["skipped"], summary["inserted"]) == (2, 2)
    assert sorted(sqlite.by_key()) == ["CUST-C", "CUST-D"]


# --- replaying rejects --------------------------------------------------------------------


def test_replaying_a_fixed_reject_inserts_it_and_keeps_the_watermark(
    sqlite: Db, job_dir: Path
) -> None:
    write_pages(
        job_dir / "customers.jsonl",
        [
            customer("A", updated_at=at(3)),
            customer("B", email="b-at-example.com", updated_at=at(1)),
        ],
    )
    job = erp_job(job_dir, sqlite, sync=erp_sync("max_rejects = 5"))
    first = sync_ok(job)
    assert first["rejected"] == 1
    rejects_file = job_dir / ".custsync" / "rejects" / "erp-nightly.jsonl"
    [line] = rejects_of(job)
    line["record"]["email"] = "b@example.com"
    rejects_file.write_text(json.dumps(line) + "\n", encoding="utf-8")

    replay = sync_ok(job, "--from-rejects", str(rejects_file))

    assert (replay["read"], replay["inserted"], replay["rejected"]) == (1, 1, 0)
    assert sqlite.by_key()["CUST-B"]["email"] == "b@example.com"
    assert parse_ts(state_of(job)["watermark"]) == at(3)
    assert parse_ts(replay["watermark"]) == at(3)


def test_replaying_the_jobs_own_rejects_file_with_a_still_bad_record_ends(
    sqlite: Db, job_dir: Path
) -> None:
    write_pages(
        job_dir / "customers.jsonl",
        [customer("A"), customer("B", email="still-bad"), customer("C", email="also-bad")],
    )
    job = erp_job(job_dir, sqlite, sync="batch_size = 1\nmax_rejects = 10")
    assert sync_ok(job)["rejected"] == 2
    rejects_file = job_dir / ".custsync" / "rejects" / "erp-nightly.jsonl"

    try:
        replay = sync(job, "--from-rejects", str(rejects_file), timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("the replay did not end within 10 s")

    assert replay.returncode == 0, str(replay)
    assert (replay.summary["read"], replay.summary["rejected"]) == (2, 2)
    assert len(rejects_of(job)) == 4


# --- secrets ------------------------------------------------------------------------------

PASSWORD = "Tr0ub4dor&3-secret"


def test_customer_password_never_reaches_output_logs_rejects_report_or_table(
    sqlite: Db, job_dir: Path
) -> None:
    write_pages(
        job_dir / "customers.jsonl",
        [
            customer("GOOD", password=PASSWORD, updated_at=at(1)),
            customer("BADMAIL", email="nope", password=PASSWORD, updated_at=at(2)),
        ],
        [customer("BADTYPE", password={"value": PASSWORD}, updated_at=at(3))],
    )
    # flat_customer: every documented customer field, one column each.
    job = erp_job(
        job_dir,
        sqlite,
        key="id",
        mapping='preset = "flat_customer"',
        sync=erp_sync("max_rejects = 5"),
    )

    result = run_cli("-vv", "sync", str(job), "--json", "--report", "report.json", cwd=job_dir)

    assert result.returncode == 0, str(result)
    assert result.summary["rejected"] == 2
    rejects_text = (job_dir / ".custsync" / "rejects" / "erp-nightly.jsonl").read_text("utf-8")
    assert "BADMAIL" in rejects_text
    assert "BADTYPE" in rejects_text
    table_text = repr(sqlite.rows(order_by="id"))
    assert "GOOD" in table_text
    shown = run_cli("state", "show", str(job), cwd=job_dir)
    for where, text in {
        "stdout": result.stdout,
        "stderr": result.stderr,
        "rejects": rejects_text,
        "report": (job_dir / "report.json").read_text("utf-8"),
        "table": table_text,
        "state show": shown.stdout + shown.stderr,
    }.items():
        assert PASSWORD not in text, f"the password leaked into {where}"


def test_password_in_an_unparseable_line_is_not_written_to_the_rejects_file(
    sqlite: Db, job_dir: Path
) -> None:
    source = write_pages(job_dir / "customers.jsonl", [customer("GOOD")])
    broken = json.dumps({"data": [customer("CUT", password=PASSWORD)]})[:-20]
    with source.open("a", encoding="utf-8") as stream:
        stream.write(broken + "\n")
    job = erp_job(job_dir, sqlite, sync=erp_sync("max_rejects = 5"))

    summary = sync_ok(job)

    assert (summary["inserted"], summary["rejected"]) == (1, 1)
    [line] = rejects_of(job)
    assert line["stage"] == "validate"
    assert PASSWORD not in json.dumps(line)


def test_password_hash_kept_in_metadata_never_reaches_the_table(sqlite: Db, job_dir: Path) -> None:
    write_pages(
        job_dir / "customers.jsonl",
        [customer("LEGACY", metadata={"password_hash": "$2b$12$hash-of-a-secret", "tier": "gold"})],
    )
    job = erp_job(job_dir, sqlite, key="id", mapping='preset = "flat_customer"')

    sync_ok(job)

    [row] = sqlite.rows(order_by="id")
    assert "hash-of-a-secret" not in repr(row)
    assert "gold" in repr(row)


# --- paths and logs -----------------------------------------------------------------------


def test_relative_paths_in_the_job_file_resolve_against_its_folder(tmp_path: Path) -> None:
    jobs, elsewhere = tmp_path / "jobs", tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_pages(jobs / "data" / "customers.jsonl", [customer("A"), customer("BAD", email="x")])
    job = write_job(
        jobs,
        url="sqlite:///target.db",
        table="customers",
        source='path = "data/customers.jsonl"',
        sync=erp_sync("max_rejects = 5"),
        extra='[rejects]\npath = "rejects/erp.jsonl"\n\n[state]\nurl = "sqlite:///state/state.db"\n',
    )

    result = run_cli("sync", "../jobs/job.toml", "--json", cwd=elsewhere)

    assert result.returncode == 0, str(result)
    assert (result.summary["inserted"], result.summary["rejected"]) == (1, 1)
    assert sqlite_db(jobs).count() == 1
    assert (jobs / "rejects" / "erp.jsonl").is_file()
    assert (jobs / "state" / "state.db").is_file()
    assert list(elsewhere.iterdir()) == []
    again = run_cli("sync", str(job.relative_to(tmp_path)), "--json", cwd=tmp_path)
    assert again.returncode == 0, str(again)
    # the first run's state is found: A, at its watermark, is skipped as it wrote it
    assert (again.summary["skipped"], again.summary["rejected"]) == (1, 1)


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_json_log_format_makes_stderr_json_lines(sqlite: Db, job_dir: Path) -> None:
    write_pages(job_dir / "customers.jsonl", [customer("A"), customer("BAD", email="x")])
    job = erp_job(job_dir, sqlite, sync=erp_sync("max_rejects = 5"))

    result = run_cli(
        "-v", "sync", str(job), "--json", cwd=job_dir, env={"CUSTSYNC_LOG_FORMAT": "json"}
    )

    assert result.returncode == 0, str(result)
    lines = stderr_lines(result.stderr)
    assert lines, "expected at least one log line"
    for line in lines:
        entry = json.loads(line)
        assert {"ts", "level", "message"} <= set(entry), line


def test_json_log_format_holds_when_the_job_file_is_bad(job_dir: Path) -> None:
    (job_dir / "job.toml").write_text('[source]\nconnector = "file"\n', encoding="utf-8")

    result = run_cli("sync", "job.toml", "--json", cwd=job_dir, env={"CUSTSYNC_LOG_FORMAT": "json"})

    assert result.returncode == 2, str(result)
    lines = stderr_lines(result.stderr)
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert entry["level"] == "error"
        assert "target" in entry["message"]
