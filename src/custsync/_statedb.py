"""The state store in SQLAlchemy, for any database URL but a plain SQLite file (which
``custsync.state`` serves with ``sqlite3``): imported only by a store that needs it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Dialect, Engine
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.types import TypeDecorator, TypeEngine

from custsync.errors import ConfigError, LockedError, MissingDependencyError, StateError
from custsync.state import (
    _MAX_JOB,
    _MAX_RUN_ID,
    _SQLITE_BUSY_TIMEOUT_S,
    JobState,
    RunRecord,
    _as_utc,
    _make_folder,
    _mysql_lock_name,
    _pg_lock_key,
    logger,
    read_seen,
    read_time,
    stamp_text,
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
            return stamp_text(utc)
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

seen_table = sa.Table(
    "custsync_seen",
    metadata,
    sa.Column("job", sa.String(_MAX_JOB), primary_key=True),
    sa.Column("seen_json", sa.Text(), nullable=False),
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
    return JobState(row.job, row.watermark, cursor, row.updated_at, read_seen(row.seen_json))


_SELECT_STATE = sa.select(state_table, seen_table.c.seen_json).outerjoin(
    seen_table, seen_table.c.job == state_table.c.job
)


class SqlAlchemyState:
    """A store on any SQLAlchemy URL (``custsync.state.Backend``), with the server's own
    locks on PostgreSQL and MariaDB/MySQL (``server_lock``)."""

    def __init__(self, url: str) -> None:
        parsed = parse_url(url)
        self.password = parsed.password
        self.display = parsed.render_as_string(hide_password=True)
        self.sqlite_file = sqlite_file(parsed) if parsed.get_backend_name() == "sqlite" else None
        if self.sqlite_file is not None:
            # an absolute path, so a later chdir cannot point the store elsewhere
            parsed = parsed.set(database=str(self.sqlite_file))
            self.display = parsed.render_as_string(hide_password=True)
            _make_folder(self.sqlite_file, self.display)
        self.engine = create_engine(parsed, self.display)
        self.backend = self.engine.dialect.name
        try:
            self._create_tables()
        except BaseException:
            self.engine.dispose()
            raise

    def get(self, job: str) -> JobState:
        with self._failures(f"read the state of job {job!r}"), self.engine.connect() as conn:
            row = conn.execute(_SELECT_STATE.where(state_table.c.job == job)).first()
        return JobState(job, None, None, None) if row is None else job_state(row)

    def jobs(self) -> tuple[list[JobState], list[str]]:
        with self._failures("list the jobs"), self.engine.connect() as conn:
            states = [job_state(row) for row in conn.execute(_SELECT_STATE)]
            logged = list(conn.execute(sa.select(runs_table.c.job).distinct()).scalars())
        return states, logged

    def checkpoint(
        self, job: str, watermark: datetime | None, cursor_json: str | None, now: datetime
    ) -> None:
        updates: dict[str, Any] = {"cursor_json": cursor_json, "updated_at": now}
        if watermark is not None:
            new = sa.literal(_as_utc(watermark), UtcDateTime())
            old = state_table.c.watermark
            # One statement compares and sets, so no read can go stale in between.
            updates["watermark"] = sa.case((sa.or_(old.is_(None), old < new), new), else_=old)
        self._upsert(job, updates, {**updates, "watermark": watermark}, "checkpoint")

    def set_watermark(self, job: str, watermark: datetime | None, now: datetime) -> None:
        values = {"watermark": watermark, "cursor_json": None, "updated_at": now}
        self._upsert(job, values, values, "set the watermark")

    def reset(self, job: str) -> None:
        with self._failures(f"reset job {job!r}"), self.engine.begin() as conn:
            conn.execute(sa.delete(state_table).where(state_table.c.job == job))
            conn.execute(sa.delete(seen_table).where(seen_table.c.job == job))

    def remember(self, job: str, seen_json: str) -> None:
        action = f"remember the records of job {job!r}"
        with self._failures(action), self.engine.begin() as conn:
            update = sa.update(seen_table).where(seen_table.c.job == job)
            if conn.execute(update.values(seen_json=seen_json)).rowcount == 0:
                conn.execute(sa.insert(seen_table).values(job=job, seen_json=seen_json))

    def start_run(self, row: Mapping[str, Any]) -> None:
        with self._failures(f"start run {row['run_id']!r}"), self.engine.begin() as conn:
            conn.execute(sa.insert(runs_table).values(dict(row)))

    def finish_run(self, run_id: str, values: Mapping[str, Any]) -> int:
        with self._failures(f"finish run {run_id!r}"), self.engine.begin() as conn:
            update = sa.update(runs_table).where(runs_table.c.run_id == run_id)
            return int(conn.execute(update.values(dict(values))).rowcount or 0)

    def close_abandoned_runs(self, job: str, values: Mapping[str, Any]) -> int:
        runs = runs_table.c
        with self._failures(f"close abandoned runs of job {job!r}"), self.engine.begin() as conn:
            result = conn.execute(
                sa.update(runs_table)
                .where(runs.job == job, runs.status == "running", runs.dry_run.is_(False))
                .values(dict(values))
            )
            return int(result.rowcount or 0)

    def runs(self, job: str, limit: int) -> list[RunRecord]:
        query = (
            sa.select(runs_table)
            .where(runs_table.c.job == job)
            .order_by(runs_table.c.started_at.desc(), runs_table.c.seq.desc())
            .limit(limit)
        )
        with self._failures(f"read the runs of job {job!r}"), self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            RunRecord(
                run_id=row.run_id,
                job=row.job,
                started_at=row.started_at,
                ended_at=row.ended_at,
                status=row.status,
                dry_run=bool(row.dry_run),
                counts=json.loads(row.counts_json),
                watermark_before=row.watermark_before,
                watermark_after=row.watermark_after,
                error=row.error,
            )
            for row in rows
        ]

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def server_lock(self, job: str) -> Iterator[None]:
        """PostgreSQL's advisory lock or MariaDB/MySQL's GET_LOCK on a connection of its
        own, in autocommit so the session never sits idle in a transaction meanwhile."""
        if self.backend == "postgresql":
            params: dict[str, Any] = {"key": _pg_lock_key(job)}
            acquire = sa.text("SELECT pg_try_advisory_lock(CAST(:key AS BIGINT))")
            release = sa.text("SELECT pg_advisory_unlock(CAST(:key AS BIGINT))")
        else:
            params = {"name": _mysql_lock_name(self.engine.url.database or "", job)}
            acquire = sa.text("SELECT GET_LOCK(:name, 0)")
            release = sa.text("SELECT RELEASE_LOCK(:name)")
        with self._failures(f"lock job {job!r}"):
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                got = conn.execute(acquire, params).scalar()
            except BaseException:
                conn.invalidate()
                conn.close()
                raise
        if got != 1:
            conn.close()
            raise LockedError(job)
        try:
            yield
        finally:
            release_server_lock(conn, release, params, job)

    def _upsert(
        self, job: str, updates: Mapping[str, Any], inserts: Mapping[str, Any], action: str
    ) -> None:
        # Update, else insert: portable across dialects. Two writers inserting the same
        # new job at once make one of them fail on the primary key; its retry updates.
        with self._failures(f"{action} of job {job!r}"):
            for attempt in (1, 2):
                try:
                    with self.engine.begin() as conn:
                        stmt = sa.update(state_table).where(state_table.c.job == job)
                        if conn.execute(stmt.values(dict(updates))).rowcount == 0:
                            conn.execute(sa.insert(state_table).values(job=job, **inserts))
                    return
                except IntegrityError:
                    if attempt == 2:
                        raise

    def _create_tables(self) -> None:
        if self.backend in ("mysql", "mariadb"):
            # utf8mb4_bin on MySQL/MariaDB: job names are case-sensitive identifiers, and
            # the default *_ci collations would make "ERP" and "erp" the same primary key.
            # Set here, not in the definitions: naming a dialect's options loads it, and a
            # run on SQLite should not pay for importing MySQL's dialect.
            for table in (state_table, runs_table, seen_table):
                table.dialect_kwargs.update(mysql_charset="utf8mb4", mysql_collate="utf8mb4_bin")
        with self._failures("create its tables"):
            try:
                metadata.create_all(self.engine)
            except SQLAlchemyError:
                # Another process may have created them between the check and the CREATE.
                metadata.create_all(self.engine)

    @contextmanager
    def _failures(self, action: str) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as exc:
            text = reason(exc, self.password)
            raise StateError(f"state store {self.display}: could not {action}: {text}") from exc


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
