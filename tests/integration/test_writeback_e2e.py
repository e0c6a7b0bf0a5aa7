"""[writeback] end to end: a job keyed by the Commerce Layer id writes each row's own id
(an identity column of the SQL target) back into Commerce Layer, only where it is empty."""

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
        server.seed_customers(40, seed=9)
        yield server


def write_job(folder: Path, fake: FakeCommerceLayer, writeback: str) -> None:
    (folder / "job.toml").write_text(
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
url = "sqlite:///erp.db"
table = "customers"
key = "cl_id"
id_column = "erp_no"

[mapping.fields]
cl_id = "id"
email = "email"
source_updated_at = "updated_at"

[writeback]
{writeback}
"""
    )


def cli(folder: Path, *args: str) -> dict[str, object]:
    """``custsync ARGS... --json`` on the folder's job: its last line, parsed."""
    run = subprocess.run(
        [sys.executable, "-m", "custsync.cli", *args, "job.toml", "--json"],
        cwd=folder,
        env={**os.environ, "CL_SECRET": "csecret"},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    summary: dict[str, object] = json.loads(run.stdout.splitlines()[-1])
    return summary


def sync(folder: Path) -> dict[str, object]:
    return cli(folder, "sync")


def erp_numbers(folder: Path) -> dict[str, str]:
    with sqlite3.connect(folder / "erp.db") as db:
        return {cl_id: str(no) for cl_id, no in db.execute("SELECT cl_id, erp_no FROM customers")}


def test_the_erp_number_is_written_into_empty_metadata_keys(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    write_job(tmp_path, fake, 'field = "metadata.erp_no"')
    fake.update_customer(next(iter(fake.customers)), metadata={"erp_no": "KEEP-ME", "tier": "x"})

    sync(tmp_path)

    numbers = erp_numbers(tmp_path)
    kept, *others = list(fake.customers)
    assert fake.customers[kept]["attributes"]["metadata"]["erp_no"] == "KEEP-ME"
    for customer_id in others:
        assert (
            fake.customers[customer_id]["attributes"]["metadata"]["erp_no"] == numbers[customer_id]
        )


def test_the_reference_and_its_origin_are_filled_only_where_empty(
    tmp_path: Path, fake: FakeCommerceLayer
) -> None:
    write_job(tmp_path, fake, 'field = "reference"\norigin = "erp"')
    before = {i: c["attributes"].get("reference") for i, c in fake.customers.items()}

    sync(tmp_path)

    numbers = erp_numbers(tmp_path)
    for customer_id, customer in fake.customers.items():
        attributes = customer["attributes"]
        if before[customer_id]:
            assert attributes["reference"] == before[customer_id]
        else:
            assert attributes["reference"] == numbers[customer_id]
            assert attributes["reference_origin"] == "erp"


def test_a_second_run_writes_nothing_back_again(tmp_path: Path, fake: FakeCommerceLayer) -> None:
    write_job(tmp_path, fake, 'field = "metadata.erp_no"')
    sync(tmp_path)
    patches = sum(r.method == "PATCH" for r in fake.requests)

    sync(tmp_path)

    assert sum(r.method == "PATCH" for r in fake.requests) == patches


def test_a_job_that_writes_back_remembers_no_rows(tmp_path: Path, fake: FakeCommerceLayer) -> None:
    """A record whose id could not be written back is tried again when it is read again:
    it is never skipped as remembered."""
    write_job(tmp_path, fake, 'field = "metadata.erp_no"')
    fake.update_customer(next(iter(fake.customers)), metadata={"tier": "x"})  # just now
    sync(tmp_path)

    state = cli(tmp_path, "state", "show")

    assert state["watermark"] is not None
    assert state["remembered_rows"] == 0
