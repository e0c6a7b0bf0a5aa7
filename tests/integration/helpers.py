"""Shared helpers for the tests that drive the ``custsync`` command as a user does.

Commerce Layer customers and JSON Lines of API list documents, job files in DESIGN.md's
form, the CLI as a subprocess, and target tables read back on SQLite, PostgreSQL and
MariaDB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

API = "https://acme.commercelayer.io/api"
T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)

# DESIGN.md: the --json summary, for every exit code.
SUMMARY_KEYS = frozenset(
    {
        "job",
        "run_id",
        "status",
        "read",
        "inserted",
        "updated",
        "unchanged",
        "unknown",
        "stale",
        "skipped",
        "duplicates",
        "rejected",
        "watermark",
        "duration_s",
    }
)
OUTCOMES = (
    "inserted",
    "updated",
    "unchanged",
    "unknown",
    "stale",
    "skipped",
    "duplicates",
    "rejected",
)

# Takes a job's lock through custsync.state, says so, then waits to be killed.
HOLD_LOCK = """
import sys, time
from custsync.state import StateStore
url, job = sys.argv[1:3]
with StateStore(url).lock(job):
    print("locked", flush=True)
    time.sleep(300)
"""


# --- records and files -------------------------------------------------------------------


def at(seconds: float = 0) -> datetime:
    """T0 plus some seconds: the instants the tests' records are stamped with."""
    return T0 + timedelta(seconds=seconds)


def iso(moment: datetime) -> str:
    """Commerce Layer's form: UTC, milliseconds, ``Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_ts(value: Any) -> datetime | None:
    """A timestamp as any backend, the state or the summary gives it, as aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert isinstance(value, datetime), value
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def customer(
    cid: str,
    *,
    email: str | None = None,
    updated_at: datetime = T0,
    reference: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    mode: str | None = "live",
    status: str = "prospect",
    **attributes: Any,
) -> dict[str, Any]:
    """A customer as a JSON:API resource object of ``GET /api/customers``.

    ``reference`` defaults to ``CUST-<cid>`` (the erp_customer preset's key); pass
    ``reference=""`` for none. ``mode=None`` leaves ``meta.mode`` out.
    """
    meta: dict[str, Any] = {"organization_id": "QldSlfAlHA"}
    if mode is not None:
        meta["mode"] = mode
    return {
        "id": cid,
        "type": "customers",
        "links": {"self": f"{API}/customers/{cid}"},
        "attributes": {
            "email": email if email is not None else f"{cid.lower()}@example.com",
            "status": status,
            "created_at": iso(T0 - timedelta(days=30)),
            "updated_at": iso(updated_at),
            "reference": f"CUST-{cid}" if reference is None else (reference or None),
            "metadata": dict(metadata or {}),
            **attributes,
        },
        "relationships": {
            "customer_group": {
                "links": {
                    "self": f"{API}/customers/{cid}/relationships/customer_group",
                    "related": f"{API}/customers/{cid}/customer_group",
                },
                "data": None,
            }
        },
        "meta": meta,
    }


def write_pages(path: Path, *pages: Sequence[Mapping[str, Any]]) -> Path:
    """Write each page as one API list document, one a line (JSON Lines)."""
    lines = []
    for number, page in enumerate(pages, start=1):
        document = {
            "data": list(page),
            "included": [],
            "meta": {"record_count": sum(len(p) for p in pages), "page_count": len(pages)},
            "links": {"first": f"{API}/customers?page%5Bnumber%5D=1"},
        }
        if number < len(pages):
            document["links"]["next"] = f"{API}/customers?page%5Bnumber%5D={number + 1}"
        lines.append(json.dumps(document))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_job(
    folder: Path,
    *,
    url: str,
    table: str,
    name: str = "erp-nightly",
    key: str = "customer_no",
    source: str = 'path = "customers.jsonl"',
    mapping: str = 'preset = "erp_customer"',
    sync: str = 'batch_size = 2\nlookback = "0s"',
    extra: str = "",
    file_name: str = "job.toml",
) -> Path:
    """A job file in DESIGN.md's form: a file source, the sql target, a mapping, [sync].

    ``source``, ``mapping``, ``sync`` and ``extra`` are TOML lines for their tables (and
    anything after them).
    """
    text = (
        f'name = "{name}"\n\n'
        f'[source]\nconnector = "file"\n{source}\n\n'
        f'[target]\nconnector = "sql"\nurl = "{url}"\ntable = "{table}"\nkey = "{key}"\n\n'
        f"[mapping]\n{mapping}\n\n"
        f"[sync]\n{sync}\n\n"
        f"{extra}"
    )
    path = folder / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def rejects_of(job_file: Path, name: str = "erp-nightly") -> list[dict[str, Any]]:
    """The lines of a job's rejects file at its default place (none: an empty list)."""
    path = job_file.parent / ".custsync" / "rejects" / f"{name}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def default_state_url(job_file: Path) -> str:
    return f"sqlite:///{job_file.parent / '.custsync' / 'state.db'}"


# --- the command -------------------------------------------------------------------------


@dataclass(frozen=True)
class Cli:
    """One finished ``custsync`` command."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict[str, Any]:
        """The ``--json`` summary: the last line of standard output."""
        lines = self.stdout.strip().splitlines()
        assert lines, f"no standard output; stderr:\n{self.stderr}"
        parsed: dict[str, Any] = json.loads(lines[-1])
        return parsed

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTSYNC_")}
    env.update(extra or {})
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "custsync.cli", *args]


def run_cli(
    *args: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> Cli:
    done = subprocess.run(
        command(*args),
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return Cli(done.returncode, done.stdout, done.stderr)


def sync(job_file: Path, *flags: str, **kwargs: Any) -> Cli:
    """``custsync sync JOB --json FLAGS`` from the job's folder."""
    kwargs.setdefault("cwd", job_file.parent)
    return run_cli("sync", str(job_file), "--json", *flags, **kwargs)


def sync_ok(job_file: Path, *flags: str, **kwargs: Any) -> dict[str, Any]:
    """A sync that must exit 0; its summary, whose counts must add up."""
    result = sync(job_file, *flags, **kwargs)
    assert result.returncode == 0, str(result)
    summary = result.summary
    assert_counts_add_up(summary)
    return summary


def assert_counts_add_up(summary: Mapping[str, Any]) -> None:
    """Every record read lands in exactly one count."""
    assert summary["read"] == sum(summary[name] for name in OUTCOMES), summary


def state_of(job_file: Path) -> dict[str, Any]:
    """``custsync state show JOB --json``."""
    result = run_cli("state", "show", str(job_file), "--json", cwd=job_file.parent)
    assert result.returncode == 0, str(result)
    return result.summary


# --- target tables -----------------------------------------------------------------------


def unique_table(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@dataclass
class Db:
    """A target database: the URL a job file names, and a way to read the table back."""

    job_url: str  # as the job file has it (relative for SQLite)
    url: str  # absolute, to read it from the test
    table: str

    def engine(self) -> sa.Engine:
        return sa.create_engine(self.url)

    def exists(self) -> bool:
        engine = self.engine()
        try:
            return sa.inspect(engine).has_table(self.table)
        finally:
            engine.dispose()

    def rows(self, order_by: str = "customer_no") -> list[dict[str, Any]]:
        """Every row of the table, every column, ordered by the key."""
        engine = self.engine()
        try:
            table = sa.Table(self.table, sa.MetaData(), autoload_with=engine)
            with engine.connect() as conn:
                found = conn.execute(sa.select(table).order_by(table.c[order_by])).mappings()
                return [dict(row) for row in found]
        finally:
            engine.dispose()

    def by_key(self, key: str = "customer_no") -> dict[str, dict[str, Any]]:
        return {row[key]: row for row in self.rows(order_by=key)}

    def count(self) -> int:
        """How many rows the table holds; 0 while it does not exist yet."""
        engine = self.engine()
        try:
            with engine.connect() as conn:
                quoted = engine.dialect.identifier_preparer.quote(self.table)
                return int(conn.execute(sa.text(f"SELECT count(*) FROM {quoted}")).scalar_one())
        except sa.exc.SQLAlchemyError:
            return 0
        finally:
            engine.dispose()

    def drop(self) -> None:
        engine = self.engine()
        try:
            sa.Table(self.table, sa.MetaData()).drop(engine, checkfirst=True)
        finally:
            engine.dispose()


def sqlite_db(folder: Path, table: str = "customers", file_name: str = "target.db") -> Db:
    return Db(f"sqlite:///{file_name}", f"sqlite:///{folder / file_name}", table)


def server_db(url: str, table: str) -> Db:
    return Db(url, url, table)
