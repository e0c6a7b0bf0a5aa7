"""Per-job state: the watermark, the source's opaque cursor, the run log and the job's lock.

Two small tables on any SQLAlchemy URL (an SQLite file beside the job file by default),
and a lock per job that dies with its process, so ``kill -9`` never leaves a stale one.
A store in a plain SQLite file is opened, locked and read with ``sqlite3`` alone:
SQLAlchemy (``custsync._statedb``) is imported when the store first writes, so a run's
worker process starts reading before that import, and alongside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from custsync.errors import ConfigError, LockedError, StateError

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Engine

if sys.platform == "win32":
    import msvcrt

    def _try_lock_fd(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except PermissionError as exc:
            raise BlockingIOError(*exc.args) from exc

    def _unlock_fd(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock_fd(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


__all__ = ["RUN_STATUSES", "JobState", "RunRecord", "StateStore", "utcnow"]

logger = logging.getLogger(__name__)

#: The statuses a finished run may end with; a run reads "running" until it finishes.
#: "config_error": the job proved unfit once the run had started (a target table without
#: the key column, say): nothing was written.
RUN_STATUSES = frozenset({"ok", "rejects_exceeded", "failed", "interrupted", "config_error"})

_MAX_JOB = 255
_MAX_RUN_ID = 64
_SQLITE_BUSY_TIMEOUT_S = 30


def utcnow() -> datetime:
    """The current time, aware and in UTC (the store's default clock)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class JobState:
    """What the store remembers of one job between runs."""

    job: str
    watermark: datetime | None
    """Aware UTC; records updated before (watermark - lookback) are not read again."""
    cursor: dict[str, Any] | None
    """The source's own resume point (opaque JSON), or None."""
    updated_at: datetime | None


@dataclass(frozen=True)
class RunRecord:
    """One line of a job's run log."""

    run_id: str
    job: str
    started_at: datetime
    ended_at: datetime | None
    status: str
    """"running" until the run finishes, then one of RUN_STATUSES."""
    dry_run: bool
    counts: dict[str, int]
    watermark_before: datetime | None
    watermark_after: datetime | None
    error: str | None


def _as_utc(value: datetime) -> datetime:
    # A naive datetime is taken to be UTC already: the store never guesses a local zone.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def read_time(value: Any) -> datetime | None:
    """A stored timestamp (SQLite's text, or a driver's datetime) as aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"expected a timestamp from the state store, got {type(value)}")
    return _as_utc(value)


# The tables as SQLAlchemy creates them on SQLite (``_statedb``; a test holds the two
# to the same columns), for a store that opens its file without SQLAlchemy.
_SQLITE_TABLES = (
    "CREATE TABLE IF NOT EXISTS custsync_state (job VARCHAR(255) NOT NULL, "
    "watermark VARCHAR(27), cursor_json TEXT, updated_at VARCHAR(27) NOT NULL, "
    "PRIMARY KEY (job))",
    "CREATE TABLE IF NOT EXISTS custsync_runs (seq INTEGER NOT NULL, "
    "run_id VARCHAR(64) NOT NULL, job VARCHAR(255) NOT NULL, "
    "started_at VARCHAR(27) NOT NULL, ended_at VARCHAR(27), status VARCHAR(32) NOT NULL, "
    "dry_run BOOLEAN NOT NULL, counts_json TEXT NOT NULL, watermark_before VARCHAR(27), "
    "watermark_after VARCHAR(27), error TEXT, PRIMARY KEY (seq), UNIQUE (run_id))",
    "CREATE INDEX IF NOT EXISTS ix_custsync_runs_job_started ON custsync_runs (job, started_at)",
)
_PLAIN_SQLITE_URL = re.compile(r"sqlite(?:\+pysqlite)?:///([^?#]*)")


def plain_sqlite_file(url: str) -> Path | None:
    """The absolute file a plain SQLite URL names (``sqlite:///path``, without a query),
    read as SQLAlchemy reads it; None for any other URL, which SQLAlchemy parses."""
    match = _PLAIN_SQLITE_URL.fullmatch(url)
    if match is None:
        return None
    database = unquote(match[1])
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().absolute()


class StateStore:
    """The watermark, cursor, run log and lock of every job, in one SQL database.

    Every public write runs in its own short transaction and is committed before the
    method returns. The tables (``custsync_state``, ``custsync_runs``) are created when
    absent; nothing is ever dropped.

    Locks never wait: a held lock raises :class:`LockedError` at once. Each dies with its
    process:

    - SQLite: an OS file lock (``flock``) on ``<lock_dir>/<job>.lock``; ``lock_dir``
      defaults to the folder of the database file. The pid written into the file is for
      humans only and is never read back.
    - PostgreSQL: ``pg_try_advisory_lock`` on a connection of its own, held open while
      the lock is held (key: a 63-bit hash of ``"custsync:" + job``).
    - MySQL/MariaDB: ``GET_LOCK(name, 0)`` on a connection of its own; the name holds a
      hash of the database and the job (GET_LOCK names are server-wide, at most 64
      characters and compared case-insensitively) followed by the job's name.
    - any other database: the file lock, in ``lock_dir`` or else a folder in the system
      temp dir. It only keeps out runs on the same machine.
    """

    def __init__(
        self,
        url: str,
        *,
        lock_dir: Path | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._clock = clock
        self._password: str | None = None
        self._engine_: Engine | None = None
        # an absolute path, so a later chdir cannot point the store elsewhere
        self._file = sqlite_file = plain_sqlite_file(url)
        if sqlite_file is not None:
            self._backend = "sqlite"
            self._display = "sqlite:///" + quote(str(sqlite_file), safe=" +/")
        else:
            from custsync import _statedb as db

            parsed = db.parse_url(url)
            self._password = parsed.password
            self._display = parsed.render_as_string(hide_password=True)
            self._backend = parsed.get_backend_name()
            sqlite_file = db.sqlite_file(parsed) if self._backend == "sqlite" else None
            if sqlite_file is not None:
                parsed = parsed.set(database=str(sqlite_file))
                self._display = parsed.render_as_string(hide_password=True)
        if sqlite_file is not None:
            try:
                sqlite_file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StateError(
                    f"state store {self._display}: cannot create its folder: {exc.strerror}"
                ) from exc
        if lock_dir is not None:
            self._lock_dir = lock_dir.absolute()
        elif sqlite_file is not None:
            self._lock_dir = sqlite_file.parent
        else:
            url_hash = hashlib.blake2b(self._display.encode(), digest_size=8).hexdigest()
            self._lock_dir = Path(tempfile.gettempdir()) / "custsync-locks" / url_hash
        if self._file is not None:
            self._create_sqlite_tables()
            return
        engine = self._engine_ = db.create_engine(parsed, self._display)
        self._backend = engine.dialect.name
        try:
            self._create_tables()
        except BaseException:
            engine.dispose()
            raise

    @classmethod
    def for_job_file(cls, job_file: Path) -> StateStore:
        """The default store of a job: SQLite at ``<job dir>/.custsync/state.db``."""
        path = job_file.absolute().parent / ".custsync" / "state.db"
        return cls("sqlite:///" + quote(str(path), safe=" +/"))

    def __repr__(self) -> str:
        return f"StateStore({self._display!r})"

    # -- state --------------------------------------------------------------------------

    def get(self, job: str) -> JobState:
        """The job's state; a job never seen has no watermark, cursor or update time."""
        if self._file is not None:
            return self._sqlite_get(job)
        import sqlalchemy as sa

        from custsync._statedb import job_state, state_table

        with self._failures(f"read the state of job {job!r}"), self._engine.connect() as conn:
            row = conn.execute(sa.select(state_table).where(state_table.c.job == job)).first()
        if row is None:
            return JobState(job, None, None, None)
        return job_state(row)

    def jobs(self) -> list[JobState]:
        """Every job the store knows (from its state or its run log), by name."""
        import sqlalchemy as sa

        from custsync._statedb import job_state, runs_table, state_table

        with self._failures("list the jobs"), self._engine.connect() as conn:
            states = {row.job: job_state(row) for row in conn.execute(sa.select(state_table))}
            logged = conn.execute(sa.select(runs_table.c.job).distinct()).scalars().all()
        for job in logged:
            states.setdefault(job, JobState(job, None, None, None))
        return [states[job] for job in sorted(states)]

    def checkpoint(
        self,
        job: str,
        *,
        watermark: datetime | None,
        cursor: Mapping[str, Any] | None,
    ) -> None:
        """Record progress after the target committed a batch; durable when it returns.

        The watermark never moves backwards here: the store keeps the later of the old
        and the new one, and a new ``None`` keeps the old one. The cursor is replaced as
        given (``None`` clears it).
        """
        import sqlalchemy as sa

        from custsync._statedb import UtcDateTime, state_table

        _check_job(job)
        cursor_json = self._dump(cursor, "cursor")
        updates: dict[str, Any] = {"cursor_json": cursor_json, "updated_at": self._now()}
        if watermark is not None:
            new = sa.literal(_as_utc(watermark), UtcDateTime())
            old = state_table.c.watermark
            # One statement compares and sets, so no read can go stale in between.
            updates["watermark"] = sa.case((sa.or_(old.is_(None), old < new), new), else_=old)
        inserts = {**updates, "watermark": watermark}
        self._upsert(job, updates, inserts, "checkpoint")

    def set_watermark(self, job: str, watermark: datetime | None) -> None:
        """Put the watermark anywhere, backwards included (``state set``); clears the cursor."""
        _check_job(job)
        values = {"watermark": watermark, "cursor_json": None, "updated_at": self._now()}
        self._upsert(job, values, values, "set the watermark")

    def reset(self, job: str) -> None:
        """Forget the job's watermark and cursor; its run log stays."""
        import sqlalchemy as sa

        from custsync._statedb import state_table

        with self._failures(f"reset job {job!r}"), self._engine.begin() as conn:
            conn.execute(sa.delete(state_table).where(state_table.c.job == job))

    # -- run log ------------------------------------------------------------------------

    def start_run(
        self,
        job: str,
        *,
        run_id: str,
        dry_run: bool,
        watermark_before: datetime | None,
    ) -> None:
        """Log a run as "running"; ``run_id`` must be new (at most 64 characters)."""
        _check_job(job)
        if not run_id or len(run_id) > _MAX_RUN_ID:
            raise ValueError(f"a run id has 1 to {_MAX_RUN_ID} characters, got {len(run_id)}")
        row = {
            "run_id": run_id,
            "job": job,
            "started_at": self._now(),
            "status": "running",
            "dry_run": dry_run,
            "counts_json": "{}",
            "watermark_before": watermark_before,
        }
        import sqlalchemy as sa

        from custsync._statedb import runs_table

        with self._failures(f"start run {run_id!r} of job {job!r}"), self._engine.begin() as conn:
            conn.execute(sa.insert(runs_table).values(row))

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        counts: Mapping[str, int],
        watermark_after: datetime | None,
        error: str | None = None,
    ) -> None:
        """Close a logged run with its outcome (one of ``RUN_STATUSES``) and counts."""
        if status not in RUN_STATUSES:
            raise ValueError(f"a run finishes as one of {sorted(RUN_STATUSES)}, not {status!r}")
        values = {
            "ended_at": self._now(),
            "status": status,
            "counts_json": self._dump(dict(counts), "counts"),
            "watermark_after": watermark_after,
            "error": error,
        }
        import sqlalchemy as sa

        from custsync._statedb import runs_table

        with self._failures(f"finish run {run_id!r}"), self._engine.begin() as conn:
            result = conn.execute(
                sa.update(runs_table).where(runs_table.c.run_id == run_id).values(values)
            )
            found = result.rowcount
        if found == 0:
            raise StateError(f"state store {self._display}: no run {run_id!r} was started")

    def close_abandoned_runs(self, job: str) -> int:
        """Mark the job's runs still "running" as failed: call it holding the job's lock,
        when no other run can be alive (a ``kill -9`` never got to ``finish_run``)."""
        _check_job(job)
        values = {
            "ended_at": self._now(),
            "status": "failed",
            "error": "the run ended without finishing (the process was killed or crashed)",
        }
        import sqlalchemy as sa

        from custsync._statedb import runs_table

        runs = runs_table.c
        with self._failures(f"close abandoned runs of job {job!r}"), self._engine.begin() as conn:
            result = conn.execute(
                sa.update(runs_table)
                .where(runs.job == job, runs.status == "running", runs.dry_run.is_(False))
                .values(values)
            )
            return int(result.rowcount or 0)

    def runs(self, job: str, *, limit: int = 10) -> list[RunRecord]:
        """The job's latest runs, newest first."""
        import sqlalchemy as sa

        from custsync._statedb import runs_table

        query = (
            sa.select(runs_table)
            .where(runs_table.c.job == job)
            .order_by(runs_table.c.started_at.desc(), runs_table.c.seq.desc())
            .limit(max(limit, 0))
        )
        with self._failures(f"read the runs of job {job!r}"), self._engine.connect() as conn:
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

    # -- lock ---------------------------------------------------------------------------

    @contextmanager
    def lock(self, job: str) -> Iterator[None]:
        """Hold the job's lock for the block; raises :class:`LockedError` at once if held.

        The lock is released when the block exits, by an exception too, and by the
        operating system or the database server when the process dies.
        """
        _check_job(job)
        backend = self._backend
        held: AbstractContextManager[None]
        if backend == "postgresql":
            import sqlalchemy as sa

            key = _pg_lock_key(job)
            held = self._server_lock(
                job,
                sa.text("SELECT pg_try_advisory_lock(CAST(:key AS BIGINT))"),
                sa.text("SELECT pg_advisory_unlock(CAST(:key AS BIGINT))"),
                {"key": key},
            )
        elif backend in ("mysql", "mariadb"):
            import sqlalchemy as sa

            name = _mysql_lock_name(self._engine.url.database or "", job)
            held = self._server_lock(
                job,
                sa.text("SELECT GET_LOCK(:name, 0)"),
                sa.text("SELECT RELEASE_LOCK(:name)"),
                {"name": name},
            )
        else:
            held = _file_lock(self._lock_dir / _lock_file_name(job), job)
        with held:
            yield

    @contextmanager
    def _server_lock(
        self,
        job: str,
        acquire: sa.TextClause,
        release: sa.TextClause,
        params: dict[str, Any],
    ) -> Iterator[None]:
        # A session-level lock on a connection of its own, in autocommit so the session
        # never sits idle in a transaction while the run goes on.
        with self._failures(f"lock job {job!r}"):
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
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
            from custsync._statedb import release_server_lock

            release_server_lock(conn, release, params, job)

    # -- life cycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the store's connections."""
        if self._engine_ is not None:
            self._engine_.dispose()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------

    @property
    def _engine(self) -> Engine:
        """SQLAlchemy's engine, made when first needed (at once for any store but a plain
        SQLite file, whose tables ``_create_sqlite_tables`` made)."""
        if self._engine_ is None:
            from sqlalchemy.engine import URL

            from custsync._statedb import create_engine

            url = URL.create("sqlite", database=str(self._file))
            self._engine_ = create_engine(url, self._display)
        return self._engine_

    def _sqlite(self) -> sqlite3.Connection:
        assert self._file is not None
        return sqlite3.connect(self._file, timeout=_SQLITE_BUSY_TIMEOUT_S, isolation_level=None)

    def _create_sqlite_tables(self) -> None:
        try:
            conn = self._sqlite()
            try:
                # Looked for first: a store that has its tables takes no write lock to
                # open (another run may hold it; a read-only store can be read).
                found = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE name IN "
                    "('custsync_state', 'custsync_runs', 'ix_custsync_runs_job_started')"
                ).fetchone()
                if found != (len(_SQLITE_TABLES),):
                    conn.execute("PRAGMA journal_mode=WAL")  # as the engine's connections do
                    conn.execute("BEGIN IMMEDIATE")
                    for statement in _SQLITE_TABLES:
                        conn.execute(statement)
                    conn.execute("COMMIT")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StateError(
                f"state store {self._display}: could not create its tables: {exc}"
            ) from exc

    def _sqlite_get(self, job: str) -> JobState:
        try:
            conn = self._sqlite()
            try:
                row = conn.execute(
                    "SELECT watermark, cursor_json, updated_at FROM custsync_state WHERE job = ?",
                    (job,),
                ).fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StateError(
                f"state store {self._display}: could not read the state of job {job!r}: {exc}"
            ) from exc
        if row is None:
            return JobState(job, None, None, None)
        watermark, cursor_json, updated_at = row
        cursor = None if cursor_json is None else json.loads(cursor_json)
        return JobState(job, read_time(watermark), cursor, read_time(updated_at))

    def _now(self) -> datetime:
        return _as_utc(self._clock())

    def _dump(self, value: Mapping[str, Any] | None, what: str) -> str | None:
        if value is None:
            return None
        try:
            return json.dumps(dict(value), separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise StateError(f"the {what} cannot be stored: it is not plain JSON ({exc})") from exc

    def _upsert(
        self,
        job: str,
        updates: Mapping[str, Any],
        inserts: Mapping[str, Any],
        action: str,
    ) -> None:
        # Update, else insert: portable across dialects. Two writers inserting the same
        # new job at once make one of them fail on the primary key; its retry updates.
        import sqlalchemy as sa
        from sqlalchemy.exc import IntegrityError

        from custsync._statedb import state_table

        with self._failures(f"{action} of job {job!r}"):
            for attempt in (1, 2):
                try:
                    with self._engine.begin() as conn:
                        stmt = (
                            sa.update(state_table)
                            .where(state_table.c.job == job)
                            .values(dict(updates))
                        )
                        if conn.execute(stmt).rowcount == 0:
                            conn.execute(sa.insert(state_table).values(job=job, **inserts))
                    return
                except IntegrityError:
                    if attempt == 2:
                        raise

    def _create_tables(self) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        from custsync._statedb import metadata, runs_table, state_table

        if self._backend in ("mysql", "mariadb"):
            # utf8mb4_bin on MySQL/MariaDB: job names are case-sensitive identifiers, and
            # the default *_ci collations would make "ERP" and "erp" the same primary key.
            # Set here, not in the definitions: naming a dialect's options loads it, and a
            # run on SQLite should not pay for importing MySQL's dialect.
            for table in (state_table, runs_table):
                table.dialect_kwargs.update(mysql_charset="utf8mb4", mysql_collate="utf8mb4_bin")
        with self._failures("create its tables"):
            try:
                metadata.create_all(self._engine)
            except SQLAlchemyError:
                # Another process may have created them between the check and the CREATE.
                metadata.create_all(self._engine)

    @contextmanager
    def _failures(self, action: str) -> Iterator[None]:
        from sqlalchemy.exc import SQLAlchemyError

        from custsync._statedb import reason as _reason

        try:
            yield
        except SQLAlchemyError as exc:
            reason = _reason(exc, self._password)
            raise StateError(f"state store {self._display}: could not {action}: {reason}") from exc


def _check_job(job: str) -> None:
    if not job or len(job) > _MAX_JOB:
        raise ConfigError(f"a job name has 1 to {_MAX_JOB} characters, got {len(job)}", key="name")


def _pg_lock_key(job: str) -> int:
    digest = hashlib.blake2b(f"custsync:{job}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: always a positive bigint


def _mysql_lock_name(database: str, job: str) -> str:
    # GET_LOCK names are server-wide, compared case-insensitively and at most 64
    # characters: the hash tells databases and jobs apart, the job's name is for humans.
    digest = hashlib.blake2b(f"{database}\0{job}".encode(), digest_size=8).hexdigest()
    return f"custsync:{digest}:{job}"[:64]


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _lock_file_name(job: str) -> str:
    if _SAFE_NAME.fullmatch(job):
        return f"{job}.lock"
    # Unsafe characters become "_"; the hash keeps "a/b" and "a_b" apart.
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", job)[:80].lstrip(".")
    digest = hashlib.blake2b(job.encode(), digest_size=6).hexdigest()
    return f"{safe}-{digest}.lock"


@contextmanager
def _file_lock(path: Path, job: str) -> Iterator[None]:
    # The lock file is never deleted: removing it would let a second process lock a new
    # file while a third still holds the old one.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StateError(f"cannot open the lock file {path}: {exc.strerror}") from exc
    try:
        _try_lock_fd(fd)
    except BlockingIOError:
        os.close(fd)
        raise LockedError(job) from None
    except OSError as exc:
        os.close(fd)
        raise StateError(f"cannot lock {path}: {exc.strerror}") from exc
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # the pid is a courtesy to humans; the lock holds without it
        yield
    finally:
        try:
            # Unlock explicitly: a forked child sharing the descriptor must not keep it.
            _unlock_fd(fd)
        finally:
            os.close(fd)
