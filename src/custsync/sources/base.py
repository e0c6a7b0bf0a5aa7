"""The Source protocol: what every reader of customers provides to the engine."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict


@dataclass(slots=True)
class RawRecord:
    """One record as read, before validation.

    ``data`` is Customer-shaped (the source normalised a Commerce Layer form) unless the
    source has an inbound mapping, in which case it is the row as the file has it.
    ``origin`` says where it came from (``customers.jsonl:12#3``) for messages.
    """

    data: dict[str, Any]
    origin: str
    # Set when the record could not even be parsed (a malformed JSON line, a CSV row with
    # too many cells); ``data`` then holds ``{"_raw": <the text>}`` for the rejects file.
    error: str | None = None
    # ``data["updated_at"]`` already parsed (aware, UTC) by a source that had to read it,
    # so the engine does not parse it again. Never set on raw rows (no inbound mapping ran).
    stamp: datetime | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What an ordered source lets the engine record once a batch is committed."""

    watermark: datetime | None
    cursor: Mapping[str, Any] | None


@dataclass(slots=True)
class SourceBatch:
    """Records read together. ``checkpoint`` is set by ordered sources only: an unordered
    source (files) lets the engine advance the watermark once its whole input is read."""

    records: list[RawRecord]
    checkpoint: Checkpoint | None = None
    skipped: int = 0  # records the source itself left out as older than ``since``
    notes: list[str] = field(default_factory=list)  # things worth a log line (an encoding guessed)


@runtime_checkable
class Source(Protocol):
    """Reads customers in batches. ``since`` is the lower bound on ``updated_at`` (records
    below it may be dropped by the source and counted in ``SourceBatch.skipped``); ``cursor``
    is what the source returned in its last committed checkpoint, to resume a read.

    Two optional class attributes tell the engine more: ``fork_safe = True``, nothing is
    open before ``read``, so a parallel run may read it in a forked worker process;
    ``local = True``, its reads wait on no remote (files), so a run may hold the target's
    transaction across batches (``commit_interval``) without leaving written rows
    uncommitted while the source waits.
    """

    def read(
        self,
        *,
        since: datetime | None,
        cursor: Mapping[str, Any] | None,
        batch_size: int,
    ) -> Iterator[SourceBatch]: ...

    def close(self) -> None: ...


@runtime_checkable
class Checkable(Protocol):
    """A source or target that can say whether it is reachable, for ``custsync check``."""

    def check(self) -> list[str]:
        """Return human-readable lines describing what was reached; raise on failure."""
        ...


class SourceSettings(BaseModel):
    """The keys every source accepts; each connector extends this with its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connector: str
    # Records whose meta.mode differs are rejected; records with no meta.mode pass.
    environment: Literal["test", "live"] | None = None
    # An inbound mapping (preset name or path) for records that are not Commerce Layer-shaped.
    mapping: str | None = None
    # Override the inbound mapping's reading of dates without a zone or a year-first order
    # (a preset assumes one locale; an export from another says so here).
    date_order: Literal["DMY", "MDY", "YMD"] | None = None
    timezone: str | None = None


@runtime_checkable
class Projectable(Protocol):
    """A source that can read only what the mapping uses (sparse fieldsets, includes).
    The engine calls ``project`` once, before ``read``, with the mapping's source paths."""

    def project(self, paths: Collection[str]) -> None: ...


@runtime_checkable
class LookbackAware(Protocol):
    """A source that keeps, for its next read, where the records within ``lookback`` of
    its newest lie (an unchanged file is then re-read only there). The engine calls
    ``expect_lookback`` once, before ``read``, with the job's lookback."""

    def expect_lookback(self, lookback: timedelta) -> None: ...


@runtime_checkable
class Enumerable(Protocol):
    """A source that can list the ids of every record it holds (``custsync reconcile``)."""

    def ids(self) -> Iterator[str]: ...
