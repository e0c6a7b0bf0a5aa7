"""The sql target on SQLite (a file), PostgreSQL and MariaDB: the target contract, the
storage types, table evolution, per-row refusals and each dialect's quirks.

Every test writes to tables of its own (a uuid in the name) and drops them afterwards,
so runs can share the servers.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from custsync.errors import ConfigError, RecordError
from custsync.targets.base import ColumnSpec, FieldType, Key, Outcome, Row, RowSchema
from custsync.targets.sql import (
    SqlTarget,
    SqlTargetSettings,
    UtcTimestamp,
    make_engine,
    utc_text,
)
from custsync.testing import CONTRACT_SCHEMA, TargetContract

T0 = datetime(2024, 5, 17, 8, 30, 12, 345678, tzinfo=UTC)
T1 = T0 + timedelta(seconds=1)
SCHEMA = CONTRACT_SCHEMA
TIER = ColumnSpec("tier", "text")

SQLITE = pytest.param("sqlite", id="sqlite")
POSTGRES = pytest.param("pg_url", marks=pytest.mark.postgres, id="postgres")
MARIADB = pytest.param("mysql_url", marks=pytest.mark.mysql, id="mariadb")

# What each database says when a key is longer than its column (SQLite: our CHECK).
TOO_LONG = {
    "sqlite": "CHECK constraint failed",
    "postgresql": "value too long for type character varying(64)",
    "mysql": "Data too long for column 'key'",
    "mariadb": "Data too long for column 'key'",
}


class Db:
    """One database for one test: targets on tables of their own, dropped at the end."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self.tables: list[str] = []
        self.targets: list[SqlTarget] = []

    def table_name(self) -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.tables.append(name)
        return name

    def target(self, table: str | None = None, **settings: Any) -> SqlTarget:
        made = SqlTarget(
            SqlTargetSettings(url=self.url, table=table or self.table_name(), **settings)
        )
        self.targets.append(made)
        return made

    def prepared(self, schema: RowSchema = SCHEMA, table: str | None = None) -> SqlTarget:
        target = self.target(table)
        target.prepare(schema)
        return target

    def inspector(self) -> sa.Inspector:
        return sa.inspect(self.engine)

    def columns(self, table: str) -> dict[str, Any]:
        return {c["name"]: c for c in self.inspector().get_columns(table)}

    def stored(self, table: str, schema: RowSchema, key: Key) -> dict[str, Any]:
        found = _read(self.engine, table, schema, key)
        assert found is not None, f"no row {key} in {table}"
        return found

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def close(self) -> None:
        for target in self.targets:
            target.close()
        preparer = self.engine.dialect.identifier_preparer
        with self.engine.begin() as conn:
            for name in self.tables:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {preparer.quote(name)}")
        self.engine.dispose()


def _read(engine: sa.Engine, table: str, schema: RowSchema, key: Key) -> dict[str, Any] | None:
    """The stored row, read back through the column types, not through the target."""
    t = _reading_table(table, schema)
    where = sa.and_(*(t.c[name] == value for name, value in zip(schema.key, key, strict=True)))
    with engine.connect() as conn:
        found = conn.execute(sa.select(t).where(where)).mappings().first()
    return dict(found) if found is not None else None


def _reading_table(name: str, schema: RowSchema) -> sa.Table:
    types: dict[FieldType, Any] = {
        "text": sa.Text(),
        "integer": sa.BigInteger(),
        "float": sa.Float(),
        "boolean": sa.Boolean(),
        "timestamp": UtcTimestamp(),
        "json": sa.JSON(),
    }
    columns = [
        sa.Column(c.name, sa.String(c.length or 255) if c.name in schema.key else types[c.type])
        for c in schema.columns
    ]
    return sa.Table(name, sa.MetaData(), *columns)


def _url(request: pytest.FixtureRequest, tmp_path: Path, param: str) -> str:
    if param == "sqlite":
        return f"sqlite:///{tmp_path / 'target.db'}"
    url: str = request.getfixturevalue(param)
    return url


@pytest.fixture(params=[SQLITE, POSTGRES, MARIADB])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    made = Db(_url(request, tmp_path, request.param))
    yield made
    made.close()


@pytest.fixture
def pg(pg_url: str) -> Iterator[Db]:
    made = Db(pg_url)
    yield made
    made.close()


@pytest.fixture
def maria(mysql_url: str) -> Iterator[Db]:
    made = Db(mysql_url)
    yield made
    made.close()


@pytest.fixture
def lite(tmp_path: Path) -> Iterator[Db]:
    made = Db(f"sqlite:///{tmp_path / 'target.db'}")
    yield made
    made.close()


def row(key: str, **values: Any) -> dict[str, Any]:
    return TargetContract.row(key, **values)


def outcomes(results: Any) -> dict[Key, Outcome]:
    return {r.key: r.outcome for r in results}


# --- the contract -----------------------------------------------------------------------


class TestSqlTargetContract(TargetContract):
    supports_refusal = True

    @pytest.fixture
    def target_factory(self, db: Db) -> Callable[[], SqlTarget]:
        return db.target

    @pytest.fixture
    def refused_row(self) -> dict[str, Any]:
        return self.row("x" * 65)  # longer than the key column: every dialect refuses it

    def read_back(self, target: Any, key: Key) -> dict[str, Any] | None:
        if target.dialect != "sqlite":
            return _read(target.engine, target.settings.table, self.schema, key)
        # A reader of its own: the target's connections begin with SQLite's write lock,
        # which a transaction the target holds open keeps.
        reader = sa.create_engine(target.engine.url)
        try:
            return _read(reader, target.settings.table, self.schema, key)
        finally:
            reader.dispose()


# --- storage types (DESIGN, semantics 10) ------------------------------------------------


def test_key_column_is_a_varchar_with_a_primary_key(db: Db) -> None:
    target = db.prepared()
    table = target.settings.table
    key = db.columns(table)["key"]
    assert isinstance(key["type"], sa.String)
    assert not isinstance(key["type"], sa.Text)
    assert key["type"].length == 64
    assert key["nullable"] is False
    assert db.inspector().get_pk_constraint(table)["constrained_columns"] == ["key"]


@pytest.mark.postgres
def test_postgres_stores_timestamptz_and_jsonb(pg: Db) -> None:
    table = pg.prepared().settings.table
    types = {
        name: pg.scalar(
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_name = :t AND column_name = :c",
            t=table,
            c=name,
        )
        for name in ("key", "updated_at", "data")
    }
    assert types == {
        "key": "character varying",
        "updated_at": "timestamp with time zone",
        "data": "jsonb",
    }
    assert isinstance(pg.columns(table)["data"]["type"], postgresql.JSONB)


@pytest.mark.mysql
def test_mariadb_stores_utc_in_datetime6_and_keys_in_a_binary_collation(maria: Db) -> None:
    target = maria.prepared()
    table = target.settings.table
    plus_two = T0.astimezone(timezone(timedelta(hours=2)))
    target.write([row("a", updated_at=plus_two)])

    def column(name: str, what: str) -> Any:
        return maria.scalar(
            f"SELECT {what} FROM information_schema.columns "
            "WHERE table_schema = DATABASE() AND table_name = :t AND column_name = :c",
            t=table,
            c=name,
        )

    assert column("updated_at", "column_type") == "datetime(6)"
    assert column("key", "column_type") == "varchar(64)"
    assert column("key", "collation_name") == "utf8mb4_nopad_bin"
    stored = maria.scalar(f"SELECT CAST(updated_at AS CHAR) FROM {table}")
    assert stored == "2024-05-17 08:30:12.345678"  # the UTC wall time, not +02:00


def test_sqlite_stores_timestamps_as_iso_text_with_z(lite: Db) -> None:
    target = lite.prepared()
    table = target.settings.table
    target.write([row("a", updated_at=T0.astimezone(timezone(timedelta(hours=-5))))])
    stored = lite.scalar(f"SELECT updated_at || '|' || typeof(updated_at) FROM {table}")
    assert stored == "2024-05-17T08:30:12.345678Z|text"
    assert lite.columns(table)["updated_at"]["type"].__class__ is sa.TEXT


# --- evolving and checking an existing table ---------------------------------------------


def test_a_column_added_to_the_mapping_is_added_nullable(db: Db) -> None:
    before = db.prepared()
    table = before.settings.table
    before.write([row("old")])
    wider = replace(SCHEMA, columns=(*SCHEMA.columns, TIER))
    after = db.target(table)
    notes = after.prepare(wider)
    assert any("added column(s) tier" in note for note in notes)
    assert db.columns(table)["tier"]["nullable"] is True
    assert db.stored(table, wider, ("old",))["tier"] is None
    assert outcomes(after.write([row("old", tier=None)])) == {("old",): Outcome.UNCHANGED}
    assert outcomes(after.write([row("old", tier="gold")])) == {("old",): Outcome.UPDATED}
    assert outcomes(after.write([row("new", tier="gold")])) == {("new",): Outcome.INSERTED}


def test_a_dry_run_does_not_add_the_column(db: Db) -> None:
    table = db.prepared().settings.table
    notes = db.target(table).prepare(replace(SCHEMA, columns=(*SCHEMA.columns, TIER)), create=False)
    assert any("would add column(s) tier" in note for note in notes)
    assert "tier" not in db.columns(table)


def test_preview_works_before_a_new_column_is_added(db: Db) -> None:
    before = db.prepared()
    table = before.settings.table
    before.write([row("old")])
    dry = db.target(table)
    dry.prepare(replace(SCHEMA, columns=(*SCHEMA.columns, TIER)), create=False)
    previewed = dry.preview([row("old", tier="gold"), row("new", tier=None)])
    assert outcomes(previewed) == {("old",): Outcome.UPDATED, ("new",): Outcome.INSERTED}


def test_a_table_without_a_unique_key_is_a_config_error_naming_it(db: Db) -> None:
    table = db.table_name()
    sa.Table(
        table, sa.MetaData(), sa.Column("key", sa.String(64)), sa.Column("name", sa.Text)
    ).create(db.engine)
    with pytest.raises(ConfigError, match=rf"table {table} has no primary key or unique") as info:
        db.target(table).prepare(SCHEMA)
    assert info.value.key == "target.key"


def test_a_unique_index_on_the_key_is_enough(db: Db) -> None:
    table = db.table_name()
    meta = sa.MetaData()
    existing = sa.Table(table, meta, sa.Column("key", sa.String(64), nullable=False))
    sa.Index(f"ux_{table}", existing.c.key, unique=True)
    meta.create_all(db.engine)
    target = db.target(table)
    target.prepare(SCHEMA)  # adds the mapping's other columns
    assert outcomes(target.write([row("a")])) == {("a",): Outcome.INSERTED}


def test_an_existing_column_of_an_incompatible_type_is_a_config_error(db: Db) -> None:
    table = db.table_name()
    sa.Table(
        table,
        sa.MetaData(),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("updated_at", sa.BigInteger),
    ).create(db.engine)
    with pytest.raises(ConfigError, match=rf"column {table}\.updated_at is .* gives timestamp"):
        db.target(table).prepare(SCHEMA)


def test_a_missing_table_with_create_table_false_is_a_config_error(db: Db) -> None:
    target = db.target(create_table=False)
    with pytest.raises(ConfigError, match="does not exist and create_table is false"):
        target.prepare(SCHEMA)


def test_preview_on_a_missing_table_inserts_every_row_and_creates_nothing(db: Db) -> None:
    target = db.target()
    notes = target.prepare(SCHEMA, create=False)
    assert any("does not exist" in note for note in notes)
    previewed = target.preview([row("a"), row("b")])
    assert outcomes(previewed) == {("a",): Outcome.INSERTED, ("b",): Outcome.INSERTED}
    assert not db.inspector().has_table(target.settings.table)


# --- per-row refusals -------------------------------------------------------------------


def test_a_too_long_key_fails_alone_with_the_database_message(db: Db) -> None:
    target = db.prepared()
    long_key = "k" * 65
    results = target.write([row("a"), row(long_key), row("b")])
    failed = next(r for r in results if r.key == (long_key,))
    assert failed.outcome is Outcome.FAILED
    assert TOO_LONG[db.dialect] in (failed.message or "")
    assert outcomes(results) == {
        ("a",): Outcome.INSERTED,
        (long_key,): Outcome.FAILED,
        ("b",): Outcome.INSERTED,
    }
    assert target.count() == 2


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("column", "value"),
    [("name", "before\x00after"), ("data", {"note": "before\x00after"})],
    ids=["text", "json"],
)
def test_a_nul_character_fails_alone_on_postgres(pg: Db, column: str, value: Any) -> None:
    target = pg.prepared()
    results = target.write([row("a"), row("nul", **{column: value}), row("b")])
    assert outcomes(results) == {
        ("a",): Outcome.INSERTED,
        ("nul",): Outcome.FAILED,
        ("b",): Outcome.INSERTED,
    }
    assert next(r for r in results if r.key == ("nul",)).message
    assert target.count() == 2


@pytest.mark.parametrize(
    "db",
    [
        pytest.param("sqlite", id="sqlite"),
        POSTGRES,
        MARIADB,
    ],
    indirect=True,
)
def test_an_integer_out_of_range_fails_alone(db: Db) -> None:
    target = db.prepared()
    results = target.write([row("a"), row("huge", n=2**63), row("b")])
    assert outcomes(results) == {
        ("a",): Outcome.INSERTED,
        ("huge",): Outcome.FAILED,
        ("b",): Outcome.INSERTED,
    }
    assert target.count() == 2


def test_2000_rows_with_3_bad_ones_commit_1997(db: Db) -> None:
    target = db.prepared()
    bad = {17, 1000, 1998}
    rows = [row(("x" * 65) + str(i) if i in bad else f"k{i:04d}", n=i) for i in range(2000)]
    results = target.write(rows)
    failed = [r.key for r in results if r.outcome is Outcome.FAILED]
    assert sorted(failed) == sorted((rows[i]["key"],) for i in bad)
    assert sum(r.outcome is Outcome.INSERTED for r in results) == 1997
    assert target.count() == 1997


def _watch_pre_reads(target: SqlTarget, statements: list[str]) -> None:
    """Note the statements the target's connections run: SQLite's own trace (the target
    reads SQLite through the driver's cursor), SQLAlchemy's event elsewhere."""
    if target.dialect == "sqlite":
        sa.event.listen(
            target.engine, "connect", lambda conn, _: conn.set_trace_callback(statements.append)
        )
    else:
        sa.event.listen(
            target.engine,
            "before_cursor_execute",
            lambda _conn, _cursor, statement, *_: statements.append(statement),
        )


@pytest.mark.parametrize("name", ["lite", pytest.param("pg", marks=pytest.mark.postgres)])
def test_new_keys_go_into_a_table_the_target_made_without_reading_them_first(
    request: pytest.FixtureRequest, name: str
) -> None:
    """Into a table the target made, a batch is first tried as new rows only (SQLite: a
    plain INSERT; PostgreSQL: COPY), without a pre-read of its keys; a batch holding a
    key written before fails that as a whole and is written the general way, with exact
    outcomes. The next batch reads first, and the one after it, once that read found
    nothing, goes in straight again. A table the target did not make is always read
    first."""
    db: Db = request.getfixturevalue(name)
    statements: list[str] = []
    target = db.target()
    _watch_pre_reads(target, statements)
    target.prepare(SCHEMA)
    table = target.settings.table

    def pre_reads() -> int:
        reads = [s for s in statements if s.startswith("SELECT") and table in s]
        statements.clear()
        return len(reads)

    def new(prefix: str) -> list[dict[str, Any]]:  # enough rows for PostgreSQL to COPY
        return [row(f"{prefix}{i:03d}") for i in range(60)]

    first = target.write([row("a", updated_at=T1), row("b"), *new("x")])
    assert set(outcomes(first).values()) == {Outcome.INSERTED}
    assert pre_reads() == 0
    results = target.write([row("c"), row("b", name="changed"), row("a", name="older"), *new("y")])
    assert outcomes(results)[("c",)] is Outcome.INSERTED
    assert outcomes(results)[("b",)] is Outcome.UPDATED
    assert outcomes(results)[("a",)] is Outcome.STALE
    assert pre_reads() == 1
    assert set(outcomes(target.write(new("z"))).values()) == {Outcome.INSERTED}
    assert pre_reads() == 1  # the batch after one that found keys stored reads first
    assert set(outcomes(target.write(new("w"))).values()) == {Outcome.INSERTED}
    assert pre_reads() == 0
    assert db.stored(table, SCHEMA, ("a",))["name"] == "name of a"
    assert db.stored(table, SCHEMA, ("b",))["name"] == "changed"
    assert target.count() == 3 + 4 * 60

    again = db.target(table)
    _watch_pre_reads(again, statements)
    again.prepare(SCHEMA)
    statements.clear()
    assert set(outcomes(again.write(new("v"))).values()) == {Outcome.INSERTED}
    assert pre_reads() == 1


# --- outcomes, keys and values ----------------------------------------------------------


@pytest.mark.mysql
def test_mariadb_reports_exact_outcomes_per_row(maria: Db) -> None:
    target = maria.prepared()
    target.write([row("upd"), row("same"), row("old", updated_at=T1)])
    results = target.write(
        [
            row("new"),
            row("upd", name="changed"),
            row("same"),
            row("old", name="older", updated_at=T0),
        ]
    )
    assert outcomes(results) == {
        ("new",): Outcome.INSERTED,
        ("upd",): Outcome.UPDATED,
        ("same",): Outcome.UNCHANGED,
        ("old",): Outcome.STALE,
    }
    assert maria.stored(target.settings.table, SCHEMA, ("old",))["name"] == "name of old"


def test_keys_differing_only_in_case_are_two_rows(db: Db) -> None:
    target = db.prepared()
    results = target.write([row("Ada@Example.com"), row("ada@example.com")])
    assert set(outcomes(results).values()) == {Outcome.INSERTED}
    assert target.count() == 2
    again = target.write([row("ADA@EXAMPLE.COM"), row("ada@example.com", name="changed")])
    assert outcomes(again) == {
        ("ADA@EXAMPLE.COM",): Outcome.INSERTED,
        ("ada@example.com",): Outcome.UPDATED,
    }
    assert target.count() == 3


@pytest.mark.mysql
def test_keys_differing_by_trailing_spaces_are_two_rows_on_mariadb(maria: Db) -> None:
    target = maria.prepared()
    target.write([row("abc")])
    assert outcomes(target.write([row("abc ")])) == {("abc ",): Outcome.INSERTED}
    assert target.count() == 2


def test_timestamps_with_microseconds_read_back_equal(db: Db) -> None:
    stamps = {
        "utc": T0,
        "plus-five-thirty": datetime(
            2024, 2, 29, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=5, minutes=30))
        ),
        "minus-eight": datetime(1999, 12, 31, 16, 0, 0, 1, tzinfo=timezone(-timedelta(hours=8))),
        "naive-is-utc": datetime(2030, 6, 1, 12, 0, 0, 500000),
    }
    target = db.prepared()
    target.write([row(key, updated_at=ts) for key, ts in stamps.items()])
    for key, ts in stamps.items():
        got = db.stored(target.settings.table, SCHEMA, (key,))["updated_at"]
        want = ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)
        assert got == want, key
        assert got.utcoffset() == timedelta(0), key
    rewritten = target.write([row(key, updated_at=ts) for key, ts in stamps.items()])
    assert set(outcomes(rewritten).values()) == {Outcome.UNCHANGED}


def test_composite_keys_upsert_on_both_columns(db: Db) -> None:
    schema = RowSchema(
        columns=(
            ColumnSpec("tenant", "text", nullable=False, length=32),
            ColumnSpec("key", "text", nullable=False, length=64),
            ColumnSpec("name", "text"),
        ),
        key=("tenant", "key"),
    )
    target = db.prepared(schema)
    table = target.settings.table
    assert db.inspector().get_pk_constraint(table)["constrained_columns"] == ["tenant", "key"]

    def r(tenant: str, key: str, name: str) -> Row:
        return {"tenant": tenant, "key": key, "name": name}

    first = target.write([r("t1", "a", "one"), r("t2", "a", "two"), r("t1", "b", "three")])
    assert set(outcomes(first).values()) == {Outcome.INSERTED}
    second = target.write([r("t1", "a", "ONE"), r("t2", "a", "two"), r("t2", "b", "four")])
    assert outcomes(second) == {
        ("t1", "a"): Outcome.UPDATED,
        ("t2", "a"): Outcome.UNCHANGED,
        ("t2", "b"): Outcome.INSERTED,
    }
    assert target.count() == 4
    assert db.stored(table, schema, ("t1", "a"))["name"] == "ONE"
    assert db.stored(table, schema, ("t2", "a"))["name"] == "two"
    assert outcomes(target.preview([r("t1", "b", "x")])) == {("t1", "b"): Outcome.UPDATED}


def test_an_integer_key_is_found_again(db: Db) -> None:
    schema = RowSchema(
        columns=(ColumnSpec("customer_no", "integer", nullable=False), ColumnSpec("name", "text")),
        key=("customer_no",),
    )
    target = db.prepared(schema)
    target.write([{"customer_no": 42, "name": "x"}])
    again = target.write([{"customer_no": 42, "name": "x"}])
    assert outcomes(again) == {(42,): Outcome.UNCHANGED}


# --- rows as the row codec encodes them (what a run hands the target) -----------------


def codec_of(target: SqlTarget, schema: RowSchema = SCHEMA) -> Any:
    return SqlTarget.row_codec(target.settings, schema)


def test_encoded_rows_are_written_and_compared_as_rows_are(db: Db) -> None:
    plain, encoded = db.prepared(), db.prepared()
    encode = codec_of(encoded).encode
    east = timezone(timedelta(hours=2))
    rows = [
        row("a"),
        row("b", flag=False, n=None, data={"nested": {"list": [1, 2.5, None]}, "k": "ü"}),
        row("c", updated_at=T0.astimezone(east), data=None, name=None),
    ]
    assert outcomes(encoded.write([encode(r) for r in rows])) == outcomes(plain.write(rows))
    for key in ("a", "b", "c"):
        assert db.stored(encoded.settings.table, SCHEMA, (key,)) == db.stored(
            plain.settings.table, SCHEMA, (key,)
        )
    again = [encode(r) for r in rows]
    changed = encode(row("a", n=2))
    assert set(outcomes(encoded.write(again)).values()) == {Outcome.UNCHANGED}
    assert outcomes(encoded.write([changed])) == {("a",): Outcome.UPDATED}
    older = encode(row("b", updated_at=T0 - timedelta(days=1)))
    assert outcomes(encoded.preview([older])) == {("b",): Outcome.STALE}


def test_the_codec_decodes_a_row_as_the_table_reads_it_back(db: Db) -> None:
    target = db.prepared()
    codec = codec_of(target)
    naive = datetime(2024, 5, 17, 8, 30, 12, 345678)  # a naive timestamp is UTC
    written = row("a", updated_at=naive, data={"t": (1, 2)}, flag=False)
    target.write([written])
    stored = db.stored(target.settings.table, SCHEMA, ("a",))
    assert codec.decode(codec.encode(written)) == stored
    assert stored["updated_at"] == naive.replace(tzinfo=UTC)


def test_a_value_the_driver_cannot_bind_fails_its_row_alone_naming_the_column(db: Db) -> None:
    target = db.prepared()
    results = target.write([row("a"), row("huge", data={"n": 2**70}), row("b")])
    assert outcomes(results) == {
        ("a",): Outcome.INSERTED,
        ("huge",): Outcome.FAILED,
        ("b",): Outcome.INSERTED,
    }
    [failed] = [r for r in results if r.outcome is Outcome.FAILED]
    assert failed.message is not None
    assert failed.message.startswith("data: cannot be written as json")
    assert target.count() == 2


def test_the_codec_refuses_a_value_naming_the_column_and_leaves_keys_as_they_are() -> None:
    settings = SqlTargetSettings(url="sqlite:///unused.db")
    schema = RowSchema(
        columns=(ColumnSpec("flag", "boolean", nullable=False), ColumnSpec("on", "boolean")),
        key=("flag",),
    )
    codec = SqlTarget.row_codec(settings, schema)
    assert codec.encode({"flag": "yes", "on": True}) == ("yes", 1)  # a key is text already
    with pytest.raises(RecordError) as refused:
        codec.encode({"flag": "yes", "on": "maybe"})
    assert [e.field for e in refused.value.errors] == ["on"]


@pytest.mark.parametrize(
    "value",
    [
        datetime(2024, 5, 17, 8, 30, 12, 345678, tzinfo=UTC),
        datetime(2024, 5, 17, 8, 30, 12, tzinfo=UTC),
        datetime(2024, 5, 17, 1, 0, tzinfo=timezone(timedelta(hours=-7, minutes=-30))),
        datetime(2024, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=14))),
        datetime(1, 1, 2, 0, 0),
        datetime(9999, 12, 31, 23, 59, 59, 999999),
    ],
)
def test_sqlite_timestamp_text_is_fixed_width_utc_with_z(value: datetime) -> None:
    utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    expected = utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    assert utc_text(value) == expected
    assert len(utc_text(value)) == 27


# --- URLs -------------------------------------------------------------------------------


@pytest.mark.postgres
def test_a_postgresql_url_without_a_driver_uses_psycopg(pg_url: str) -> None:
    bare = sa.make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    db = Db(bare)
    try:
        target = db.prepared()
        assert target.engine.dialect.driver == "psycopg"
        assert outcomes(target.write([row("a")])) == {("a",): Outcome.INSERTED}
    finally:
        db.close()


def test_an_id_column_the_database_fills_is_reported_as_the_target_id(db: Db) -> None:
    target = db.target(id_column="erp_no")
    target.prepare(SCHEMA)

    first = {r.key: r.target_id for r in target.write([row("a"), row("b")])}
    again = {r.key: r.target_id for r in target.write([row("a", name="changed"), row("c")])}

    assert first[("a",)] is not None
    assert first[("b",)] is not None
    assert first[("a",)] != first[("b",)]
    assert again[("a",)] == first[("a",)]
    assert again[("c",)] not in (None, first[("a",)], first[("b",)])


def test_an_existing_table_without_the_id_column_is_a_configuration_error(db: Db) -> None:
    table = db.prepared().settings.table

    with pytest.raises(ConfigError) as error:
        db.target(table, id_column="erp_no").prepare(SCHEMA)

    assert error.value.key == "target.id_column"


@pytest.mark.postgres
def test_a_driver_error_in_the_bulk_path_is_a_target_error(pg: Db) -> None:
    # A staging table of the wrong shape already in the session: COPY fails with an error
    # that is not a refused row, and it comes out as custsync's TargetError naming it.
    from custsync.errors import TargetError

    target = pg.prepared()
    assert target._copy is not None
    stage = target._copy.copy.split()[1]
    target.write([row("k0", updated_at=T0)])  # a key the table holds: the batch is staged
    with target.engine.connect() as conn:  # the pool's one connection: the same session
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE {stage} (unrelated integer)")
        conn.commit()

    with pytest.raises(TargetError, match=r"column .* does not exist"):
        target.write([row(f"k{n}", updated_at=T0) for n in range(60)])


def staging_table_exists(target: SqlTarget) -> bool:
    assert target._copy is not None
    stage = target._copy.copy.split()[1]
    with target.engine.connect() as conn:  # the pool's one connection: the same session
        return conn.exec_driver_sql(f"SELECT to_regclass('pg_temp.{stage}')").scalar() is not None


@pytest.mark.postgres
def test_a_batch_of_keys_new_to_the_table_is_copied_into_it_directly(pg: Db) -> None:
    target = pg.prepared()
    table = target.settings.table

    first = target.write([row(f"k{n}", n=n, updated_at=T0) for n in range(60)])

    assert set(outcomes(first).values()) == {Outcome.INSERTED}
    assert not staging_table_exists(target)
    assert target.count() == 60

    later = T0 + timedelta(seconds=1)
    second = target.write([row(f"k{n}", n=n + 1, updated_at=later) for n in range(30, 90)])

    assert outcomes(second) == {
        **{(f"k{n}",): Outcome.UPDATED for n in range(30, 60)},
        **{(f"k{n}",): Outcome.INSERTED for n in range(60, 90)},
    }
    assert staging_table_exists(target)  # keys the table holds: staged and upserted
    assert target.count() == 90
    assert pg.stored(table, SCHEMA, ("k59",))["n"] == 60
    assert pg.stored(table, SCHEMA, ("k29",))["n"] == 29


@pytest.mark.postgres
@pytest.mark.parametrize("refusal", ["key too long", "another row holds its name"])
def test_a_refused_row_among_new_keys_fails_alone(pg: Db, refusal: str) -> None:
    """The direct copy fails as a whole on one bad row (or on a row another writer put
    in since the pre-read: here, a unique name taken); the batch is then written the
    careful way and only that row fails."""
    target = pg.prepared()
    table = target.settings.table
    rows = [row(f"k{n}", name=f"name-{n}", updated_at=T0) for n in range(60)]
    if refusal == "key too long":
        rows[17] = row("x" * 65, name="name-17", updated_at=T0)
        refused: Key = ("x" * 65,)
    else:
        with pg.engine.begin() as conn:
            conn.exec_driver_sql(f'CREATE UNIQUE INDEX ON "{table}" (name)')
        target.write([row("elsewhere", name="name-17", updated_at=T0)])
        refused = ("k17",)

    results = target.write(rows)

    assert outcomes(results) == {
        **{(r["key"],): Outcome.INSERTED for r in rows if (r["key"],) != refused},
        refused: Outcome.FAILED,
    }
    assert target.count() == 59 + (refusal != "key too long")


@pytest.mark.postgres
def test_each_batch_of_a_transaction_leaves_the_staging_table_empty(pg: Db) -> None:
    """The staging table empties itself at commit (ON COMMIT DELETE ROWS); inside a
    transaction across batches each batch empties it, or the next would meet its rows."""
    target = pg.prepared()
    target.write([row(f"k{n}", n=n, updated_at=T0) for n in range(60)])
    assert target._copy is not None
    stage = target._copy.copy.split()[1]

    target.begin()
    for step in (1, 2, 3):
        later = T0 + timedelta(seconds=step)
        results = target.write([row(f"k{n}", n=n + step, updated_at=later) for n in range(60)])

        assert set(outcomes(results).values()) == {Outcome.UPDATED}
        assert target._held is not None
        assert target._held.exec_driver_sql(f"SELECT count(*) FROM {stage}").scalar() == 0
    target.commit()

    assert pg.stored(target.settings.table, SCHEMA, ("k7",))["n"] == 10


def copy_nothing_into(engine: sa.Engine, table: str) -> None:
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cursor, cursor.copy(f'COPY "{table}" (key) FROM STDIN'):
            pass


@pytest.mark.postgres
def test_a_table_under_row_level_security_is_written_though_copy_cannot_reach_it(
    pg_url: str,
) -> None:
    """PostgreSQL refuses COPY FROM into a table whose row-level security applies to the
    user (here its owner, with FORCE); new keys then go the staged way, as before."""
    psycopg = pytest.importorskip("psycopg")
    role = "custsync_rls_owner"
    admin = make_engine(pg_url)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(
                f"DO $$ BEGIN CREATE ROLE {role} LOGIN; "
                "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            )
            conn.exec_driver_sql(f"GRANT CREATE, USAGE ON SCHEMA public TO {role}")
    except sa.exc.ProgrammingError as exc:
        pytest.skip(f"the test server's user may not create a role: {exc.orig}")
    finally:
        admin.dispose()
    db = Db(sa.make_url(pg_url).set(username=role, password=None).render_as_string(False))
    try:
        target = db.prepared()
        table = target.settings.table
        with db.engine.begin() as conn:
            conn.exec_driver_sql(f'ALTER TABLE "{table}" ENABLE ROW LEVEL SECURITY')
            conn.exec_driver_sql(f'ALTER TABLE "{table}" FORCE ROW LEVEL SECURITY')
            conn.exec_driver_sql(
                f'CREATE POLICY everyone ON "{table}" USING (true) WITH CHECK (true)'
            )
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="row-level security"):
            copy_nothing_into(db.engine, table)

        results = target.write([row(f"k{n}", n=n, updated_at=T0) for n in range(60)])

        assert set(outcomes(results).values()) == {Outcome.INSERTED}
        assert target.count() == 60
    finally:
        db.close()
