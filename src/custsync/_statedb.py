"""The state store's tables and connections in SQLAlchemy, for any database URL.

Imported when a store first needs it: a store in a plain SQLite file reads its state and
takes its lock without it (see ``custsync.state``), so a run forks its worker first.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Dialect, Engine
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.types import TypeDecorator, TypeEngine

from custsync.errors import ConfigError, MissingDependencyError
from custsync.state import (
    _MAX_JOB,
    _MAX_RUN_ID,
    _SQLITE_BUSY_TIMEOUT_S,
    JobState,
    _as_utc,
    logger,
    read_time,
)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that round-trips exactly (microseconds, UTC) on every backend.

    SQLite: fixed-width ISO-8601 text ending in ``Z``, so text order is time order;
    PostgreSQL: ``timestamptz``; MySQL/MariaDB: ``DATETIME(6)`` holding UTC.
    """

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.String(27))
        if dialect.name == "postgresql":
            from sqlalchemy.dialects import postgresql

            return dialect.type_descriptor(postgresql.TIMESTAMP(timezone=True))
        if dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects import mysql

            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        utc = _as_utc(value)
        if dialect.name == "sqlite":
            return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
        if dialect.name == "postgresql":
            return utc
        return utc.replace(tzinfo=None)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        return read_time(value)


metadata = sa.MetaData()

state_table = sa.Table(
    "custsync_state",
    metadata,
    sa.Column("job", sa.String(_MAX_JOB), primary_key=True),
    sa.Column("watermark", UtcDateTime(), nullable=True),
    sa.Column("cursor_json", sa.Text(), nullable=True),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
)

runs_table = sa.Table(
    "custsync_runs",
    metadata,
    # seq breaks ties between runs started in the same microsecond (a frozen clock in tests)
    sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(_MAX_RUN_ID), nullable=False, unique=True),
    sa.Column("job", sa.String(_MAX_JOB), nullable=False),
    sa.Column("started_at", UtcDateTime(), nullable=False),
    sa.Column("ended_at", UtcDateTime(), nullable=True),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("dry_run", sa.Boolean(), nullable=False),
    sa.Column("counts_json", sa.Text(), nullable=False),
    sa.Column("watermark_before", UtcDateTime(), nullable=True),
    sa.Column("watermark_after", UtcDateTime(), nullable=True),
    sa.Column("error", sa.Text(), nullable=True),
    sa.Index("ix_custsync_runs_job_started", "job", "started_at"),
)


EXTRAS = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}


def parse_url(url: str) -> URL:
    try:
        return sa.make_url(url)
    except (ArgumentError, ValueError) as exc:
        # The message leaves the URL out: it may carry a password.
        raise ConfigError("the state store URL is not a valid SQLAlchemy URL") from exc


def create_engine(url: URL, display: str) -> Engine:
    backend = url.get_backend_name()
    try:
        if backend == "sqlite":
            engine = sa.create_engine(url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S})
            sa.event.listen(engine, "connect", _on_sqlite_connect)
            return engine
        # pre-ping: a long run touches the store once per batch, and servers drop idle
        # connections (MySQL's wait_timeout) in between.
        return sa.create_engine(url, pool_pre_ping=True)
    except ImportError as exc:
        extra = EXTRAS.get(backend)
        if extra is not None:
            raise MissingDependencyError(f"the state store {display}", extra) from exc
        raise ConfigError(f"the state store {display} needs a missing driver: {exc}") from exc
    except ArgumentError as exc:
        raise ConfigError(f"the state store {display} has an unknown database kind") from exc


def _on_sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets readers (`state show`) run beside a writing run; FULL makes each
        # checkpoint survive a power cut, not just a crash.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def sqlite_file(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    if url.query.get("mode") == "memory":
        return None
    return Path(database).expanduser().absolute()


def job_state(row: sa.Row[Any]) -> JobState:
    cursor = None if row.cursor_json is None else json.loads(row.cursor_json)
    return JobState(row.job, row.watermark, cursor, row.updated_at)


def reason(exc: SQLAlchemyError, password: str | None) -> str:
    # The driver's own message, without SQLAlchemy's statement and parameters (which may
    # hold a source's cursor); first line only, and never the URL's password.
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else type(exc).__name__
    text = (text.strip().splitlines() or [type(exc).__name__])[0]
    if password:
        text = text.replace(password, "***")
    return text


def release_server_lock(
    conn: Connection, release: sa.TextClause, params: dict[str, Any], job: str
) -> None:
    try:
        conn.execute(release, params)
    except SQLAlchemyError:
        # The session is broken; discarding it ends it, and the server frees its locks.
        logger.warning("could not release the lock of job %r; dropping its connection", job)
        conn.invalidate()
    finally:
        conn.close()
