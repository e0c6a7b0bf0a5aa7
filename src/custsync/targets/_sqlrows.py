"""What the ``sql`` target is before it connects, without importing SQLAlchemy: its
settings, its URLs' dialects, and how its rows are encoded (``row_codec``).

A run loads the job and forks its worker, which encodes rows, before it imports
SQLAlchemy (a fifth of a second): the worker reads while the writing process imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import Field

from custsync.errors import ConfigError, FieldError, RecordError
from custsync.mapping import json_text
from custsync.targets.base import Encoded, FieldType, Row, RowCodec, RowSchema, TargetSettings

DRIVERS = {
    "postgresql": ("postgresql+psycopg", "psycopg", "PostgreSQL", "postgres"),
    "postgres": ("postgresql+psycopg", "psycopg", "PostgreSQL", "postgres"),
    "mysql": ("mysql+pymysql", "pymysql", "MySQL", "mysql"),
    "mariadb": ("mariadb+pymysql", "pymysql", "MariaDB", "mysql"),
}


class SqlTargetSettings(TargetSettings):
    connector: Literal["sql"] = "sql"
    url: str = Field(repr=False)  # may hold a password: never in a repr or a message
    table: str = "customers"
    db_schema: str | None = Field(default=None, alias="schema")
    create_table: bool = True
    key_length: int = Field(default=255, ge=1, le=3072)
    # A column the database fills (an identity, a sequence default, a trigger): each row's
    # own id, reported as its target id (what [writeback] sends back to Commerce Layer).
    # A table custsync creates gets it as an identity column.
    id_column: str | None = None


def dialect_of(url: str) -> str:
    """The SQLAlchemy dialect a target URL names (``postgres://`` is ``postgresql``)."""
    scheme = normalise_url(url).split("://", 1)[0]
    return scheme.split("+", 1)[0]


def normalise_url(url: str) -> str:
    """Pick our drivers when the URL names none (``postgresql://`` means psycopg 3)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError("not a database URL (like sqlite:///file.db)", key="target.url")
    dialect = scheme.split("+", 1)[0]
    if dialect in DRIVERS and "+" not in scheme:
        scheme = DRIVERS[dialect][0]
    return f"{scheme}://{rest}"


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_text(value: datetime) -> str:
    """Fixed-width ISO-8601 UTC with microseconds and ``Z``: the SQLite storage form."""
    offset = value.utcoffset()
    if offset:  # naive is UTC already (``_utc``)
        value = value.astimezone(UTC)
    # A third of ``isoformat``'s time, which a load spends per timestamp of every row.
    return "%04d-%s-%sT%s:%s:%s.%06dZ" % (  # noqa: UP031 - the fastest of the forms
        value.year,
        _TWO_DIGITS[value.month],
        _TWO_DIGITS[value.day],
        _TWO_DIGITS[value.hour],
        _TWO_DIGITS[value.minute],
        _TWO_DIGITS[value.second],
        value.microsecond,
    )


_TWO_DIGITS = [f"{n:02d}" for n in range(60)]


def _converter(kind: FieldType, dialect: str) -> Callable[[Any], Any] | None:
    """How a mapped value of ``kind`` goes to the driver of ``dialect``, as UtcTimestamp
    and the JSON types would have bound it."""
    mysql_like = dialect in ("mysql", "mariadb")
    if kind == "json":
        return json_text
    if kind == "timestamp":
        if dialect == "sqlite":
            return utc_text
        if mysql_like:
            return lambda value: _utc(value).replace(tzinfo=None)
        return _utc
    if kind == "boolean" and (dialect == "sqlite" or mysql_like):
        return int
    return None


def decoder(kind: FieldType, dialect: str) -> Callable[[Any], Any] | None:
    """The inverse of ``_converter``: a bound value as a read of the column returns it."""
    if kind == "json":
        return _sqlite_json
    if kind == "timestamp":
        return read_utc if dialect == "sqlite" else as_utc
    if kind == "boolean" and dialect in ("sqlite", "mysql", "mariadb"):
        return bool
    return None


def row_codec(schema: RowSchema, dialect: str) -> RowCodec:
    """The rows of ``schema`` as the driver of ``dialect`` binds them (see ``RowCodec``):
    one generated function converts a row, a loop of per-column calls costing several
    times more on a wide table."""
    names = tuple(c.name for c in schema.columns)
    converters = [
        None if c.name in schema.key else _converter(c.type, dialect) for c in schema.columns
    ]
    namespace: dict[str, Any] = {"refused": _refusal(schema, converters)}
    items = []
    for index, (name, convert) in enumerate(zip(names, converters, strict=True)):
        value = f"g({name!r})"
        if convert is not None:
            namespace[f"c{index}"] = convert
            value = f"(None if (v{index} := {value}) is None else c{index}(v{index}))"
        items.append(value)
    exec(
        "def encode(r):\n"
        f"    try:\n        g = r.get\n        return ({', '.join(items)},)\n"
        "    except Exception:\n        refused(r)\n        raise",
        namespace,
    )
    decoders = [
        None if n in schema.key else decoder(c.type, dialect)
        for n, c in zip(names, schema.columns, strict=True)
    ]

    def decode(values: Encoded) -> dict[str, Any]:
        return {
            name: value if read is None or value is None else read(value)
            for name, value, read in zip(names, values, decoders, strict=True)
        }

    return RowCodec(names, namespace["encode"], decode, tuple(converters))


def _refusal(
    schema: RowSchema, converters: Sequence[Callable[[Any], Any] | None]
) -> Callable[[Row], None]:
    def refused(row: Row) -> None:
        """Raise ``RecordError`` naming the first column whose value cannot be bound."""
        for column, convert in zip(schema.columns, converters, strict=True):
            value = row.get(column.name)
            if convert is None or value is None:
                continue
            try:
                convert(value)
            except Exception as exc:  # noqa: BLE001 - any refusal is the value's
                raise RecordError(
                    [FieldError(column.name, f"cannot be written as {column.type}: {exc}")]
                ) from None

    return refused


def _sqlite_json(value: Any) -> Any:
    # As SQLAlchemy's SQLite JSON type reads it: text is JSON, a number stands as itself.
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def read_utc(value: Any) -> datetime | None:
    """A stored timestamp as an aware UTC datetime: SQLite's text (``Z`` or an offset),
    or a driver's datetime (naive is UTC); None for anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        value = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def as_utc(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


class SqlTargetFactory:
    """The ``sql`` connector's factory: a ``SqlTarget``, with SQLAlchemy imported only
    when one is made; its rows' codec (``HasRowCodec``) needs no import."""

    def __call__(self, settings: SqlTargetSettings, *, base_dir: Path | None = None) -> Any:
        from custsync.targets.sql import SqlTarget

        return SqlTarget(settings, base_dir=base_dir)

    @classmethod
    def row_codec(cls, settings: SqlTargetSettings, schema: RowSchema) -> RowCodec:
        return row_codec(schema, dialect_of(settings.url))

    def __repr__(self) -> str:
        return "SqlTarget"
