"""The ``sql`` target: upserts rows into a table through SQLAlchemy 2, with each
dialect's native upsert (SQLite and PostgreSQL ``ON CONFLICT``, MariaDB/MySQL
``ON DUPLICATE KEY UPDATE``).

Every batch: read the stored rows of the batch's keys (locking them), decide per row
(inserted, updated, unchanged, stale), write only what changes. Knowing the stored rows
first gives exact outcomes on every dialect (MariaDB cannot say per row) and makes no-op
runs cheap. A refused row is isolated by bisection inside savepoints and reported FAILED
with the database's message; the rest is written. A batch commits on its own, or, after
``begin`` (``Transactional``), with the batches around it at ``commit``: the engine commits
every ``commit_interval``, where each commit would cost a flush to disk.

On PostgreSQL a batch of any size goes in with ``COPY`` into a temporary staging table
and one ``INSERT ... SELECT ... ON CONFLICT``: several times less work for the server and
the driver than a row-by-row upsert. When the database refuses that statement, the batch
takes the row-by-row path, where bisection finds the refused rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
    SQLAlchemyError,
)

from custsync._sqlite import bind_nulls_directly
from custsync.errors import (
    ConfigError,
    MissingDependencyError,
    RecordError,
    TargetError,
)
from custsync.targets._sqlrows import (
    DRIVERS,
    SqlTargetSettings,
    as_utc,
    decoder,
    dialect_of,
    normalise_url,
    read_utc,
    row_codec,
    utc_text,
)
from custsync.targets.base import (
    ColumnSpec,
    Encoded,
    FieldType,
    Key,
    Outcome,
    Row,
    RowCodec,
    RowResult,
    RowSchema,
)

__all__ = [
    "SqlTarget",
    "SqlTargetSettings",
    "UtcTimestamp",
    "dialect_of",
    "make_engine",
    "normalise_url",
    "row_codec",
    "safe_url",
    "utc_text",
]

# Bound parameters per SELECT ... IN: well under every dialect's limit.
_IN_CHUNK = 500
_COPY_MIN_ROWS = 50  # below this a COPY's extra statements cost more than they save


class UtcTimestamp(sa.types.TypeDecorator[datetime]):
    """UTC with microseconds on every dialect: ``timestamptz`` on PostgreSQL,
    ``DATETIME(6)`` holding UTC on MariaDB/MySQL, fixed-width ISO-8601 text with ``Z`` on
    SQLite (fixed width, so text order is time order for the stale guard)."""

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(_dialect("postgresql").TIMESTAMP(timezone=True))
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(_dialect("mysql").DATETIME(fsp=6))
        if dialect.name == "sqlite":
            return dialect.type_descriptor(sa.Text())
        return dialect.type_descriptor(sa.DateTime(timezone=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError("a timestamp column takes datetimes")
        utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if dialect.name == "sqlite":
            return utc_text(utc)
        if dialect.name in ("mysql", "mariadb"):
            return utc.replace(tzinfo=None)
        return utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return read_utc(value)


def _dialect(name: str) -> Any:
    """A SQLAlchemy dialect's module, imported when a run first needs it: importing them
    all costs a run on SQLite a tenth of a second before it reads anything."""
    return importlib.import_module(f"sqlalchemy.dialects.{name}")


def _column_type(
    column: ColumnSpec, *, key: bool, dialect: str, key_collation: str = "utf8mb4_bin"
) -> sa.types.TypeEngine[Any]:
    mysql_like = dialect in ("mysql", "mariadb")
    if key and column.type == "text":
        # Keys are compared exactly: a binary, no-pad collation on MariaDB/MySQL, where the
        # default would make "A@x.com" and "a@x.com" (or "abc" and "abc ") the same key.
        # Keys are normalised by the mapping, never by a collation.
        length = column.length or 255
        if mysql_like:
            return _dialect("mysql").VARCHAR(length, charset="utf8mb4", collation=key_collation)  # type: ignore[no-any-return]
        return sa.String(length)
    if column.type == "json" and dialect == "postgresql":
        return _dialect("postgresql").JSONB()  # type: ignore[no-any-return]
    kinds: dict[FieldType, sa.types.TypeEngine[Any]] = {
        "text": sa.Text(),
        "integer": sa.BigInteger(),
        "float": sa.Float(),
        "boolean": sa.Boolean(),
        "timestamp": UtcTimestamp(),
        "json": sa.JSON(),
    }
    return kinds[column.type]


class _DriverStatement:
    """The upsert compiled once to the driver's SQL, its parameters taken from encoded
    rows (``row_codec``): SQLAlchemy's per-row bind processing costs more than the
    database's work on a wide batch."""

    def __init__(self, statement: Any, dialect: Dialect, schema: RowSchema) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql: str = compiled.string
        self.positional = bool(compiled.positional)
        order = list(compiled.positiontup or []) if self.positional else list(compiled.binds)
        escaped = getattr(compiled, "escaped_bind_names", None) or {}
        names = [c.name for c in schema.columns]
        at = [names.index(compiled.binds[bind].key) for bind in order]
        self._build: Callable[[Sequence[Encoded]], Sequence[Any]]
        if self.positional and at == list(range(len(names))):
            self._build = lambda rows: rows  # the binds are the columns, in order
            return
        items = [
            f"r[{i}]" if self.positional else f"{escaped.get(bind, bind)!r}: r[{i}]"
            for bind, i in zip(order, at, strict=True)
        ]
        body = f"({', '.join(items)},)" if self.positional else f"{{{', '.join(items)}}}"
        namespace: dict[str, Any] = {}
        exec(f"def build(rows):\n    return [{body} for r in rows]", namespace)
        self._build = namespace["build"]

    def parameters(self, rows: Sequence[Encoded]) -> Sequence[Any]:
        return self._build(rows)


class _PgCopy:
    """PostgreSQL's bulk path: ``COPY`` a batch into a temporary table shaped like the
    target's mapped columns, then one ``INSERT ... SELECT ... ON CONFLICT`` moves it in.
    The staging table lives in the session and is emptied once its rows are in (a
    transaction may span batches). A batch whose keys the table does not hold yet (an
    initial load) is copied straight in."""

    def __init__(self, target: SqlTarget, table: sa.Table, schema: RowSchema) -> None:
        dialect = target.engine.dialect
        quote = dialect.identifier_preparer.quote
        names = [c.name for c in schema.columns]
        qualified = dialect.identifier_preparer.format_table(table)
        stage = "custsync_stage_" + hashlib.blake2b(qualified.encode(), digest_size=6).hexdigest()
        columns = ", ".join(quote(n) for n in names)
        self.create = (
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {stage} ON COMMIT DELETE ROWS AS "
            f"SELECT {columns} FROM {qualified} WITH NO DATA"
        )
        self.copy = f"COPY {stage} ({columns}) FROM STDIN"
        self.copy_in = f"COPY {qualified} ({columns}) FROM STDIN"
        self.empty = f"TRUNCATE {stage}"
        staged = sa.Table(stage, sa.MetaData(), *[sa.Column(n) for n in names])
        select = sa.select(*[staged.c[n] for n in names])
        upsert = target._upsert_statement(table, schema, source=select)
        self.insert: str = upsert.compile(dialect=dialect).string

    def copy_new(self, conn: Connection, rows: Sequence[Encoded]) -> bool:
        """Copy the rows straight into the table, in a savepoint: True when all are in.
        False when PostgreSQL refused the copy (a key stored already, a refused row, a
        table the copy cannot reach: row-level security refuses COPY FROM), with nothing
        of it left behind; a connection that died fails the caller's next statement."""
        import psycopg

        raw = conn.connection.driver_connection
        assert raw is not None
        try:
            with (
                conn.begin_nested(),
                raw.cursor() as cursor,
                cursor.copy(self.copy_in) as copy,
            ):
                for values in rows:  # encoded: the values in column order
                    copy.write_row(values)
        except psycopg.Error:
            return False
        return True

    def write(self, conn: Connection, rows: Sequence[Encoded], *, new: bool = False) -> bool:
        """True when the batch is in; False when PostgreSQL refused it (nothing of it is
        left behind: it ran in a savepoint), so the row-by-row path takes over.

        ``new``: the batch's keys were not in the table when the batch's locked pre-read
        ran, so its rows are plain inserts, copied into the table itself: a third less
        of the server's work and one statement less than staging them. Should another
        writer have inserted one of the keys since, the copy fails on it as a whole and
        the batch is staged and upserted after all."""
        import psycopg

        raw = conn.connection.driver_connection
        assert raw is not None
        if new and self.copy_new(conn, rows):
            return True
        try:
            with conn.begin_nested(), raw.cursor() as cursor:
                cursor.execute(self.create)
                with cursor.copy(self.copy) as copy:
                    for values in rows:
                        copy.write_row(values)
                cursor.execute(self.insert)
                cursor.execute(self.empty)
        except (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.CardinalityViolation):
            return False
        except psycopg.Error as exc:
            # The driver's own error (the connection went away...), said as the row path
            # would have said it.
            raise TargetError(f"writing {len(rows)} rows failed: {_db_message(exc)}") from exc
        return True


def _family(sa_type: sa.types.TypeEngine[Any]) -> str:
    """A coarse family of a reflected column type, to catch a mapping that cannot fit."""
    if isinstance(sa_type, sa.Boolean):
        return "boolean"
    if isinstance(sa_type, sa.Integer):
        return "integer"
    if isinstance(sa_type, sa.Float | sa.Numeric):
        return "float"
    if isinstance(sa_type, sa.DateTime | sa.Date):
        return "timestamp"
    if isinstance(sa_type, sa.JSON):
        return "json"
    return "text"


# A mapping type may go into a column of these families (text takes anything as text).
_FITS: dict[str, set[str]] = {
    "text": {"text", "json"},
    "integer": {"integer", "float", "text", "boolean"},
    "float": {"float", "text"},
    "boolean": {"boolean", "integer", "text"},
    "timestamp": {"timestamp", "text"},
    "json": {"json", "text"},
}


def make_engine(url: str, *, what: str = "the sql target") -> Engine:
    """An Engine with the session settings custsync relies on: UTC everywhere, strict
    MariaDB, and working SAVEPOINTs on SQLite."""
    url = normalise_url(url)
    dialect = url.split(":", 1)[0].split("+", 1)[0]
    if dialect in DRIVERS:
        _, module, label, extra = DRIVERS[dialect]
        try:
            __import__(module)
        except ImportError:
            raise MissingDependencyError(f"{what} on {label}", extra) from None
    # JSON columns are read back (the pre-read compares them) with orjson, several times
    # faster than the json module SQLAlchemy uses by default.
    kwargs: dict[str, Any] = {"json_deserializer": orjson.loads}
    if dialect == "sqlite":
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    if dialect == "postgresql":
        kwargs["connect_args"] = {"options": "-c timezone=UTC", "connect_timeout": 10}
    elif dialect in ("mysql", "mariadb"):
        kwargs["connect_args"] = {
            "init_command": "SET SESSION time_zone = '+00:00', "
            "sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'",
            "connect_timeout": 10,
            "charset": "utf8mb4",
        }
    try:
        engine = sa.create_engine(url, **kwargs)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ConfigError(f"cannot use this database URL: {exc}", key="target.url") from None
    if engine.dialect.name == "sqlite":
        bind_nulls_directly()
        _sqlite_transactions(engine)
    elif engine.dialect.driver == "psycopg":
        _psycopg_json(engine)
    return engine


def _psycopg_json(engine: Engine) -> None:
    # psycopg decodes json/jsonb itself (SQLAlchemy's deserializer is not used there).
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        from psycopg.types.json import set_json_loads

        set_json_loads(orjson.loads, dbapi_connection)


def _sqlite_transactions(engine: Engine) -> None:
    # pysqlite's own transaction handling breaks SAVEPOINT; take it over, as the
    # SQLAlchemy docs advise. BEGIN IMMEDIATE takes the write lock up front.
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def safe_url(engine_or_url: Engine | str) -> str:
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else sa.make_url(engine_or_url)
    return url.render_as_string(hide_password=True)


class SqlTarget:
    """Upserts rows into one table. See the module docstring for how a batch is written."""

    def __init__(self, settings: SqlTargetSettings, *, base_dir: Path | None = None) -> None:
        self.settings = settings
        self.engine = make_engine(settings.url)
        self._schema: RowSchema | None = None
        self._present: set[str] | None = None  # columns the table has (None: all of them)
        self._table: sa.Table | None = None
        self._exists = False
        self._upsert: Any = None
        self._copy: _PgCopy | None = None
        # Into a table this target made, each batch is tried first as new rows only
        # (``_insert_new``: SQLite's plain INSERT, PostgreSQL's COPY), while batches keep
        # finding none of their keys stored.
        self._insert: _DriverStatement | None = None
        self._can_insert_first = False  # the table is one it made, on SQLite or PostgreSQL
        self._insert_first = False  # the next batch is tried that way
        self._codec: RowCodec | None = None
        self._key_at: tuple[int, ...] = ()  # the key columns' places in an encoded row
        self._queries: dict[Any, Any] = {}  # statements built once per prepare
        self._held: Connection | None = None  # the transaction ``begin`` opened

    @classmethod
    def row_codec(cls, settings: SqlTargetSettings, schema: RowSchema) -> RowCodec:
        """How a run encodes this target's rows (``HasRowCodec``): known from the URL's
        dialect, before any connection."""
        return row_codec(schema, dialect_of(settings.url))

    def __repr__(self) -> str:
        return f"SqlTarget({safe_url(self.engine)}, table={self.settings.table!r})"

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    # --- preparing the table ----------------------------------------------------------

    def prepare(self, schema: RowSchema, *, create: bool = True) -> list[str]:
        self._schema = schema
        notes: list[str] = []
        name, db_schema = self.settings.table, self.settings.db_schema
        created = False
        try:
            inspector = sa.inspect(self.engine)
            exists = inspector.has_table(name, schema=db_schema)
            if not exists:
                if not (create and self.settings.create_table):
                    if not create:
                        notes.append(f"table {name} does not exist: every row would be inserted")
                    else:
                        raise ConfigError(
                            f"table {name} does not exist and create_table is false",
                            key="target.table",
                        )
                else:
                    self._create(schema)
                    notes.append(f"created table {name} ({len(schema.columns)} columns)")
                    exists = True
                    created = True
            else:
                notes += self._check_and_evolve(inspector, schema, create=create)
        except SQLAlchemyError as exc:
            raise TargetError(
                f"cannot prepare table {name} on {safe_url(self.engine)}: {_db_message(exc)}"
            ) from exc
        self._exists = exists
        self._queries = {}
        self._insert, self._can_insert_first, self._insert_first = None, False, False
        self._codec = row_codec(schema, self.dialect)
        self._key_at = tuple(self._codec.names.index(k) for k in schema.key)
        self._table = self._build_table(schema)
        self._upsert = _DriverStatement(
            self._upsert_statement(self._table, schema), self.engine.dialect, schema
        )
        if self.dialect == "postgresql":
            self._copy = _PgCopy(self, self._table, schema)
        if created and schema.match_policy != "update_only":
            if self.dialect == "sqlite":
                insert = _dialect("sqlite").insert(self._table)
                self._insert = _DriverStatement(insert, self.engine.dialect, schema)
            self._can_insert_first = self._insert is not None or self._copy is not None
            self._insert_first = self._can_insert_first
        return notes

    def _build_table(self, schema: RowSchema, *, for_create: bool = False) -> sa.Table:
        columns = [
            sa.Column(
                c.name,
                _column_type(
                    c,
                    key=c.name in schema.key,
                    dialect=self.dialect,
                    key_collation=self._key_collation(),
                ),
                nullable=c.nullable and c.name not in schema.key,
            )
            for c in schema.columns
        ]
        args: list[Any] = [*columns]
        kwargs: dict[str, Any] = {}
        if for_create:
            args.append(sa.PrimaryKeyConstraint(*schema.key, name=f"pk_{self.settings.table}"))
            if self.dialect == "sqlite":
                # SQLite does not enforce VARCHAR(n); the other dialects refuse a longer key.
                for key in schema.key:
                    length = schema.column(key).length or 255
                    args.append(sa.CheckConstraint(f'length("{key}") <= {length}'))
            kwargs = {"mysql_charset": "utf8mb4", "mariadb_charset": "utf8mb4"}
        return sa.Table(
            self.settings.table, sa.MetaData(), *args, schema=self.settings.db_schema, **kwargs
        )

    def _key_collation(self) -> str:
        dialect = self.engine.dialect
        if dialect.name not in ("mysql", "mariadb"):
            return "utf8mb4_bin"
        if getattr(dialect, "is_mariadb", False):
            return "utf8mb4_nopad_bin"  # MariaDB 10.2+
        return "utf8mb4_0900_bin"  # MySQL 8: binary and no-pad

    def _create(self, schema: RowSchema) -> None:
        table = self._build_table(schema, for_create=True)
        identity = self.settings.id_column
        if identity is not None and identity not in table.c and self.dialect == "postgresql":
            table.append_column(sa.Column(identity, sa.BigInteger(), sa.Identity(), nullable=False))
        with self.engine.begin() as conn:
            table.create(conn, checkfirst=True)
            if identity is None or identity in {c.name for c in schema.columns}:
                return
            preparer = self.engine.dialect.identifier_preparer
            name, column = preparer.format_table(table), preparer.quote(identity)
            if self.dialect in ("mysql", "mariadb"):
                conn.exec_driver_sql(
                    f"ALTER TABLE {name} ADD COLUMN {column} BIGINT NOT NULL AUTO_INCREMENT UNIQUE"
                )
            elif self.dialect == "sqlite":
                # SQLite numbers only an INTEGER PRIMARY KEY, and the key is ours: a
                # trigger numbers new rows instead.
                conn.exec_driver_sql(f"ALTER TABLE {name} ADD COLUMN {column} INTEGER")
                trigger = preparer.quote(f"{self.settings.table}_{identity}_number")
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {trigger} AFTER INSERT ON {name} WHEN NEW.{column} IS NULL "
                    f"BEGIN UPDATE {name} SET {column} = "
                    f"(SELECT IFNULL(MAX({column}), 0) + 1 FROM {name}) "
                    f"WHERE rowid = NEW.rowid; END"
                )

    def _check_and_evolve(
        self, inspector: sa.Inspector, schema: RowSchema, *, create: bool
    ) -> list[str]:
        name, db_schema = self.settings.table, self.settings.db_schema
        existing = {c["name"]: c for c in inspector.get_columns(name, schema=db_schema)}
        lowered = {n.lower(): n for n in existing}
        missing_keys = [k for k in schema.key if k not in existing and k.lower() not in lowered]
        if missing_keys:
            raise ConfigError(
                f"table {name} has no key column {missing_keys[0]!r}", key="target.key"
            )
        identity = self.settings.id_column
        if identity is not None and identity not in existing:
            raise ConfigError(
                f"table {name} has no column {identity!r} (id_column): an existing table "
                "must already have the column its database fills",
                key="target.id_column",
            )
        if not self._has_unique(inspector, schema.key):
            raise ConfigError(
                f"table {name} has no primary key or unique constraint on "
                f"({', '.join(schema.key)}): upserts need one",
                key="target.key",
            )
        for column in schema.columns:
            found = existing.get(column.name)
            if found is None:
                continue
            family = _family(found["type"])
            if family not in _FITS[column.type]:
                raise ConfigError(
                    f"column {name}.{column.name} is {found['type']} but the mapping "
                    f"gives {column.type}",
                    key=f"mapping.fields.{column.name}",
                )
        notes: list[str] = []
        added = [
            c for c in schema.columns if c.name not in existing and c.name.lower() not in lowered
        ]
        if added and not create:
            # A dry run: reads must not name the columns that are not there yet.
            self._present = {c.name for c in schema.columns} - {c.name for c in added}
            return [f"would add column(s) {', '.join(c.name for c in added)} to {name}"]
        if added:
            self._add_columns(added)
            notes.append(f"added column(s) {', '.join(c.name for c in added)} to {name}")
        return notes

    def _add_columns(self, columns: Sequence[ColumnSpec]) -> None:
        """ALTER TABLE ... ADD COLUMN, nullable: columns are added, never dropped or retyped."""
        dialect = self.engine.dialect
        preparer = dialect.identifier_preparer
        table_sql = preparer.format_table(
            sa.Table(self.settings.table, sa.MetaData(), schema=self.settings.db_schema)
        )
        with self.engine.begin() as conn:
            for column in columns:
                sa_type = _column_type(column, key=False, dialect=self.dialect).compile(
                    dialect=dialect
                )
                quoted = preparer.quote(column.name)
                conn.exec_driver_sql(f"ALTER TABLE {table_sql} ADD COLUMN {quoted} {sa_type}")

    def _has_unique(self, inspector: sa.Inspector, key: Sequence[str]) -> bool:
        name, db_schema = self.settings.table, self.settings.db_schema
        wanted = {k.lower() for k in key}
        pk = inspector.get_pk_constraint(name, schema=db_schema)
        candidates: list[Sequence[str | None]] = [pk.get("constrained_columns") or []]
        candidates += [
            u["column_names"] for u in inspector.get_unique_constraints(name, schema=db_schema)
        ]
        candidates += [
            i["column_names"]
            for i in inspector.get_indexes(name, schema=db_schema)
            if i.get("unique")
        ]
        return any({str(c).lower() for c in cols if c} == wanted for cols in candidates)

    # --- statements -------------------------------------------------------------------

    def _upsert_statement(self, table: sa.Table, schema: RowSchema, source: Any = None) -> Any:
        """The dialect's upsert of one row's values, or of ``source``'s rows (a SELECT of
        every mapped column, in order) where the dialect is PostgreSQL or SQLite."""
        key = set(schema.key)
        updatable = [c.name for c in schema.columns if c.name not in key]
        if schema.match_policy == "create_only":
            updatable = []
        if self.dialect in ("postgresql", "sqlite"):
            stmt = _dialect(self.dialect).insert(table)
            if source is not None:
                stmt = stmt.from_select([c.name for c in schema.columns], source)
            if not updatable:
                return stmt.on_conflict_do_nothing(index_elements=list(schema.key))
            where = None
            if schema.guard:
                stored, incoming = table.c[schema.guard], stmt.excluded[schema.guard]
                where = sa.or_(stored.is_(None), incoming.is_(None), stored <= incoming)
            return stmt.on_conflict_do_update(
                index_elements=list(schema.key),
                set_={name: stmt.excluded[name] for name in updatable},
                where=where,
            )
        if self.dialect in ("mysql", "mariadb"):
            stmt = _dialect("mysql").insert(table)
            if not updatable:
                first = schema.key[0]
                return stmt.on_duplicate_key_update([(first, table.c[first])])
            assignments: list[tuple[str, Any]] = []
            if schema.guard:
                stored, incoming = table.c[schema.guard], stmt.inserted[schema.guard]
                ok = sa.or_(stored.is_(None), incoming.is_(None), stored <= incoming)
                # MySQL applies assignments left to right, each seeing the ones before:
                # the guard column goes last so every condition reads the stored value.
                ordered = [n for n in updatable if n != schema.guard] + [schema.guard]
                for name in ordered:
                    assignments.append(
                        (name, sa.case((ok, stmt.inserted[name]), else_=table.c[name]))
                    )
            else:
                assignments = [(name, stmt.inserted[name]) for name in updatable]
            return stmt.on_duplicate_key_update(assignments)
        raise ConfigError(
            f"the sql target has no upsert for {self.dialect} yet "
            "(SQLite, PostgreSQL, MariaDB and MySQL are supported)",
            key="target.url",
        )

    # --- writing ----------------------------------------------------------------------

    def _ready(self) -> tuple[sa.Table, RowSchema]:
        if self._table is None or self._schema is None:
            raise TargetError("prepare() must be called before writing")
        return self._table, self._schema

    def _key_of(self, row: Encoded) -> Key:
        at = self._key_at
        if len(at) == 1:
            return (row[at[0]],)
        return tuple([row[i] for i in at])

    def _encoded(
        self, rows: Sequence[Row] | Sequence[Encoded]
    ) -> tuple[list[Encoded], list[RowResult]]:
        """Rows as ``row_codec`` encodes them (a run's rows come encoded already), and a
        FAILED result for each row whose values cannot be bound."""
        if not rows or rows[0].__class__ is tuple:
            return cast(list[Encoded], list(rows)), []
        assert self._codec is not None
        assert self._schema is not None
        encode, key_of = self._codec.encode, self._schema.key_of
        encoded, refused = [], []
        for row in cast(Sequence[Row], rows):
            try:
                encoded.append(encode(row))
            except RecordError as exc:
                message = "; ".join(f"{e.field}: {e.message}" for e in exc.errors)
                refused.append(RowResult(key_of(row), Outcome.FAILED, message))
        return encoded, refused

    def preview(self, rows: Sequence[Row] | Sequence[Encoded]) -> list[RowResult]:
        table, schema = self._ready()
        encoded, refused = self._encoded(rows)
        if not self._exists:
            return refused + [
                RowResult(
                    self._key_of(r),
                    Outcome.FAILED if schema.match_policy == "update_only" else Outcome.INSERTED,
                    _NO_ROW if schema.match_policy == "update_only" else None,
                )
                for r in encoded
            ]
        try:
            with self.engine.connect() as conn:
                stored = self._stored(conn, table, schema, encoded, lock=False)
                conn.rollback()
        except SQLAlchemyError as exc:
            raise TargetError(f"cannot read {self.settings.table}: {_db_message(exc)}") from exc
        return refused + [result for result, _ in self._classify(schema, encoded, stored)]

    def write(self, rows: Sequence[Row] | Sequence[Encoded]) -> list[RowResult]:
        """Upsert rows, as dicts or as ``row_codec`` encodes them."""
        table, schema = self._ready()
        encoded, results = self._encoded(rows)
        if not encoded:
            return results
        try:
            with self._transaction() as conn:
                decided: list[tuple[RowResult, Encoded | None]]
                if self._insert_first and self._insert_new(conn, encoded):
                    decided = [(RowResult(self._key_of(r), Outcome.INSERTED), r) for r in encoded]
                    failures = {}
                else:
                    stored = self._stored(conn, table, schema, encoded, lock=True)
                    decided = self._classify(schema, encoded, stored)
                    to_write = [row for (result, row) in decided if row is not None]
                    failures = (
                        self._write_rows(conn, schema, to_write, new=not stored) if to_write else {}
                    )
                    self._insert_first = self._can_insert_first and not stored
                ids = self._target_ids(conn, schema, encoded) if self.settings.id_column else {}
        except SQLAlchemyError as exc:
            raise TargetError(
                f"writing {len(encoded)} rows to {self.settings.table} failed: {_db_message(exc)}"
            ) from exc
        for result, _row in decided:
            message = failures.get(result.key)
            if message is not None:
                result = RowResult(result.key, Outcome.FAILED, message)
            elif result.key in ids:
                result = RowResult(result.key, result.outcome, result.message, ids[result.key])
            results.append(result)
        return results

    # --- transactions across batches (``Transactional``) ---------------------------------

    def begin(self) -> None:
        """Open a transaction: the writes until ``commit`` or ``rollback`` join it."""
        if self._held is not None:
            raise RuntimeError("a transaction is open already")
        conn = self.engine.connect()
        try:
            conn.begin()
        except SQLAlchemyError as exc:
            conn.close()
            raise TargetError(f"cannot write to {self.settings.table}: {_db_message(exc)}") from exc
        self._held = conn

    def commit(self) -> None:
        conn, self._held = self._held, None
        if conn is None:
            return
        try:
            conn.commit()
        except SQLAlchemyError as exc:
            raise TargetError(
                f"committing to {self.settings.table} failed: {_db_message(exc)}"
            ) from exc
        finally:
            conn.close()

    def rollback(self) -> None:
        conn, self._held = self._held, None
        if conn is None:
            return
        try:
            conn.rollback()
        except SQLAlchemyError:
            pass  # the connection is gone, and its transaction with it
        finally:
            with contextlib.suppress(SQLAlchemyError):
                conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """The open transaction (committed by ``commit``), or one for this batch alone."""
        if self._held is not None:
            yield self._held
            return
        with self.engine.begin() as conn:
            yield conn

    def _target_ids(
        self, conn: Connection, schema: RowSchema, rows: Sequence[Encoded]
    ) -> dict[Key, str]:
        column = self.settings.id_column
        assert column is not None
        table = sa.Table(
            self.settings.table,
            sa.MetaData(),
            *[sa.Column(k, sa.String()) for k in schema.key],
            sa.Column(column),
            schema=self.settings.db_schema,
        )
        key_cols = [table.c[k] for k in schema.key]
        keys = [self._key_of(r) for r in rows]
        found: dict[Key, str] = {}
        for start in range(0, len(keys), _IN_CHUNK):
            chunk = keys[start : start + _IN_CHUNK]
            condition = _keys_in(key_cols, chunk)
            for row in conn.execute(sa.select(*key_cols, table.c[column]).where(condition)):
                if row[-1] is not None:
                    found[tuple(row[:-1])] = str(row[-1])
        return found

    def _stored(
        self,
        conn: Connection,
        table: sa.Table,
        schema: RowSchema,
        rows: Sequence[Encoded],
        *,
        lock: bool,
    ) -> dict[Key, Row]:
        keys = [self._key_of(r) for r in rows]
        if self.dialect == "postgresql" and len(schema.key) == 1:
            return self._stored_pg(conn, table, schema.key[0], keys, lock=lock)
        if self.dialect == "sqlite" and len(schema.key) == 1:
            return self._stored_sqlite(conn, table, schema.key[0], keys)
        query = self._stored_query(table, schema, lock=lock)
        single = len(schema.key) == 1
        out: dict[Key, Row] = {}
        for start in range(0, len(keys), _IN_CHUNK):
            chunk = keys[start : start + _IN_CHUNK]
            values = [k[0] for k in chunk] if single else list(chunk)
            for stored in conn.execute(query, {"keys": values}).mappings():
                out[tuple(stored[k] for k in schema.key)] = dict(stored)
        return out

    def _stored_query(self, table: sa.Table, schema: RowSchema, *, lock: bool) -> Any:
        """The pre-read, built once: a statement built per batch leaves reference cycles
        (SQLAlchemy's bind parameters) holding the batch's keys, which pile up between the
        collector's rare full passes."""
        cached = self._queries.get(lock)
        if cached is None:
            key_cols = [table.c[k] for k in schema.key]
            target = key_cols[0] if len(key_cols) == 1 else sa.tuple_(*key_cols)
            columns = [c for c in table.columns if self._present is None or c.name in self._present]
            cached = sa.select(*columns).where(target.in_(sa.bindparam("keys", expanding=True)))
            if lock and self.dialect != "sqlite":
                cached = cached.with_for_update()
            self._queries[lock] = cached
        return cached

    def _stored_pg(
        self, conn: Connection, table: sa.Table, key: str, keys: Sequence[Key], *, lock: bool
    ) -> dict[Key, Row]:
        """The batch's stored rows in one statement, ``key = ANY(array)``: PostgreSQL plans
        one array parameter in a fraction of the time of a long IN list. psycopg hands back
        the values SQLAlchemy would (aware datetimes, decoded JSON)."""
        names = [c.name for c in table.columns if self._present is None or c.name in self._present]
        sql = self._queries.get(("any", lock))
        if sql is None:
            preparer = self.engine.dialect.identifier_preparer
            sql = self._queries[("any", lock)] = (
                f"SELECT {', '.join(preparer.quote(n) for n in names)} "
                f"FROM {preparer.format_table(table)} "
                f"WHERE {preparer.quote(key)} = ANY(%(keys)s)" + (" FOR UPDATE" if lock else "")
            )
        where = names.index(key)
        found = conn.exec_driver_sql(sql, {"keys": [k[0] for k in keys]})
        return {(row[where],): dict(zip(names, row, strict=True)) for row in found}

    def _stored_sqlite(
        self, conn: Connection, table: sa.Table, key: str, keys: Sequence[Key]
    ) -> dict[Key, Row]:
        """The batch's stored rows through the driver's own cursor, each value decoded as
        the column's type would have (``decoder``) when it is first read: a row whose
        guard column decides is never decoded whole. SQLAlchemy's result machinery cost
        more than SQLite's work. The cursor is the connection's: same transaction."""
        _, schema = self._ready()
        names = [c.name for c in table.columns if self._present is None or c.name in self._present]
        decoders = {n: (i, decoder(schema.column(n).type, "sqlite")) for i, n in enumerate(names)}
        where = names.index(key)
        preparer = self.engine.dialect.identifier_preparer
        head = (
            f"SELECT {', '.join(preparer.quote(n) for n in names)} "
            f"FROM {preparer.format_table(table)} WHERE {preparer.quote(key)} IN "
        )
        cursor = conn.connection.cursor()
        out: dict[Key, Row] = {}
        try:
            for start in range(0, len(keys), _IN_CHUNK):
                chunk = [k[0] for k in keys[start : start + _IN_CHUNK]]
                sql = self._queries.get(("in", len(chunk)))
                if sql is None:
                    sql = self._queries[("in", len(chunk))] = (
                        head + f"({','.join('?' * len(chunk))})"
                    )
                cursor.execute(sql, chunk)
                for stored in cursor.fetchall():
                    out[(stored[where],)] = _StoredRow(stored, decoders)
        finally:
            cursor.close()
        return out

    def _classify(
        self, schema: RowSchema, rows: Sequence[Encoded], stored: Mapping[Key, Row]
    ) -> list[tuple[RowResult, Encoded | None]]:
        decided: list[tuple[RowResult, Encoded | None]] = []
        guard = schema.guard
        columns = [c.name for c in schema.columns]
        assert self._codec is not None
        decode = self._codec.decode
        if guard is not None:
            guard_at = self._codec.names.index(guard)
            guard_value = decoder(schema.column(guard).type, self.dialect) or (lambda v: v)
        for encoded in rows:
            key = self._key_of(encoded)
            current = stored.get(key)
            if current is None:
                if schema.match_policy == "update_only":
                    decided.append((RowResult(key, Outcome.FAILED, _NO_ROW), None))
                else:
                    decided.append((RowResult(key, Outcome.INSERTED), encoded))
                continue
            if schema.match_policy == "create_only":
                decided.append((RowResult(key, Outcome.UNCHANGED), None))
                continue
            # Compared as read back: the stored row, and this one as it would be stored.
            if guard is not None:
                old, new = current.get(guard), encoded[guard_at]
                if old is not None and new is not None:
                    new = guard_value(new)
                    old, new = as_utc(old), as_utc(new)
                    if old > new:
                        decided.append((RowResult(key, Outcome.STALE), None))
                        continue
                    if old < new:  # the guard column itself differs: no need to look further
                        decided.append((RowResult(key, Outcome.UPDATED), encoded))
                        continue
            row = decode(encoded)
            if all(_same(current.get(name), row.get(name)) for name in columns):
                decided.append((RowResult(key, Outcome.UNCHANGED), None))
            else:
                decided.append((RowResult(key, Outcome.UPDATED), encoded))
        return decided

    def _insert_new(self, conn: Connection, rows: Sequence[Encoded]) -> bool:
        """Insert the batch as new rows, in a savepoint: True when all of it is in. A
        table this target made holds only what it wrote since, so the pre-read mostly
        finds nothing, and costs about a third of the write. Where a key is there after
        all (a key again, another writer) or the database refuses a row, the database
        fails the statement, the savepoint undoes it, and the batch is written the
        general way (pre-read, compare, upsert), which also tells which rows failed and
        why. The next batch tries the insert again only if that pre-read found none of
        the batch's keys stored. PostgreSQL copies the rows in (``_PgCopy.copy_new``)."""
        if self._copy is not None:
            if len(rows) >= _COPY_MIN_ROWS and self._copy.copy_new(conn, rows):
                return True
            self._insert_first = False
            return False
        assert self._insert is not None
        try:
            with conn.begin_nested():
                conn.exec_driver_sql(self._insert.sql, self._insert.parameters(rows))
        except (DBAPIError, OverflowError) as exc:
            if isinstance(exc, DBAPIError) and exc.connection_invalidated:
                raise
            self._insert_first = False
            return False
        return True

    def _write_rows(
        self, conn: Connection, schema: RowSchema, rows: Sequence[Encoded], *, new: bool = False
    ) -> dict[Key, str]:
        """The batch in bulk where the dialect has a bulk path (once: its staging table
        holds one batch a transaction), else, or when refused, row by row. ``new``: none
        of the rows' keys is in the table (the pre-read found none)."""
        if (
            self._copy is not None
            and len(rows) >= _COPY_MIN_ROWS
            and self._copy.write(conn, rows, new=new)
        ):
            return {}
        return self._write_isolating(conn, schema, rows)

    def _write_isolating(
        self, conn: Connection, schema: RowSchema, rows: Sequence[Encoded]
    ) -> dict[Key, str]:
        """Write rows in a savepoint; when the database refuses, split the batch in halves
        until the refused rows stand alone, and return their messages by key."""
        try:
            with conn.begin_nested():
                conn.exec_driver_sql(self._upsert.sql, self._upsert.parameters(rows))
            return {}
        except (IntegrityError, DataError, OverflowError) as exc:
            # OverflowError: the sqlite3 driver refuses an integer beyond 64 bits itself.
            if len(rows) == 1:
                return {self._key_of(rows[0]): _db_message(exc)}
        except DBAPIError as exc:
            if exc.connection_invalidated or (len(rows) > 1 and not _row_level(exc)):
                raise
            if len(rows) == 1:
                if not _row_level(exc):
                    raise
                return {self._key_of(rows[0]): _db_message(exc)}
        middle = len(rows) // 2
        failures = self._write_isolating(conn, schema, rows[:middle])
        failures.update(self._write_isolating(conn, schema, rows[middle:]))
        return failures

    # --- reconciliation -------------------------------------------------------------

    def scan(self, column: str) -> Iterator[tuple[Key, Any]]:
        table, schema = self._ready()
        if column not in table.c:
            raise ConfigError(f"the table has no column {column!r}", key="mapping")
        keys = [table.c[k] for k in schema.key]
        query = sa.select(*keys, table.c[column]).execution_options(yield_per=5_000)
        with self.engine.connect() as conn:
            for row in conn.execute(query):
                yield tuple(row[: len(keys)]), row[len(keys)]

    def flag(self, keys: Sequence[Key], *, column: str) -> int:
        _, schema = self._ready()
        name, db_schema = self.settings.table, self.settings.db_schema
        present = {c["name"] for c in sa.inspect(self.engine).get_columns(name, schema=db_schema)}
        if column not in present:
            self._add_columns([ColumnSpec(column, "timestamp")])
        table = sa.Table(
            name,
            sa.MetaData(),
            *[sa.Column(k, sa.String()) for k in schema.key],
            sa.Column(column, UtcTimestamp()),
            schema=db_schema,
        )
        now = datetime.now(UTC)
        return self._by_keys(
            keys, lambda cond: sa.update(table).where(cond).values({column: now}), schema, table
        )

    def delete(self, keys: Sequence[Key]) -> int:
        table, schema = self._ready()
        return self._by_keys(keys, lambda cond: sa.delete(table).where(cond), schema, table)

    def _by_keys(
        self,
        keys: Sequence[Key],
        statement: Callable[[Any], Any],
        schema: RowSchema,
        table: sa.Table,
    ) -> int:
        key_cols = [table.c[k] for k in schema.key]
        changed = 0
        with self.engine.begin() as conn:
            for start in range(0, len(keys), _IN_CHUNK):
                chunk = keys[start : start + _IN_CHUNK]
                condition = _keys_in(key_cols, chunk)
                changed += conn.execute(statement(condition)).rowcount or 0
        return changed

    def count(self) -> int:
        """How many rows the table holds (for summaries and tests)."""
        table, _ = self._ready()
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())

    def check(self) -> list[str]:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return [f"reached {safe_url(self.engine)} ({self.dialect})"]

    def close(self) -> None:
        self.rollback()  # a transaction still open was not committed: it never happened
        self.engine.dispose()


_NO_ROW = "no row with this key, and match_policy = update_only"


def _keys_in(key_cols: Sequence[Any], keys: Sequence[Key]) -> Any:
    """``key IN (...)``, or ``(k1, k2) IN (...)`` for a composite key."""
    if len(key_cols) == 1:
        return key_cols[0].in_([k[0] for k in keys])
    return sa.tuple_(*key_cols).in_(keys)


def _row_level(exc: DBAPIError) -> bool:
    """Errors that belong to one row's values (an out-of-range number, bad text), as some
    drivers raise them outside IntegrityError/DataError (MariaDB: OperationalError 1292...)."""
    code = getattr(exc.orig, "args", (None,))[0]
    return isinstance(code, int) and code in {1264, 1265, 1292, 1366, 1406, 1048, 3140, 4025}


def _db_message(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc)
    return " ".join(text.split())[:1000]


class _StoredRow(Mapping[str, Any]):
    """A row the SQLite pre-read found, its values decoded as they are read."""

    __slots__ = ("_decoders", "_values")

    def __init__(
        self, values: Sequence[Any], decoders: Mapping[str, tuple[int, Callable[[Any], Any] | None]]
    ) -> None:
        self._values = values
        self._decoders = decoders

    def __getitem__(self, name: str) -> Any:
        at, decode = self._decoders[name]
        value = self._values[at]
        return value if decode is None or value is None else decode(value)

    def __iter__(self) -> Iterator[str]:
        return iter(self._decoders)

    def __len__(self) -> int:
        return len(self._decoders)


def _same(stored: Any, incoming: Any) -> bool:
    if isinstance(stored, datetime) and isinstance(incoming, datetime):
        return bool(as_utc(stored) == as_utc(incoming))
    if isinstance(stored, float) or isinstance(incoming, float):
        try:
            return stored is not None and incoming is not None and float(stored) == float(incoming)
        except (TypeError, ValueError):
            return False
    return bool(stored == incoming)
