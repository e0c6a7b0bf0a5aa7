"""The run: source -> validate -> map -> dedupe -> upsert -> checkpoint.

Only this module knows all the stages. A run takes the job's lock, reads the state,
streams batches through the stages, and records progress only after the target has
committed a batch: an ordered source checkpoints inside a read, an unordered one (files)
moves the watermark once its whole input is committed. Whatever stops a run, a re-run
ends with the target a clean run would have left.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import heapq
import logging
import mmap
import os
import pickle
import shutil
import signal
import struct
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, cast

import orjson

from custsync import plugins
from custsync.config import JobConfig, build_job, load_job_file
from custsync.dedupe import Candidate, Ledger, PackedRecord, PackedRecords, Resolution
from custsync.errors import (
    ConfigError,
    CustsyncError,
    FieldError,
    LockedError,
    RecordError,
)
from custsync.mapping import RecordFailure, is_empty
from custsync.model import normalize, parse_timestamp, validate_records
from custsync.rejects import Reject, RejectsWriter, Stage, read_rejects
from custsync.sources.base import (
    Checkpoint,
    LookbackAware,
    Projectable,
    RawRecord,
    Source,
    SourceBatch,
)
from custsync.state import StateStore, Written
from custsync.targets.base import (
    HasRowCodec,
    Key,
    Outcome,
    Previewable,
    Row,
    RowCodec,
    RowResult,
    RowSchema,
    Target,
    Transactional,
)

log = logging.getLogger("custsync")

COUNTS = (
    "read",
    "inserted",
    "updated",
    "unchanged",
    "unknown",
    "stale",
    "skipped",
    "duplicates",
    "rejected",
)
EXIT_CODES = {
    "ok": 0,
    "failed": 1,
    "interrupted": 1,
    "config_error": 2,
    "rejects_exceeded": 3,
    "locked": 75,
}


@dataclass
class RunResult:
    """What a run did. Every record read lands in exactly one of the counts."""

    job: str
    run_id: str | None
    status: str
    read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    unknown: int = 0
    stale: int = 0
    skipped: int = 0
    duplicates: int = 0
    rejected: int = 0
    watermark: datetime | None = None
    duration_s: float = 0.0
    dry_run: bool = False
    error: str | None = None
    rejects_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.status, 1)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def counts(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in COUNTS}

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` summary: DESIGN.md's keys, in its order."""
        return {
            "job": self.job,
            "run_id": self.run_id,
            "status": self.status,
            **self.counts(),
            "watermark": _iso(self.watermark),
            "duration_s": round(self.duration_s, 3),
        }

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts().items() if v)
        dry = " dry_run" if self.dry_run else ""
        return f"<RunResult {self.job} {self.status}{dry}: {counts or 'nothing read'}>"

    def _repr_html_(self) -> str:
        cells = "".join(f"<td>{v}</td>" for v in self.counts().values())
        heads = "".join(f"<th>{k}</th>" for k in COUNTS)
        return (
            f"<p><b>{self.job}</b>: {self.status}{' (dry run)' if self.dry_run else ''}, "
            f"watermark {_iso(self.watermark)}</p><table><tr>{heads}</tr><tr>{cells}</tr></table>"
        )


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


Progress = Callable[[Mapping[str, int]], None]


class Job:
    """A sync job: ``Job.from_file("job.toml").run()``."""

    def __init__(self, config: JobConfig) -> None:
        self.config = config

    @classmethod
    def from_file(cls, path: str | Path, *, env: Mapping[str, str] | None = None) -> Job:
        return cls(load_job_file(path, env=env))

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, base_dir: str | Path | None = None, name: str = "job"
    ) -> Job:
        """The job file's structure as a dict; relative paths resolve against ``base_dir``
        (default: the current folder)."""
        folder = Path(base_dir) if base_dir is not None else Path.cwd()
        return cls(build_job(data, base_dir=folder.resolve(), default_name=name))

    @property
    def name(self) -> str:
        return self.config.name

    def __repr__(self) -> str:
        c = self.config
        return (
            f"<Job {c.name}: {c.source.connector} -> {c.target.connector} "
            f"({c.mapping.name}, key {', '.join(c.schema_.key)})>"
        )

    def state_store(self) -> StateStore:
        return StateStore(self.config.state_url)

    def make_source(self) -> Source:
        connector = plugins.find("source", self.config.source.connector)
        return cast(Source, connector.factory(self.config.source, base_dir=self.config.base_dir))

    def make_target(self) -> Target:
        connector = plugins.find("target", self.config.target.connector)
        return cast(Target, connector.factory(self.config.target, base_dir=self.config.base_dir))

    def run(
        self,
        *,
        dry_run: bool = False,
        full_refresh: bool = False,
        since: datetime | None = None,
        limit: int | None = None,
        from_rejects: str | Path | None = None,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> RunResult:
        """Run the job once. Never raises for a run that started: the result says how it
        ended (``status``, ``exit_code``, ``error``). A bad job raised at load already."""
        run = _Run(
            self,
            dry_run=dry_run,
            full_refresh=full_refresh,
            since=since,
            limit=limit,
            from_rejects=Path(from_rejects) if from_rejects is not None else None,
            progress=progress,
            stop=stop or threading.Event(),
        )
        return run.execute()


class _ReplaySource:
    """Records of a rejects file, for ``--from-rejects``: they are Customer-shaped already
    (after any inbound mapping), so they go straight to validation."""

    local = True  # see ``Source``

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(
        self, *, since: datetime | None, cursor: Mapping[str, Any] | None, batch_size: int
    ) -> Iterator[SourceBatch]:
        batch: list[RawRecord] = []
        for number, line in read_rejects(self.path):
            record = line.get("record")
            origin = f"{self.path.name}:{number}"
            if not isinstance(record, dict):
                continue
            if "_raw" in record and len(record) == 1:
                batch.append(RawRecord(record, origin, error="unparsed input, fix it in the file"))
            else:
                batch.append(RawRecord(normalize(record), origin))
            if len(batch) >= batch_size:
                yield SourceBatch(batch)
                batch = []
        if batch:
            yield SourceBatch(batch)

    def close(self) -> None:
        pass


@dataclass(slots=True)
class _Prepared:
    """One batch through ``_Run._prepare``: what the writer's side applies."""

    read: int
    skipped: int
    notes: list[str]
    checkpoint: Checkpoint | None
    rejects: list[Reject] = field(default_factory=list)  # validate and map, in read order
    candidates: list[Candidate] = field(default_factory=list)  # numbered by the writer
    max_seen: datetime | None = None

    def extend(self, rest: _Prepared) -> None:
        """Take in the batch's records after these (prepared apart, see ``_work``)."""
        self.read += rest.read
        self.skipped += rest.skipped
        self.notes += rest.notes
        self.checkpoint = rest.checkpoint if rest.checkpoint is not None else self.checkpoint
        self.rejects += rest.rejects
        self.candidates += rest.candidates
        if self.max_seen is None or (rest.max_seen is not None and rest.max_seen > self.max_seen):
            self.max_seen = rest.max_seen

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled by column (a parallel run sends every batch through a pipe): lists of
        keys, timestamps, ids and rows, and a stretch's records as their one pack, take
        half the time of a pickle per ``Candidate`` to write and read back."""
        candidates = self.candidates
        columns: tuple[Any, ...] | None = None
        if candidates:
            records: Any = [c.record for c in candidates]
            first = records[0]
            if first.__class__ is PackedRecord and all(
                r.__class__ is PackedRecord and r.pack is first.pack and r.item == i
                for i, r in enumerate(records)
            ):
                records = first.pack  # the stretch's, in order (``_work`` packs them so)
            columns = (
                [c.key for c in candidates],
                [c.ts for c in candidates],
                [c.source_id for c in candidates],
                records,
                [c.row for c in candidates],
                # Numbered and written by the writer only: set here only if pickled after.
                [(c.seq, c.outcome) for c in candidates]
                if any(c.seq or c.outcome is not None for c in candidates)
                else None,
            )
        head = (self.read, self.skipped, self.notes, self.checkpoint, self.rejects, self.max_seen)
        return (_unpickle_prepared, (head, columns))


def _unpickle_prepared(head: tuple[Any, ...], columns: tuple[Any, ...] | None) -> _Prepared:
    read, skipped, notes, checkpoint, rejects, max_seen = head
    prepared = _Prepared(read, skipped, notes, checkpoint, rejects, max_seen=max_seen)
    if columns is None:
        return prepared
    keys, stamps, ids, records, rows, written = columns
    if records.__class__ is PackedRecords:
        records = [PackedRecord(records, item) for item in range(len(keys))]
    prepared.candidates = list(map(Candidate, keys, stamps, [0] * len(keys), ids, records, rows))
    if written is not None:
        for candidate, (seq, outcome) in zip(prepared.candidates, written, strict=True):
            candidate.seq, candidate.outcome = seq, outcome
    return prepared


class _Stream:
    """Prepared batches, closed when the run is done with them."""

    def __init__(self, batches: Iterator[_Prepared]) -> None:
        self._batches = batches

    def __iter__(self) -> Iterator[_Prepared]:
        return self._batches

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()


class _Worker(_Stream):
    """Reads, validates and maps in a forked process while this one writes.

    On a large load the first stages and the write take about as long each, and a
    2-core machine does them at once. The worker sends each batch, pickled, through a
    pipe whose buffer holds about one batch: memory stays flat, and the batches
    arrive in the order they were read, so the run's outcome is the one a single-process
    run would have. What the worker prepared of a batch travels prepared, its records
    packed (``PackedRecords``); the rest is prepared here (see ``_work``).

    The worker owns nothing of the run: it closes every inherited descriptor but its
    pipe (so the job's lock dies with this process), ignores Ctrl-C (this process stops
    it), never runs inherited finalisers (``os._exit``), and ends when its pipe breaks.
    An error in it is raised here, as if the source had raised it.
    """

    def __init__(
        self,
        read: Callable[[int], Iterator[SourceBatch]],
        prepare: Callable[[SourceBatch], _Prepared],
        batch_size: int,
    ) -> None:
        self._prepare = prepare
        # How many batches this process has applied, and how many of the worker's raw
        # parts it has prepared: written here and read by the worker, a shared page, not
        # a message, so reading it never waits. A stale read only moves work from one
        # process to the other, never changes the outcome.
        self._done = mmap.mmap(-1, _PROGRESS.size)
        receiver, sender = os.pipe()
        _widen(sender)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(receiver)
                code = _work(sender, read, prepare, batch_size, self._done)
            finally:
                os._exit(code)
        os.close(sender)
        self._pid: int | None = pid
        self._pipe: BinaryIO = os.fdopen(receiver, "rb")
        super().__init__(self._receive())

    @staticmethod
    def usable(source: Source) -> bool:
        return (
            bool(getattr(source, "fork_safe", False))
            and sys.platform == "linux"
            and _cpus() >= 2  # on one core the two processes would only take turns
        )

    def _receive(self) -> Iterator[_Prepared]:
        done = raw_done = 0
        parts: list[_Prepared] = []  # the current batch's, in the order they were read
        while True:
            # Resumed: the batch yielded last is applied, or a raw part prepared, and
            # this process is idle now.
            _PROGRESS.pack_into(self._done, 0, done, raw_done)
            head = self._pipe.read(_FRAME.size)
            size = _FRAME.unpack(head)[0] if len(head) == _FRAME.size else -1
            blob = self._pipe.read(size) if size >= 0 else b""
            if len(blob) != size or size < 0:
                raise CustsyncError("the run's worker process ended unexpectedly")
            kind, payload = pickle.loads(blob)
            if kind == "part":
                parts.append(payload)
                continue
            if kind == "raw":  # read, not prepared: the worker was busier than this process
                parts.append(self._prepare(payload))
                raw_done += 1
                continue
            if kind == "batch":
                whole = parts[0] if parts else _Prepared(0, 0, [], None)
                for part in parts[1:]:
                    whole.extend(part)
                parts = []
                yield whole
            elif kind == "end":
                return
            else:
                error, trace = payload
                if trace is not None:
                    log.error("the run's worker process failed:\n%s", trace.rstrip())
                raise error
            done += 1

    def close(self) -> None:
        self._pipe.close()
        self._done.close()
        if self._pid is None:
            return
        pid, self._pid = self._pid, None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # done, or stopped early: it has nothing to finish
        os.waitpid(pid, 0)


def _work(
    sender: int,
    read: Callable[[int], Iterator[SourceBatch]],
    prepare: Callable[[SourceBatch], _Prepared],
    batch_size: int,
    progress: mmap.mmap,
) -> int:
    """The worker process's life: batches into the pipe, then "end".

    The source is read a part (``_STRETCH`` records) at a time, and each part goes to the
    writer as soon as it is read: prepared here ("part") while the writer has work (a
    batch to apply, a raw part to prepare), or as read ("raw") when it has none, for the
    writer to prepare while this process reads on. Once the parts sent add up to a batch,
    "batch" ends it, and the writer applies it. Either side may be the slower one (an
    incremental run mostly reads and skips; an initial load into SQLite mostly writes),
    so the work balances itself a part at a time, and neither process waits longer than
    the other takes over a part. The outcome is the one a single process would have:
    ``_Run._prepare`` is pure and record by record, and the writer joins a batch's parts
    in the order they were read before it applies it."""
    gc.freeze()  # inherited objects are never collected here: none of their finalisers run
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != sender:
            with contextlib.suppress(OSError):  # the listing's own descriptor, gone already
                os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Nothing here writes to the run's streams: in a notebook they are the kernel's, and
    # another thread may have held their locks at the fork. What the worker has to say
    # (an error, its traceback) goes through the pipe; stray output goes to the bare fds.
    logging.disable(logging.CRITICAL)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    pipe = os.fdopen(sender, "wb")

    def send(message: tuple[str, Any]) -> None:
        blob = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        pipe.write(_FRAME.pack(len(blob)))
        pipe.write(blob)
        pipe.flush()  # all of it is in the pipe (a buffered writer retries short writes)

    try:
        sent = raw_sent = 0  # batches ended, raw parts sent
        size, open_batch = 0, False  # the records of the batch being sent; parts of it sent
        stretch = min(batch_size, _STRETCH)
        for part in read(stretch):
            done, raw_done = _PROGRESS.unpack_from(progress)
            if not part.records or sent > done or raw_sent - raw_done >= _RAW_AHEAD:
                prepared = prepare(part)
                packed = PackedRecords.pack([c.record for c in prepared.candidates])
                for candidate, record in zip(prepared.candidates, packed, strict=True):
                    candidate.record = record
                send(("part", prepared))
            else:
                send(("raw", part))
                raw_sent += 1
            size += len(part.records)
            open_batch = True
            # A part shorter than asked for ends its batch, as the source meant it to go
            # out: the input's end, skips counted for the progress, a checkpoint, a
            # source's batch of its own size.
            if size >= batch_size or len(part.records) < stretch:
                send(("batch", None))
                sent, size, open_batch = sent + 1, 0, False
        if open_batch:
            send(("batch", None))
        send(("end", None))
        return 0
    except BrokenPipeError:
        return 0  # the run is over, or gone
    except BaseException as exc:  # noqa: BLE001 - all of it goes to the run, which raises it
        trace = None if isinstance(exc, CustsyncError | OSError) else traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - an exception that does not survive the pipe
            exc = CustsyncError(f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(OSError):
            send(("error", (exc, trace)))
        return 1


class _Seen:
    """The rows a run wrote (or found written) at its newest update times, by time: what
    it leaves the next run (``StateStore.remember``), which reads from its watermark less
    the lookback again. Only times within ``lookback`` of the newest are kept, and at most
    ``limit`` rows: any part of them is as good (a record not kept is compared with the
    target again, as it would be without them). A row this run wrote is fingerprinted
    (``_digest``) only at the end, if it is still kept: a load turns most of them away as
    newer times come."""

    def __init__(self, lookback: timedelta, limit: int = 1_000) -> None:
        self._lookback = lookback
        self._limit = limit
        self._by_time: dict[datetime, list[tuple[Key, Any]]] = {}  # (key, row or digest)
        self._times: list[datetime] = []  # a heap of the times kept
        self._size = 0
        self._floor: datetime | None = None  # older than this is not kept

    def add(self, candidates: Iterable[Candidate]) -> None:
        for candidate in candidates:
            ts = candidate.ts
            if ts is not None and self._admits(ts):
                self._add(ts, (candidate.key, candidate.row))

    def keep(self, seen: Mapping[datetime, Iterable[Written]]) -> None:
        """What the last run left: still true, so still worth leaving to the next."""
        for ts, rows in seen.items():
            for row in rows:
                if self._admits(ts):
                    self._add(ts, row)

    def _admits(self, ts: datetime) -> bool:
        """Whether a row of time ``ts`` is kept (if there is room), raising the floor when
        ``ts`` is the newest yet."""
        if self._floor is not None and ts < self._floor:
            return False
        floor = ts - self._lookback
        if self._floor is None or floor > self._floor:
            self._raise_floor(floor)
        return self._size < self._limit

    def _add(self, ts: datetime, entry: tuple[Key, Any]) -> None:
        rows = self._by_time.get(ts)
        if rows is None:
            rows = self._by_time[ts] = []
            heapq.heappush(self._times, ts)
        rows.append(entry)
        self._size += 1

    def _raise_floor(self, floor: datetime) -> None:
        self._floor = floor
        while self._times and self._times[0] < floor:
            self._size -= len(self._by_time.pop(heapq.heappop(self._times)))

    def since(self, start: datetime) -> dict[datetime, set[Written]]:
        out: dict[datetime, set[Written]] = {}
        for at, entries in self._by_time.items():
            if at < start:
                continue
            written = out[at] = set()
            for key, value in entries:
                digest = value if value.__class__ is str else _digest(value)
                if digest is not None:
                    written.add((key, digest))
        return out


def _held(
    seen: Mapping[datetime, frozenset[Written]], ts: datetime | None, key: Key, row: Any
) -> bool:
    """Whether the last complete run wrote this row from a record of time ``ts``."""
    rows = seen.get(ts) if ts is not None else None
    return rows is not None and (key, _digest(row)) in rows


def _digest(row: Any) -> str | None:
    """A fingerprint of a row's values, the same in every run (None: not plain JSON)."""
    try:
        return hashlib.blake2b(orjson.dumps(row), digest_size=8).hexdigest()
    except TypeError:
        return None


def _run_failures() -> tuple[type[BaseException], ...]:
    """What fails a run without being a bug in it: custsync's errors, the system's, and
    SQLAlchemy's once the run has imported it (it does when it opens a database)."""
    database = sys.modules.get("sqlalchemy.exc")
    if database is None:
        return (CustsyncError, OSError)
    return (CustsyncError, OSError, database.SQLAlchemyError)


def _clean_text(value: Any) -> bool:
    """A key value that is text, not empty, without surrounding space: used as it is."""
    if value.__class__ is not str or not value:
        return False
    return not value[0].isspace() and not value[-1].isspace()


def _widen(pipe: int) -> None:
    """Let the pipe hold about a batch (64 KiB by default, a batch is about 1 MB): the
    worker then hands a batch over and reads on, where it would wait until this process
    took the batch. Memory stays flat: the pipe holds what it holds, and no more."""
    import fcntl  # Linux only, as parallel runs are

    for size in (_PIPE_SIZE, 1 << 20):  # more than 1 MiB needs privileges on Linux
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, size)
            return


_PIPE_SIZE = 4 << 20
_FRAME = struct.Struct("<Q")  # each message: its length, then the pickle
_PROGRESS = struct.Struct("<QQ")  # batches applied, raw parts prepared (``_Worker``)
_STRETCH = 200  # records the worker reads before it looks whether the writer waits
_RAW_AHEAD = 2  # raw parts the writer may have to prepare: one in hand, one waiting


class _Commits:
    """A transaction across batches, committed once ``interval`` seconds have passed since
    it began (or when the run stops or ends). Without a target (``None``) each batch
    commits as it is written. The counts of rows written are the committed ones: a
    transaction rolled back takes its rows' outcomes back out of them."""

    def __init__(self, target: Transactional | None, interval: float, counts: Counter[str]) -> None:
        self._target = target
        self._interval = interval
        self._counts = counts
        self._since: float | None = None  # when the open transaction began
        self._committed: dict[str, int] = {}

    def join(self) -> None:
        """Before a write: a transaction is open for it."""
        if self._target is None or self._since is not None:
            return
        self._committed = {name: self._counts[name] for name in _WRITTEN}
        self._target.begin()
        self._since = time.monotonic()

    def due(self, *, force: bool = False) -> bool:
        """Whether the batches written so far should commit now."""
        if self._since is None:
            return True  # nothing held: the batch committed on its own
        return force or time.monotonic() - self._since >= self._interval

    def commit(self) -> None:
        if self._target is None or self._since is None:
            return
        self._target.commit()  # when it fails, the transaction is still to roll back
        self._since = None

    def discard(self) -> int | None:
        """Roll back a transaction still open (the run failed or was interrupted): how
        many rows' outcomes it took back, or None when none was open."""
        if self._target is None or self._since is None:
            return None
        self._since = None
        self._target.rollback()
        undone = 0
        for name, value in self._committed.items():
            undone += self._counts[name] - value
            self._counts[name] = value
        return undone


# The outcomes a target reports: a transaction rolled back takes its rows' back out.
_WRITTEN = ("inserted", "updated", "unchanged", "stale", "unknown")


def _position(entry: tuple[int, int, Reject]) -> tuple[int, int]:
    return entry[0], entry[1]


def _cpus() -> float:
    """The CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a
    container limited to one CPU on a large host sees every core in its affinity)."""
    count: float = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return count
    if quota != "max":
        count = min(count, int(quota) / int(period))
    return count


class _Run:
    def __init__(
        self,
        job: Job,
        *,
        dry_run: bool,
        full_refresh: bool,
        since: datetime | None,
        limit: int | None,
        from_rejects: Path | None,
        progress: Progress | None,
        stop: threading.Event,
    ) -> None:
        self.job = job
        self.config = job.config
        self.dry_run = dry_run
        self.full_refresh = full_refresh or self.config.sync.mode == "full"
        self.since_arg = since
        self.limit = limit
        self.replay = from_rejects
        self.progress = progress
        self.stop = stop
        self.run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        self.counts: Counter[str] = Counter()
        self.seq = 0
        self.max_seen: datetime | None = None
        self.schema: RowSchema = self.config.schema_
        self.codec: RowCodec | None = None  # set once the run starts (``_row_codec``)
        # The mapping and the codec in one function, for a single-column key (``_encoder``)
        self.encoded: tuple[Callable[[dict[str, Any]], tuple[Any, ...]], int] | None = None
        self.notes: list[str] = []
        self.writeback: Any = None
        self.commits = _Commits(None, 0.0, self.counts)  # the run's (``_commits``)
        self.lookback = self.config.sync.lookback
        # What ``StateStore.remember`` keeps. Not when duplicates merge: a record skipped
        # could no longer lend its fields to the one it lost to, read again without it.
        # Not with a writeback: a record whose id could not be written back is tried
        # again when it is read again.
        self.remembers = self.config.sync.duplicates != "merge" and self.config.writeback is None
        self.seen = _Seen(self.lookback, limit=1_000 if self.remembers else 0)
        self.written_back: Counter[str] = Counter()

    # --- the run as a list of stages --------------------------------------------------

    def execute(self) -> RunResult:
        started = time.monotonic()
        result = RunResult(
            self.config.name,
            self.run_id,
            "failed",
            dry_run=self.dry_run,
            rejects_path=self.config.rejects_path,
        )
        try:
            store = StateStore(self.config.state_url)
        except CustsyncError as exc:
            result.error = str(exc)
            result.status = "config_error" if isinstance(exc, ConfigError) else "failed"
            return result
        try:
            if self.dry_run:
                self._locked_run(store, result)
            else:
                with store.lock(self.config.name):
                    self._locked_run(store, result)
        except LockedError as exc:
            result.status, result.error = "locked", str(exc)
            result.run_id = None
        finally:
            store.close()
            result.duration_s = time.monotonic() - started
            for name in COUNTS:
                setattr(result, name, self.counts[name])
            result.notes = self.notes
        return result

    def _locked_run(self, store: StateStore, result: RunResult) -> None:
        state = store.get(self.config.name)
        since, cursor = self._lower_bound(state.watermark, state.cursor)
        seen = state.seen if since is not None and self.remembers else {}
        self.seen.keep(state.seen)
        result.watermark = state.watermark
        logged = False  # in the run log (``_log_start``)
        rejects = RejectsWriter(self.config.rejects_path, run_id=self.run_id, dry_run=self.dry_run)
        status, error, last_checkpoint, completed = "failed", None, None, False
        source: Source | None = None
        target: Target | None = None
        try:
            source = _ReplaySource(self.replay) if self.replay else self.job.make_source()
            paths = self.config.mapping.source_paths()
            if self.config.writeback is not None:
                paths = {*paths, "id", self.config.writeback.field}
                if not self.dry_run and self.replay is None:
                    # A replay reads a rejects file, not the API: there is nothing to
                    # write back through (the next regular run does it).
                    self.writeback = self._writeback_for(source)
            if isinstance(source, Projectable) and self.config.inbound is None:
                source.project(paths)
            if isinstance(source, LookbackAware):
                source.expect_lookback(self.config.sync.lookback)
            self.codec = self._row_codec()
            self.encoded = self._encoder()
            with (
                Ledger(self.config.sync.duplicates, directory=self._scratch()) as ledger,
                self._prepared_batches(source, since, cursor, seen) as batches,
            ):
                # A parallel run's worker is reading already: logging the run, and
                # connecting to the target (importing SQLAlchemy, loading its driver,
                # reading its catalogue) when a first run does it at once, overlap the
                # first batch. Nothing is written, here or there, before the target is
                # ready.
                logged = self._log_start(store, state.watermark)

                def ready() -> Target:
                    """The target, connected and prepared when first needed: a run with
                    nothing to write (after its first) never connects to it."""
                    nonlocal target
                    if target is None:
                        target = self.job.make_target()
                        self.notes += target.prepare(self.schema, create=not self.dry_run)
                        self.commits = self._commits(source, target)
                    return target

                if state.watermark is None:
                    ready()  # a first run makes the table, even with no rows for it
                pending: Checkpoint | None = None  # written, not committed yet

                def settle() -> None:
                    """Commit what is written, then checkpoint it."""
                    nonlocal pending, last_checkpoint
                    self.commits.commit()
                    if pending is not None:
                        last_checkpoint, pending = pending, None
                        self._checkpoint(store, last_checkpoint)

                stream = iter(batches)
                while True:
                    try:
                        batch = next(stream, None)
                    except BaseException:
                        # The source failed, or Ctrl-C came while it read: the batches
                        # written are whole, and stay, as if each had committed alone.
                        settle()
                        raise
                    if batch is None:
                        settle()
                        completed = True
                        break
                    self._apply(batch, ready if batch.candidates else None, ledger, rejects)
                    rejects.flush()
                    if batch.checkpoint is not None:
                        pending = batch.checkpoint
                    stopping = self.stop.is_set() or (
                        self.limit is not None and self.counts["read"] >= self.limit
                    )
                    if self.commits.due(force=stopping):
                        settle()
                    if self.progress is not None:
                        self.progress(self.counts)
                    if stopping:
                        break
            status = "ok" if completed or not self.stop.is_set() else "interrupted"
        except KeyboardInterrupt:
            status, error = "interrupted", "interrupted by Ctrl-C"
        except ConfigError as exc:
            status, error = "config_error", str(exc)
        except _run_failures() as exc:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("run %s of %s failed: %s", self.run_id, self.config.name, error)
        except Exception as exc:
            status, error = "failed", f"unexpected {type(exc).__name__}: {exc}"
            log.exception("run %s of %s failed unexpectedly", self.run_id, self.config.name)
        finally:
            undone = self.commits.discard()
            if undone:
                self.notes.append(
                    f"{undone} rows written since the run's last commit were rolled back "
                    "(not counted): the next run writes them"
                )
            for closeable in (source, target):
                if closeable is not None:
                    try:
                        closeable.close()
                    except Exception:
                        log.warning("closing %r failed", closeable, exc_info=True)
            rejects.close()
        if self.stop.is_set() and status == "ok" and not completed:
            status = "interrupted"

        watermark = state.watermark
        if completed and status == "ok" and not self.dry_run and not self.replay:
            if last_checkpoint is None or last_checkpoint.watermark is None:
                # An unordered source: the watermark moves only now that all is committed
                # (its own final checkpoint, if any, carries a cursor but no watermark).
                cursor = last_checkpoint.cursor if last_checkpoint is not None else None
                self._checkpoint(store, Checkpoint(self.max_seen, cursor))
            watermark = store.get(self.config.name).watermark
            if watermark is not None:
                store.remember(self.config.name, self.seen.since(watermark - self.lookback))
        elif not self.dry_run and last_checkpoint is not None:
            watermark = store.get(self.config.name).watermark
        if self.written_back and self.config.writeback is not None:
            done = ", ".join(f"{n} {status}" for status, n in sorted(self.written_back.items()))
            field = self.config.writeback.field
            self.notes.append(f"writeback to Commerce Layer ({field}): {done}")
        elif self.writeback is not None and (self.counts["inserted"] or self.counts["updated"]):
            self.notes.append(
                "writeback: the target reported no ids (set id_column on a sql target)"
            )
        if status == "ok" and self.config.sync.rejects_exceeded(
            self.counts["rejected"], self.counts["read"]
        ):
            status = "rejects_exceeded"
        result.status, result.error, result.watermark = status, error, watermark
        if not self.dry_run:
            if not logged:  # it failed before it got that far
                self._log_start(store, state.watermark)
            store.finish_run(
                self.run_id,
                status=status,
                counts=dict(self.counts),
                watermark_after=watermark,
                error=error,
            )

    def _log_start(self, store: StateStore, watermark: datetime | None) -> bool:
        """Log the run as running (not a dry run), closing any earlier run of the job that
        never finished: this run holds the job's lock, so none of them is alive."""
        if self.dry_run:
            return False
        abandoned = store.close_abandoned_runs(self.config.name)
        if abandoned:
            log.warning(
                "%d earlier run(s) of %s never finished (killed?); the target "
                "is brought up to date by this run",
                abandoned,
                self.config.name,
            )
        store.start_run(
            self.config.name, run_id=self.run_id, dry_run=False, watermark_before=watermark
        )
        return True

    def _prepared_batches(
        self,
        source: Source,
        since: datetime | None,
        cursor: Mapping[str, Any] | None,
        seen: Mapping[datetime, frozenset[Written]],
    ) -> _Stream:
        """The source's batches through the first stages: in a worker process when the run
        can be parallel (see ``_Worker``), else here, one batch at a time."""

        batch_size = self.config.sync.batch_size

        def read(size: int) -> Iterator[SourceBatch]:
            return source.read(since=since, cursor=cursor, batch_size=size)

        def prepare(batch: SourceBatch) -> _Prepared:
            return self._prepare(batch, since, seen)

        def prepared() -> Iterator[_Prepared]:
            for batch in read(batch_size):
                yield prepare(batch)

        if self.config.sync.parallel and _Worker.usable(source):
            return _Worker(read, prepare, batch_size)
        return _Stream(prepared())

    def _commits(self, source: Source, target: Target) -> _Commits:
        """When the target commits: every ``commit_interval`` where it can hold a
        transaction across batches and the source's batches come without waiting on a
        remote (``Source.local``), else every batch: what a slow source (an API, an
        export being made) sent is committed while it waits for more. A dry run writes
        nothing; a run that writes ids back to Commerce Layer commits each batch before it
        sends them."""
        interval = self.config.sync.commit_interval.total_seconds()
        if (
            self.dry_run
            or not getattr(source, "local", False)
            or self.writeback is not None
            or interval <= 0
            or not isinstance(target, Transactional)
        ):
            return _Commits(None, 0.0, self.counts)
        return _Commits(target, interval, self.counts)

    def _row_codec(self) -> RowCodec | None:
        """The target's row codec, when its class has one: rows are then encoded as they
        are mapped (in a parallel run's worker), not by the writing process. Merging
        duplicates reads rows' fields, so a merge run keeps them as mapped."""
        if self.config.sync.duplicates == "merge":
            return None
        factory = plugins.find("target", self.config.target.connector).factory
        if not isinstance(factory, HasRowCodec):
            return None
        return factory.row_codec(self.config.target, self.schema)

    def _encoder(self) -> tuple[Callable[[dict[str, Any]], tuple[Any, ...]], int] | None:
        """The mapping and the codec as one function (``CompiledMapping.encoder``), and
        where the key is in its rows: a record then goes to its encoded row without the
        mapped dict between (and a JSON value is dumped once, not checked and dumped)."""
        codec, key = self.codec, self.schema.key
        if codec is None or codec.converters is None or len(key) != 1 or key[0] not in codec.names:
            return None
        encoder = self.config.mapping.encoder(codec.names, codec.converters)
        return None if encoder is None else (encoder, codec.names.index(key[0]))

    def _writeback_for(self, source: Source) -> Any:
        from custsync.commercelayer.writeback import Writeback

        client = getattr(source, "client", None)
        if client is None or self.config.writeback is None:
            raise ConfigError("writeback needs the commercelayer source", key="writeback")
        return Writeback(client, self.config.writeback)

    def _scratch(self) -> Path | None:
        """A folder for the run's scratch files beside the job's state, so that what a
        killed run left behind is found and removed by the next run (which holds the lock,
        so no run of the job is alive). None: the system's temporary folder."""
        folder = self.config.base_dir / ".custsync" / "tmp" / self.config.name
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        if not self.dry_run:
            for leftover in folder.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
        return folder

    def _lower_bound(
        self, watermark: datetime | None, cursor: Mapping[str, Any] | None
    ) -> tuple[datetime | None, Mapping[str, Any] | None]:
        if self.replay is not None:
            return None, None  # a replay ignores (and keeps) the watermark
        if self.since_arg is not None:
            since = self.since_arg
            return (since.replace(tzinfo=UTC) if since.tzinfo is None else since), None
        if self.full_refresh or self.config.sync.compare == "content":
            return None, None
        if watermark is None:
            # A first run that stopped part-way: no lower bound yet, but its read resumes
            # (an ordered source checkpoints its cursor before it has a watermark).
            return None, cursor
        return watermark - self.config.sync.lookback, cursor

    def _checkpoint(self, store: StateStore, checkpoint: Checkpoint) -> None:
        if self.dry_run or self.replay is not None:
            return
        store.checkpoint(self.config.name, watermark=checkpoint.watermark, cursor=checkpoint.cursor)

    # --- one batch --------------------------------------------------------------------

    def _prepare(
        self,
        batch: SourceBatch,
        since: datetime | None,
        seen: Mapping[datetime, frozenset[Written]] | None = None,
    ) -> _Prepared:
        """The stages that need nothing but the job and the batch: parse errors, the
        inbound mapping, the lower bound, validation, the environment, the outbound mapping
        and the keys; a record whose key and time the last complete run wrote (``seen``)
        is skipped. Pure, so a parallel run does it in its worker process."""
        prepared = _Prepared(
            read=len(batch.records) + batch.skipped,
            skipped=batch.skipped,
            notes=batch.notes,
            checkpoint=batch.checkpoint,
        )
        # Rejects in read order, whichever step refused them: (records kept before it,
        # 0 before validation or 1 from it on, reject), sorted once at the end (a batch
        # is prepared whole or in parts, and the rejects file must read the same).
        rejects: list[tuple[int, int, Reject]] = []

        def reject(
            at: int,
            step: int,
            source_id: str | None,
            errors: Sequence[FieldError],
            record: Mapping[str, Any],
            stage: Stage = "validate",
        ) -> None:
            rejects.append((at, step, Reject(stage, source_id, None, errors, record)))

        # Parse errors, inbound mapping, and records older than the lower bound.
        live: list[tuple[RawRecord, dict[str, Any]]] = []
        inbound = self.config.inbound
        max_seen: datetime | None = None
        for raw in batch.records:
            if raw.error is not None:
                reject(len(live), 0, raw.origin, [FieldError("record", raw.error)], raw.data)
                continue
            data = raw.data
            if inbound is not None:
                mapped = inbound.apply([data])[0]
                if isinstance(mapped, list):
                    reject(len(live), 0, raw.origin, mapped, data)
                    continue
                data = mapped
                ts = parse_timestamp(data.get("updated_at"))
            else:
                ts = raw.stamp or parse_timestamp(data.get("updated_at"))
            if ts is not None:
                if max_seen is None or ts > max_seen:
                    max_seen = ts
                if since is not None and ts < since:
                    prepared.skipped += 1
                    continue
            live.append((raw, data))
        prepared.max_seen = max_seen

        # Validation, environment, outbound mapping, keys.
        environment = self.config.source.environment
        candidates = prepared.candidates
        validated = validate_records([data for _, data in live])
        mapping, key_columns = self.config.mapping, self.schema.key
        apply_one = mapping.apply_one
        encode = self.codec.encode if self.codec is not None else None
        single_key = key_columns[0] if len(key_columns) == 1 else None
        encoded, key_at = self.encoded if self.encoded is not None else (None, 0)
        for at, ((raw, data), customer) in enumerate(zip(live, validated, strict=True)):
            identifier = data.get("id")
            source_id = str(identifier) if identifier not in (None, "") else raw.origin
            if isinstance(customer, list):
                reject(at, 1, source_id, customer, data)
                continue
            meta = customer.get("meta")
            mode = meta.get("mode") if meta else None
            if environment is not None and mode is not None and mode != environment:
                reject(
                    at,
                    1,
                    source_id,
                    [
                        FieldError(
                            "meta.mode",
                            f"a {mode} record in a job for the {environment} environment",
                        )
                    ],
                    data,
                )
                continue
            if encoded is not None:
                try:
                    fused: tuple[Any, ...] | None = encoded(customer)
                except Exception:  # noqa: BLE001 - the steps below say what failed
                    fused = None
                if fused is not None:
                    value = fused[key_at]
                    if _clean_text(value):
                        ts = customer.get("updated_at")
                        if seen and _held(seen, ts, (value,), fused):
                            prepared.skipped += 1
                            continue
                        candidates.append(Candidate((value,), ts, 0, source_id, data, fused))
                        continue
            try:
                row = apply_one(customer)
            except RecordFailure as failure:
                reject(at, 1, source_id, failure.errors, data, "map")
                continue
            key: tuple[Any, ...] | None = None
            if single_key is not None:
                value = row.get(single_key)
                if _clean_text(value):
                    key = (value,)  # the common case: a clean text key, nothing to convert
            if key is None:
                missing = []
                for column in key_columns:
                    value = row.get(column)
                    if value is not None and not isinstance(value, str):
                        value = _key_text(value)
                    if isinstance(value, str):
                        value = row[column] = value.strip()
                    if is_empty(value):
                        missing.append(column)
                if missing:
                    errors = [
                        FieldError(c, f"no value for the key ({_paths_of(mapping, c)} all empty)")
                        for c in missing
                    ]
                    reject(at, 1, source_id, errors, data, "map")
                    continue
                key = tuple(row[c] for c in key_columns)
            written: dict[str, Any] | tuple[Any, ...] = row
            if encode is not None:
                try:
                    written = encode(row)
                except RecordError as refused:
                    reject(at, 1, source_id, refused.errors, data, "map")
                    continue
            ts = customer.get("updated_at")
            if seen and _held(seen, ts, key, written):
                prepared.skipped += 1
                continue
            candidates.append(Candidate(key, ts, 0, source_id, data, written))
        rejects.sort(key=_position)
        prepared.rejects = [entry[2] for entry in rejects]
        return prepared

    def _apply(
        self,
        prepared: _Prepared,
        target: Callable[[], Target] | None,
        ledger: Ledger,
        rejects: RejectsWriter,
    ) -> None:
        """The writer's side of a batch: counts, rejects, duplicates across the run, the
        write, in the order the batches were read. ``target`` gives the target (None: the
        batch has nothing to write)."""
        counts = self.counts
        counts["read"] += prepared.read
        counts["skipped"] += prepared.skipped
        for note in prepared.notes:
            log.info("%s", note)
            self.notes.append(note)
        if prepared.max_seen is not None and (
            self.max_seen is None or prepared.max_seen > self.max_seen
        ):
            self.max_seen = prepared.max_seen
        for early in prepared.rejects:
            counts["rejected"] += 1
            rejects.add(early)
        candidates = prepared.candidates
        for candidate in candidates:
            self.seq += 1
            candidate.seq = self.seq

        def reject(
            stage: Any,
            source_id: str | None,
            errors: Sequence[FieldError],
            record: Mapping[str, Any] | None,
            key: Any = None,
            duplicate_of: str | None = None,
            count: str = "rejected",
        ) -> None:
            counts[count] += 1
            rejects.add(Reject(stage, source_id, key, errors, record, duplicate_of))

        # Duplicate keys across the run, then the write.
        key_columns = self.schema.key
        resolution = ledger.resolve(candidates)
        reject_count = "rejected" if self.config.sync.duplicates == "reject" else "duplicates"
        for loser, winner in resolution.losers:
            reject(
                "dedupe",
                loser.source_id,
                [
                    FieldError(
                        ",".join(key_columns),
                        f"duplicate key: {self.config.sync.duplicates} kept {winner.source_id}",
                    )
                ],
                loser.record,
                key=loser.key,
                duplicate_of=winner.source_id,
                count=reject_count,
            )
        if target is None:
            return
        handled = self._write(resolution, target, ledger, rejects, reject)
        self.seen.add(handled)
        self.seen.add(loser for loser, _ in resolution.losers)

    def _write(
        self,
        resolution: Resolution,
        ready: Callable[[], Target],
        ledger: Ledger,
        rejects: RejectsWriter,
        reject: Callable[..., None],
    ) -> list[Candidate]:
        """Write the batch's winners; the candidates the target now holds."""
        winners = resolution.winners
        # Encoded when the target has a row codec (``_row_codec``): its write takes them.
        rows = cast(Sequence[Row], [c.row for c in winners] + [c.row for c in resolution.rewrites])
        if not rows:
            return []
        target = ready()
        if self.dry_run:
            if isinstance(target, Previewable):
                results: Sequence[RowResult] = target.preview(rows)
            else:
                keys = [c.key for c in winners] + [c.key for c in resolution.rewrites]
                results = [RowResult(key, Outcome.UNKNOWN) for key in keys]
        else:
            self.commits.join()
            results = target.write(rows)
        by_key = {r.key: r for r in results}
        counts = self.counts
        tally: Counter[Outcome] = Counter()
        unseated_by_key = resolution.unseated
        committed: list[Candidate] = []
        for candidate in winners:
            result = by_key.get(candidate.key)
            if result is None:
                result = RowResult(candidate.key, Outcome.FAILED, "the target reported nothing")
            outcome = result.outcome
            if outcome is not Outcome.FAILED and not unseated_by_key:
                tally[outcome] += 1  # the common case: a key new to this run, written
                candidate.outcome = _OUTCOME_TEXT[outcome]
                committed.append(candidate)
                continue
            if outcome is Outcome.FAILED:
                reject(
                    "load",
                    candidate.source_id,
                    [FieldError(",".join(self.schema.key), result.message or "refused")],
                    candidate.record,
                    key=candidate.key,
                )
                continue
            unseated = resolution.unseated.get(candidate.key)
            if unseated is not None:
                # An earlier record held this key and now loses to this one: it moves from
                # its count to duplicates, and to the rejects file.
                previous = Outcome(unseated.outcome) if unseated.outcome else Outcome.UNKNOWN
                counts[previous.value] -= 1
                counts["duplicates"] += 1
                rejects.add(
                    Reject(
                        "dedupe",
                        unseated.source_id,
                        unseated.key,
                        [
                            FieldError(
                                ",".join(self.schema.key),
                                f"duplicate key: {self.config.sync.duplicates} kept "
                                f"{candidate.source_id}",
                            )
                        ],
                        unseated.record,
                        candidate.source_id,
                    )
                )
                if previous is Outcome.INSERTED and outcome in (Outcome.UPDATED, Outcome.UNCHANGED):
                    outcome = Outcome.INSERTED  # the key is new to the target in this run
            tally[outcome] += 1
            candidate.outcome = outcome.value
            committed.append(candidate)
        for outcome, n in tally.items():
            counts[outcome.value] += n
        for rewrite in resolution.rewrites:
            if by_key.get(rewrite.key, RowResult(rewrite.key, Outcome.FAILED)).outcome is not (
                Outcome.FAILED
            ):
                committed.append(rewrite)
        ledger.commit(committed)
        if self.writeback is not None:
            self._write_back(committed, by_key)
        return committed

    def _write_back(self, committed: Sequence[Candidate], by_key: Mapping[Any, RowResult]) -> None:
        """Send the ids the target assigned back into Commerce Layer, before this batch's
        checkpoint: a crash re-does it, and it only fills empty fields, so that is safe."""
        from custsync.commercelayer.writeback import WritebackItem, WritebackStatus

        items = []
        for candidate in committed:
            result = by_key.get(candidate.key)
            customer_id = candidate.record.get("id")
            if result is None or result.target_id is None or not customer_id:
                continue
            metadata = candidate.record.get("metadata")
            items.append(
                WritebackItem(
                    customer_id=str(customer_id),
                    target_id=result.target_id,
                    reference=candidate.record.get("reference"),
                    metadata=metadata if isinstance(metadata, dict) else None,
                )
            )
        if not items:
            return
        assert self.writeback is not None
        for outcome in self.writeback.write(items):
            self.written_back[outcome.status.value] += 1
            if outcome.status is WritebackStatus.FAILED:
                log.warning(
                    "writeback to customer %s failed: %s", outcome.customer_id, outcome.message
                )


_OUTCOME_TEXT = {outcome: outcome.value for outcome in Outcome}


def _key_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return _iso(value) or ""
    return str(value)


def _paths_of(mapping: Any, column: str) -> str:
    for compiled in mapping.fields:
        if compiled.name == column:
            return ", ".join(compiled.paths) or "its value"
    return column
