"""``bind_nulls_directly``: NULLs bound without sqlite3's adapter search, and nothing else
about binding changed."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from custsync._sqlite import bind_nulls_directly
from custsync.targets.sql import make_engine

_KEY = (type(None), sqlite3.PrepareProtocol)


@pytest.fixture
def adapters() -> Iterator[None]:
    """sqlite3's adapters are process-wide: each test leaves them as it found them."""
    before = sqlite3.adapters.get(_KEY)
    sqlite3.adapters.pop(_KEY, None)
    try:
        yield
    finally:
        sqlite3.adapters.pop(_KEY, None)
        if before is not None:
            sqlite3.adapters[_KEY] = before


def _stored(values: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (a, b, c)")
    db.executemany("INSERT INTO t VALUES (?, ?, ?)", values)
    return db.execute("SELECT a, b, c, typeof(a), typeof(b), typeof(c) FROM t").fetchall()


def test_none_is_still_bound_as_null(adapters: None) -> None:
    rows = [(None, "x", 1), ("y", None, None), (None, None, 2.5)]
    before = _stored(rows)

    bind_nulls_directly()

    assert _KEY in sqlite3.adapters
    assert _stored(rows) == before
    assert _stored(rows)[0][3] == "null"


def test_a_none_adapter_the_program_registered_is_kept(adapters: None) -> None:
    sqlite3.register_adapter(type(None), lambda _: "nil")

    bind_nulls_directly()

    assert _stored([(None, None, None)])[0][:3] == ("nil", "nil", "nil")


def test_a_sqlite_engine_binds_nulls_directly(adapters: None) -> None:
    engine = make_engine("sqlite://")
    engine.dispose()

    assert _KEY in sqlite3.adapters
