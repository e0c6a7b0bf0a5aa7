"""Per-job state: the watermark, the source's opaque cursor, the run log and the job's lock.

A few small tables on any SQLAlchemy URL (an SQLite file beside the job file by
default), and a lock per job that dies with its process, so ``kill -9`` never leaves a
stale one. A store in a plain SQLite file is served by ``sqlite3`` alone; any other URL by
SQLAlchemy (``custsync._statedb``), imported only then: a run with nothing to write into
the default store never imports SQLAlchemy (a fifth of a second).
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
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import quote, unquote

from custsync.errors import ConfigError, LockedError, StateError

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


Written = tuple[tuple[str, ...], str]
"""A row a run wrote: its key, and a fingerprint of its values."""


@dataclass(frozen=True)
class JobState:
    """What the store remembers of one job between runs."""

    job: str
    watermark: datetime | None
    """Aware UTC; records updated before (watermark - lookback) are not read again."""
    cursor: dict[str, Any] | None
    """The source's own resume point (opaque JSON), or None."""
    updated_at: datetime | None
    seen: Mapping[datetime, frozenset[Written]] = field(default_factory=dict)
    """Rows the job's last complete run wrote (or found written), by the update time of
    their records, from (watermark - lookback) on: a run reading from there again need
    not compare those records with the target (see ``StateStore.remember``)."""


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


def stamp_text(value: datetime) -> str:
    """A timestamp as the store keeps it in SQLite: fixed-width ISO-8601 UTC with ``Z``,
    so that text order is time order."""
    return _as_utc(value).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def read_time(value: Any) -> datetime | None:
    """A stored timestamp (SQLite's text, or a driver's datetime) as aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"expected a timestamp from the state store, got {type(value)}")
    return _as_utc(value)


def seen_json(seen: Mapping[datetime, Collection[Written]]) -> str:
    return json.dumps(
        {stamp_text(at): sorted(rows) for at, rows in sorted(seen.items()) if rows},
        separators=(",", ":"),
        ensure_ascii=False,
    )


def read_seen(text: str | None) -> dict[datetime, frozenset[Written]]:
    if not text:
        return {}
    seen: dict[datetime, frozenset[Written]] = {}
    for at, rows in json.loads(text).items():
        stamp = read_time(at)
        if stamp is not None:
            seen[stamp] = frozenset((tuple(key), digest) for key, digest in rows)
    return seen


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
    "CREATE TABLE IF NOT EXISTS custsync_seen (job VARCHAR(255) NOT NULL, "
    "seen_json TEXT NOT NULL, PRIMARY KEY (job))",
)
_SQLITE_NAMES = (
    "('custsync_state', 'custsync_runs', 'ix_custsync_runs_job_started', 'custsync_seen')"
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


class Backend(Protocol):
    """What a store's database does; ``StateStore`` checks the arguments and holds locks.
    Two of them: ``_SqliteFile`` here and ``custsync._statedb.SqlAlchemyState``."""

    def get(self, job: str) -> JobState: ...

    def jobs(self) -> tuple[list[JobState], list[str]]:
        """Every job's state, and the jobs in the run log."""
        ...

    def checkpoint(
        self, job: str, watermark: datetime | None, cursor_json: str | None, now: datetime
    ) -> None: ...

    def set_watermark(self, job: str, watermark: datetime | None, now: datetime) -> None: ...

    def reset(self, job: str) -> None: ...

    def remember(self, job: str, seen_json: str) -> None: ...

    def start_run(self, row: Mapping[str, Any]) -> None: ...

    def finish_run(self, run_id: str, values: Mapping[str, Any]) -> int: ...

    def close_abandoned_runs(self, job: str, values: Mapping[str, Any]) -> int: ...

    def runs(self, job: str, limit: int) -> list[RunRecord]: ...

    def close(self) -> None: ...


class _SqliteFile:
    """A store in a plain SQLite file, through ``sqlite3``: the same tables and values
    as SQLAlchemy's (timestamps as ``stamp_text``), each call on a connection of its own,
    each write one short transaction."""

    def __init__(self, path: Path, display: str) -> None:
        self.path = path
        self.display = display
        with self._connection("create its tables") as conn:
            # Looked for first: a store that has its tables takes no write lock to open
            # (another run may hold it; a read-only store can be read).
            found = conn.execute(
                f"SELECT count(*) FROM sqlite_master WHERE name IN {_SQLITE_NAMES}"
            ).fetchone()
            if found != (len(_SQLITE_TABLES),):
                conn.execute("PRAGMA journal_mode=WAL")  # readers beside a writing run
                with _transaction(conn):
                    for statement in _SQLITE_TABLES:
                        conn.execute(statement)

    @contextmanager
    def _connection(self, action: str) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, timeout=_SQLITE_BUSY_TIMEOUT_S, isolation_level=None)
            try:
                conn.execute("PRAGMA synchronous=FULL")  # a checkpoint survives a power cut
                yield conn
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StateError(f"state store {self.display}: could not {action}: {exc}") from exc

    def get(self, job: str) -> JobState:
        with self._connection(f"read the state of job {job!r}") as conn:
            row = conn.execute(_SELECT_STATE + " WHERE s.job = ?", (job,)).fetchone()
        return JobState(job, None, None, None) if row is None else _state_of(row)

    def jobs(self) -> tuple[list[JobState], list[str]]:
        with self._connection("list the jobs") as conn:
            states = [_state_of(row) for row in conn.execute(_SELECT_STATE)]
            logged = [job for (job,) in conn.execute("SELECT DISTINCT job FROM custsync_runs")]
        return states, logged

    def checkpoint(
        self, job: str, watermark: datetime | None, cursor_json: str | None, now: datetime
    ) -> None:
        # One statement compares and sets (the text is fixed-width UTC: its order is time
        # order), so no read can go stale in between.
        later = (
            "CASE WHEN excluded.watermark IS NOT NULL AND (watermark IS NULL "
            "OR watermark < excluded.watermark) THEN excluded.watermark ELSE watermark END"
        )
        self._put(job, watermark, cursor_json, now, later, "checkpoint")

    def set_watermark(self, job: str, watermark: datetime | None, now: datetime) -> None:
        self._put(job, watermark, None, now, "excluded.watermark", "set the watermark")

    def _put(
        self,
        job: str,
        watermark: datetime | None,
        cursor_json: str | None,
        now: datetime,
        new_watermark: str,
        action: str,
    ) -> None:
        new = None if watermark is None else stamp_text(watermark)
        with self._connection(f"{action} of job {job!r}") as conn, _transaction(conn):
            conn.execute(
                "INSERT INTO custsync_state (job, watermark, cursor_json, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (job) DO UPDATE SET "
                f"watermark = {new_watermark}, cursor_json = excluded.cursor_json, "
                "updated_at = excluded.updated_at",
                (job, new, cursor_json, stamp_text(now)),
            )

    def reset(self, job: str) -> None:
        with self._connection(f"reset job {job!r}") as conn, _transaction(conn):
            conn.execute("DELETE FROM custsync_state WHERE job = ?", (job,))
            conn.execute("DELETE FROM custsync_seen WHERE job = ?", (job,))

    def remember(self, job: str, seen_json: str) -> None:
        with self._connection(f"remember the records of job {job!r}") as conn, _transaction(conn):
            conn.execute(
                "INSERT INTO custsync_seen (job, seen_json) VALUES (?, ?) "
                "ON CONFLICT (job) DO UPDATE SET seen_json = excluded.seen_json",
                (job, seen_json),
            )

    def start_run(self, row: Mapping[str, Any]) -> None:
        values = {k: _stored(v) for k, v in row.items()}
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._connection(f"start run {row['run_id']!r}") as conn, _transaction(conn):
            conn.execute(
                f"INSERT INTO custsync_runs ({columns}) VALUES ({marks})", tuple(values.values())
            )

    def finish_run(self, run_id: str, values: Mapping[str, Any]) -> int:
        sets = ", ".join(f"{column} = ?" for column in values)
        params = (*(_stored(v) for v in values.values()), run_id)
        with self._connection(f"finish run {run_id!r}") as conn, _transaction(conn):
            return conn.execute(
                f"UPDATE custsync_runs SET {sets} WHERE run_id = ?", params
            ).rowcount

    def close_abandoned_runs(self, job: str, values: Mapping[str, Any]) -> int:
        sets = ", ".join(f"{column} = ?" for column in values)
        params = (*(_stored(v) for v in values.values()), job)
        with self._connection(f"close abandoned runs of job {job!r}") as conn, _transaction(conn):
            return conn.execute(
                f"UPDATE custsync_runs SET {sets} "
                "WHERE job = ? AND status = 'running' AND dry_run = 0",
                params,
            ).rowcount

    def runs(self, job: str, limit: int) -> list[RunRecord]:
        with self._connection(f"read the runs of job {job!r}") as conn:
            rows = conn.execute(
                "SELECT run_id, job, started_at, ended_at, status, dry_run, counts_json, "
                "watermark_before, watermark_after, error FROM custsync_runs WHERE job = ? "
                "ORDER BY started_at DESC, seq DESC LIMIT ?",
                (job, limit),
            ).fetchall()
        return [_run_of(row) for row in rows]

    def close(self) -> None:
        pass  # nothing is held between calls


_SELECT_STATE = (
    "SELECT s.job, s.watermark, s.cursor_json, s.updated_at, n.seen_json "
    "FROM custsync_state s LEFT JOIN custsync_seen n ON n.job = s.job"
)


def _state_of(row: tuple[Any, ...]) -> JobState:
    job, watermark, cursor_json, updated_at, seen = row
    cursor = None if cursor_json is None else json.loads(cursor_json)
    return JobState(job, read_time(watermark), cursor, read_time(updated_at), read_seen(seen))


def _run_of(row: tuple[Any, ...]) -> RunRecord:
    run_id, job, started_at, ended_at, status, dry_run, counts_json, before, after, error = row
    started = read_time(started_at)
    if started is None:
        raise StateError(f"run {run_id!r} has no start time")
    return RunRecord(
        run_id=run_id,
        job=job,
        started_at=started,
        ended_at=read_time(ended_at),
        status=status,
        dry_run=bool(dry_run),
        counts=json.loads(counts_json),
        watermark_before=read_time(before),
        watermark_after=read_time(after),
        error=error,
    )


def _stored(value: Any) -> Any:
    """A value as SQLAlchemy's types would have bound it on SQLite."""
    if isinstance(value, datetime):
        return stamp_text(value)
    if isinstance(value, bool):
        return int(value)
    return value


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class StateStore:
    """The watermark, cursor, run log and lock of every job, in one SQL database.

    Every public write runs in its own short transaction and is committed before the
    method returns. The tables (``custsync_state``, ``custsync_runs``, ``custsync_seen``)
    are created when absent; nothing is ever dropped.

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
        sqlite_file = plain_sqlite_file(url)
        if sqlite_file is not None:
            self._backend = "sqlite"
            self._display = "sqlite:///" + quote(str(sqlite_file), safe=" +/")
            _make_folder(sqlite_file, self._display)
            self._db: Backend = _SqliteFile(sqlite_file, self._display)
        else:
            from custsync._statedb import SqlAlchemyState

            state = SqlAlchemyState(url)
            self._db, self._backend, self._display = state, state.backend, state.display
            sqlite_file = state.sqlite_file
        if lock_dir is not None:
            self._lock_dir = lock_dir.absolute()
        elif sqlite_file is not None:
            self._lock_dir = sqlite_file.parent
        else:
            url_hash = hashlib.blake2b(self._display.encode(), digest_size=8).hexdigest()
            self._lock_dir = Path(tempfile.gettempdir()) / "custsync-locks" / url_hash

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
        return self._db.get(job)

    def jobs(self) -> list[JobState]:
        """Every job the store knows (from its state or its run log), by name."""
        found, logged = self._db.jobs()
        states = {state.job: state for state in found}
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
        _check_job(job)
        cursor_json = self._dump(cursor, "cursor")
        self._db.checkpoint(job, watermark, cursor_json, self._now())

    def set_watermark(self, job: str, watermark: datetime | None) -> None:
        """Put the watermark anywhere, backwards included (``state set``); clears the cursor."""
        _check_job(job)
        self._db.set_watermark(job, watermark, self._now())

    def reset(self, job: str) -> None:
        """Forget the job's watermark, cursor and remembered records; its run log stays."""
        self._db.reset(job)

    def remember(self, job: str, seen: Mapping[datetime, Collection[Written]]) -> None:
        """Keep rows a complete run wrote (or found written), by the update time of their
        records (``JobState.seen``), in place of those kept before.

        Each one says that the target holds that row as of that time or later, which no
        run of the job makes untrue: a run reading from its watermark again may skip a
        record that would write the same row with the same time instead of comparing it
        with the target."""
        _check_job(job)
        self._db.remember(job, seen_json(seen))

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
        self._db.start_run(
            {
                "run_id": run_id,
                "job": job,
                "started_at": self._now(),
                "status": "running",
                "dry_run": dry_run,
                "counts_json": "{}",
                "watermark_before": watermark_before,
            }
        )

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
        if self._db.finish_run(run_id, values) == 0:
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
        return self._db.close_abandoned_runs(job, values)

    def runs(self, job: str, *, limit: int = 10) -> list[RunRecord]:
        """The job's latest runs, newest first."""
        return self._db.runs(job, max(limit, 0))

    # -- lock ---------------------------------------------------------------------------

    @contextmanager
    def lock(self, job: str) -> Iterator[None]:
        """Hold the job's lock for the block; raises :class:`LockedError` at once if held.

        The lock is released when the block exits, by an exception too, and by the
        operating system or the database server when the process dies.
        """
        _check_job(job)
        held: AbstractContextManager[None]
        if self._backend in ("postgresql", "mysql", "mariadb"):
            from custsync._statedb import SqlAlchemyState

            assert isinstance(self._db, SqlAlchemyState)
            held = self._db.server_lock(job)
        else:
            held = _file_lock(self._lock_dir / _lock_file_name(job), job)
        with held:
            yield

    # -- life cycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the store's connections."""
        self._db.close()

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

    def _now(self) -> datetime:
        return _as_utc(self._clock())

    def _dump(self, value: Mapping[str, Any] | None, what: str) -> str | None:
        if value is None:
            return None
        try:
            return json.dumps(dict(value), separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise StateError(f"the {what} cannot be stored: it is not plain JSON ({exc})") from exc


def _make_folder(sqlite_file: Path, display: str) -> None:
    try:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(
            f"state store {display}: cannot create its folder: {exc.strerror}"
        ) from exc


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
