"""`custsync reconcile`: target rows whose customer was deleted in Commerce Layer are
reported, flagged or deleted, as the job's on_deleted says."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakes.commercelayer import FakeCommerceLayer


@pytest.fixture
def fake() -> Iterator[FakeCommerceLayer]:
    with FakeCommerceLayer(mode="live") as server:
        server.seed_customers(60, seed=5)
        yield server


def job_file(folder: Path, fake: FakeCommerceLayer, on_deleted: str) -> Path:
    path = folder / "job.toml"
    path.write_text(
        f"""
[source]
connector = "commercelayer"
base_url = "{fake.base_url}"
auth_url = "{fake.auth_url}"
client_id = "cid"
client_secret = "${{CL_SECRET}}"
requests_per_minute = 6000
burst_per_10s = 1000

[target]
connector = "sql"
url = "sqlite:///out.db"
table = "customers"

[mapping]
preset = "flat_customer"

[sync]
on_deleted = "{on_deleted}"
"""
    )
    return path


def custsync(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "custsync.cli", *args],
        cwd=cwd,
        env={**os.environ, "CL_SECRET": "csecret"},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def synced_with_three_deleted(
    tmp_path: Path, fake: FakeCommerceLayer, on_deleted: str
) -> list[str]:
    job_file(tmp_path, fake, on_deleted)
    assert custsync("sync", "job.toml", cwd=tmp_path).returncode == 0
    gone = sorted(fake.customers)[:3]
    for customer_id in gone:
        fake.delete_customer(customer_id)
    return gone


def rows(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(tmp_path / "out.db") as db:
        return db.execute(sql).fetchall()


def test_report_lists_the_rows_whose_customer_is_gone_and_changes_nothing(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    gone = synced_with_three_deleted(tmp_path, fake, "report")

    run = custsync("reconcile", "job.toml", "--json", cwd=tmp_path)

    summary = json.loads(run.stdout.splitlines()[-1])
    assert (summary["source_ids"], summary["target_rows"], summary["missing"]) == (57, 60, 3)
    assert sorted(summary["examples"]) == gone
    assert rows(tmp_path, "SELECT count(*) FROM customers") == [(60,)]


def test_flag_stamps_a_column_on_the_rows_whose_customer_is_gone(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    gone = synced_with_three_deleted(tmp_path, fake, "flag")

    run = custsync("reconcile", "job.toml", "--json", cwd=tmp_path)

    assert json.loads(run.stdout.splitlines()[-1])["acted"] == 3
    flagged = rows(tmp_path, "SELECT id FROM customers WHERE deleted_in_source_at IS NOT NULL")
    assert sorted(r[0] for r in flagged) == gone


def test_delete_removes_the_rows_whose_customer_is_gone(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    gone = synced_with_three_deleted(tmp_path, fake, "delete")

    custsync("reconcile", "job.toml", cwd=tmp_path)

    remaining = {r[0] for r in rows(tmp_path, "SELECT id FROM customers")}
    assert len(remaining) == 57
    assert not remaining & set(gone)


def test_deleting_most_of_the_table_needs_force(tmp_path: Path, fake: FakeCommerceLayer) -> None:
    synced_with_three_deleted(tmp_path, fake, "delete")
    for customer_id in list(fake.customers)[:40]:
        fake.delete_customer(customer_id)

    refused = custsync("reconcile", "job.toml", cwd=tmp_path)
    forced = custsync("reconcile", "job.toml", "--force", cwd=tmp_path)

    assert refused.returncode == 2
    assert "--force" in refused.stderr
    assert forced.returncode == 0
    assert rows(tmp_path, "SELECT count(*) FROM customers") == [(17,)]


def test_reconcile_of_a_file_source_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        '[source]\nconnector = "file"\npath = "x.jsonl"\n'
        '[target]\nconnector = "sql"\nurl = "sqlite:///out.db"\n'
    )
    (tmp_path / "x.jsonl").write_text("")

    run = custsync("reconcile", "job.toml", cwd=tmp_path)

    assert run.returncode == 2
    assert "commercelayer" in run.stderr
