"""The Target protocol, the per-row outcomes and the row schema a job writes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

Row = Mapping[str, Any]
Key = tuple[Any, ...]
Encoded = tuple[Any, ...]  # a row as its target's driver binds it (see ``RowCodec``)
FieldType = Literal["text", "integer", "float", "boolean", "timestamp", "json"]
MatchPolicy = Literal["upsert", "update_only", "create_only"]


class Outcome(StrEnum):
    INSERTED = "inserted"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    STALE = "stale"  # the target holds a newer row: not replaced (never go backwards)
    UNKNOWN = "unknown"  # written, but the target cannot say whether inserted or updated
    FAILED = "failed"  # the target refused the row; ``message`` says why


@dataclass(frozen=True, slots=True)
class RowResult:
    """What happened to one row, correlated by key (never by position)."""

    key: Key
    outcome: Outcome
    message: str | None = None
    target_id: str | None = None


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    name: str
    type: FieldType
    nullable: bool = True
    length: int | None = None  # for key columns: VARCHAR(length)


@dataclass(frozen=True, slots=True)
class RowSchema:
    """The rows a job writes: their columns, the key they are upserted on, and the column
    holding the source's ``updated_at`` (the guard against going backwards), if mapped."""

    columns: tuple[ColumnSpec, ...]
    key: tuple[str, ...]
    guard: str | None = None
    match_policy: MatchPolicy = "upsert"

    def column(self, name: str) -> ColumnSpec:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)

    def key_of(self, row: Row) -> Key:
        key = self.key
        if len(key) == 1:
            return (row[key[0]],)  # the common case, several times cheaper than a genexpr
        return tuple([row[k] for k in key])


@runtime_checkable
class Target(Protocol):
    """Upserts rows by key and reports an outcome per row.

    ``prepare`` is called once before any write: it creates or checks what the rows go
    into (``create=False`` for a dry run, which must write nothing). ``write`` returns only
    once the rows are durably committed (unless a ``Transactional`` target holds a
    transaction open); a refused row is a FAILED result, not an exception, and never sinks
    the rest of its batch. Keys are unique within one call.
    """

    def prepare(self, schema: RowSchema, *, create: bool = True) -> list[str]:
        """Create or check the destination; return notes worth a log line."""
        ...

    def write(self, rows: Sequence[Row]) -> Sequence[RowResult]: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RowCodec:
    """Rows in the form a target's driver binds them, made where the rows are mapped.

    ``encode`` gives the values of ``RowSchema.columns``, in that order, each converted
    as the target binds it (a timestamp as SQLite's text, JSON as text...); key columns
    are never converted. It raises ``RecordError`` naming the column whose value cannot
    be written. ``decode`` gives an encoded row back as a read of the target would
    return it, for comparisons with stored rows.

    A target class offers one with a class method ``row_codec(settings, schema)``
    (``HasRowCodec``); the engine then hands its ``write`` and ``preview`` encoded rows.
    Encoding where rows are mapped (a parallel run's worker) costs the writing process
    neither the conversions nor the unpickling of typed values.
    """

    names: tuple[str, ...]
    encode: Callable[[Row], Encoded]
    decode: Callable[[Encoded], dict[str, Any]]
    # What ``encode`` does to each column's value that is not None (None: nothing), in
    # ``names`` order: a mapping may then encode its rows as it computes them
    # (``CompiledMapping.encoder``).
    converters: tuple[Callable[[Any], Any] | None, ...] | None = None


@runtime_checkable
class HasRowCodec(Protocol):
    """A target class whose rows can be encoded before it exists (see ``RowCodec``)."""

    @classmethod
    def row_codec(cls, settings: Any, schema: RowSchema) -> RowCodec | None: ...


@runtime_checkable
class Transactional(Protocol):
    """A target whose writes can share one transaction across batches.

    After ``begin``, each ``write`` joins the open transaction and returns with nothing
    committed; ``commit`` makes all of it durable at once, ``rollback`` (or ``close``)
    discards it. A commit costs a database a flush to disk (milliseconds, on any disk):
    the engine commits every ``commit_interval``, not every batch, and checkpoints only
    after the commit. A ``write`` that raises leaves the transaction to be rolled back.
    """

    def begin(self) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...


@runtime_checkable
class Previewable(Protocol):
    """A target that can tell, without writing, what ``write`` would do (dry runs)."""

    def preview(self, rows: Sequence[Row]) -> Sequence[RowResult]: ...


class TargetSettings(BaseModel):
    """The keys every target accepts; each connector extends this with its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connector: str
    # The field(s) rows are upserted on; default: the key the mapping preset names.
    key: str | list[str] | None = None
    match_policy: MatchPolicy = "upsert"

    @property
    def key_columns(self) -> tuple[str, ...]:
        if self.key is None:
            return ()
        return (self.key,) if isinstance(self.key, str) else tuple(self.key)


@runtime_checkable
class Reconcilable(Protocol):
    """A target that can list what it holds and act on rows whose source record is gone
    (``custsync reconcile``)."""

    def scan(self, column: str) -> Iterator[tuple[Key, Any]]:
        """Every row's key and the value of ``column`` (the source's id), streamed."""
        ...

    def flag(self, keys: Sequence[Key], *, column: str) -> int:
        """Stamp ``column`` (a timestamp, added when absent) on these rows; return how many."""
        ...

    def delete(self, keys: Sequence[Key]) -> int: ...
