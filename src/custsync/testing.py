"""What users need to test with custsync: an in-memory source and target, and
``TargetContract``, the test suite every target must pass (ours run it; yours can too).

    from custsync.testing import MemorySource, MemoryTarget, TargetContract

    class TestMyTarget(TargetContract):
        supports_refusal = True

        @pytest.fixture
        def target_factory(self): return lambda: MyTarget(...)   # fresh and empty

        @pytest.fixture
        def refused_row(self): return self.row("x" * 65)         # a row it refuses

        def read_back(self, target, key): ...                    # the stored row, or None
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self

from custsync.errors import TargetError
from custsync.model import normalize, parse_timestamp
from custsync.sources.base import Checkpoint, RawRecord, SourceBatch
from custsync.targets.base import (
    ColumnSpec,
    Key,
    MatchPolicy,
    Outcome,
    Previewable,
    Row,
    RowResult,
    RowSchema,
    Target,
    Transactional,
)

if TYPE_CHECKING:  # only for annotations: pytest is a dev dependency, not a runtime one
    import pytest

__all__ = [
    "CONTRACT_SCHEMA",
    "NO_ROW",
    "MemorySource",
    "MemoryTarget",
    "Refusal",
    "TargetContract",
    "TargetFactory",
]

# The message of an update_only write to an absent key (the sql target says the same).
NO_ROW = "no row with this key, and match_policy = update_only"

Refusal = Callable[[Row], str | None]
TargetFactory = Callable[[], Target]


# --- the source -----------------------------------------------------------------------


class MemorySource:
    """Customers from a list, as a ``Source``.

    Each record is a Commerce Layer resource object or a flat (Exports-shaped) record; both
    go through ``custsync.model.normalize``, as the file source does. ``since`` is ignored:
    the engine skips and counts older records itself.

    Unordered (the default) it behaves like a file: no checkpoints, ``cursor`` ignored, so
    the engine moves the watermark once the whole input is committed. With
    ``ordered=True`` it behaves like the API: every batch carries a checkpoint (the
    greatest ``updated_at`` so far and ``{"offset": n}``, the records delivered so far)
    and ``read(cursor={"offset": n})`` resumes after the first ``n`` records.

    ``local=True`` says, like a file source, that its reads never wait on a remote
    (``Source``): a run then commits a ``Transactional`` target every
    ``commit_interval``, not every batch.
    """

    def __init__(
        self, records: Iterable[Mapping[str, Any]], *, ordered: bool = False, local: bool = False
    ) -> None:
        # Normalised once: a resumed read must see the same records in the same order.
        self.records: list[dict[str, Any]] = [normalize(record) for record in records]
        self.ordered = ordered
        self.local = local

    def __repr__(self) -> str:
        kind = "ordered" if self.ordered else "unordered"
        return f"MemorySource({len(self.records)} records, {kind})"

    def read(
        self,
        *,
        since: datetime | None,
        cursor: Mapping[str, Any] | None,
        batch_size: int,
    ) -> Iterator[SourceBatch]:
        # Arguments are checked here, not at the first next(), like the file source does.
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        start = _offset(cursor) if self.ordered else 0
        return self._batches(start, batch_size)

    def _batches(self, start: int, batch_size: int) -> Iterator[SourceBatch]:
        watermark: datetime | None = None
        for data in self.records[:start]:
            watermark = _later(watermark, data.get("updated_at"))
        for begin in range(start, len(self.records), batch_size):
            chunk = self.records[begin : begin + batch_size]
            records = [
                # A deep copy: what the engine does to a record never reaches the next read.
                RawRecord(copy.deepcopy(data), origin=f"memory#{begin + i}")
                for i, data in enumerate(chunk)
            ]
            checkpoint = None
            if self.ordered:
                for data in chunk:
                    watermark = _later(watermark, data.get("updated_at"))
                checkpoint = Checkpoint(watermark, {"offset": begin + len(chunk)})
            yield SourceBatch(records, checkpoint)

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _offset(cursor: Mapping[str, Any] | None) -> int:
    if cursor is None:
        return 0
    offset = cursor.get("offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"a MemorySource cursor is {{'offset': n}} with n >= 0, got {cursor!r}")
    return offset


def _later(current: datetime | None, value: Any) -> datetime | None:
    ts = parse_timestamp(value)
    if ts is None or (current is not None and current >= ts):
        return current
    return ts


# --- the target -----------------------------------------------------------------------


class MemoryTarget:
    """A ``Target`` (and ``Previewable``) holding rows in a dict, with the sql target's
    semantics: inserted, updated, unchanged (every mapped column equal), stale (the
    ``schema.guard`` column holds a newer value; an equal or a null one lets the incoming
    row win), and the ``update_only`` / ``create_only`` match policies.

    ``refuse(row)`` plays the database refusing a row: a message fails that row alone and
    the rest of the batch commits. Like a database, it only sees rows that would be
    written (inserted or updated), never the unchanged or stale ones.

    It is ``Transactional``: after ``begin``, writes go to a transaction of their own,
    which ``commit`` moves into ``rows`` and ``rollback`` (or ``close``) discards.

    ``rows`` holds the committed rows by key (only the schema's columns, timestamps in
    UTC), ``writes`` counts calls to ``write`` and ``commits`` calls to ``commit`` that
    ended a transaction. They stay readable after ``close()``, so a test can look at them
    once a job has run.
    """

    def __init__(self, *, refuse: Refusal | None = None) -> None:
        self.rows: dict[Key, dict[str, Any]] = {}
        self.schema: RowSchema | None = None
        self.writes = 0
        self.commits = 0
        self.refuse = refuse
        self._open: dict[Key, dict[str, Any]] | None = None  # the transaction's rows

    def __repr__(self) -> str:
        return f"MemoryTarget({len(self.rows)} rows, {self.writes} writes)"

    def begin(self) -> None:
        if self._open is not None:
            raise RuntimeError("a transaction is open already")
        self._open = {}

    def commit(self) -> None:
        if self._open is not None:
            self.rows.update(self._open)
            self._open = None
            self.commits += 1

    def rollback(self) -> None:
        self._open = None

    def prepare(self, schema: RowSchema, *, create: bool = True) -> list[str]:
        self.schema = schema
        return []

    def write(self, rows: Sequence[Row]) -> list[RowResult]:
        self.writes += 1
        schema = self._ready()
        decided = self._decide(schema, rows)
        into = self._open if self._open is not None else self.rows
        for result, row in decided:
            if row is not None:
                into[result.key] = _stored_row(schema, row)
        return [result for result, _ in decided]

    def preview(self, rows: Sequence[Row]) -> list[RowResult]:
        return [result for result, _ in self._decide(self._ready(), rows)]

    def close(self) -> None:
        self.rollback()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _ready(self) -> RowSchema:
        if self.schema is None:
            raise TargetError("prepare() must be called before writing")
        return self.schema

    def _decide(self, schema: RowSchema, rows: Sequence[Row]) -> list[tuple[RowResult, Row | None]]:
        """Each row's result, and the row itself where it is to be stored."""
        decided: list[tuple[RowResult, Row | None]] = []
        seen: set[Key] = set()
        for row in rows:
            key = schema.key_of(row)
            if key in seen:
                # The engine dedupes before writing; a database would refuse the statement.
                raise ValueError(f"key {key!r} appears twice in one write")
            seen.add(key)
            stored = self._open.get(key) if self._open is not None else None
            if stored is None:
                stored = self.rows.get(key)
            result = _classify(schema, stored, row)
            if result.outcome in (Outcome.INSERTED, Outcome.UPDATED):
                message = self.refuse(row) if self.refuse is not None else None
                if message is not None:
                    decided.append((RowResult(key, Outcome.FAILED, message), None))
                else:
                    decided.append((result, row))
            else:
                decided.append((result, None))
        return decided


def _classify(schema: RowSchema, stored: Mapping[str, Any] | None, row: Row) -> RowResult:
    key = schema.key_of(row)
    if stored is None:
        if schema.match_policy == "update_only":
            return RowResult(key, Outcome.FAILED, NO_ROW)
        return RowResult(key, Outcome.INSERTED)
    if schema.match_policy == "create_only":
        return RowResult(key, Outcome.UNCHANGED)
    if schema.guard is not None:
        old, new = stored.get(schema.guard), row.get(schema.guard)
        if old is not None and new is not None and _utc(old) > _utc(new):
            return RowResult(key, Outcome.STALE)
    if all(_same(stored.get(c.name), row.get(c.name)) for c in schema.columns):
        return RowResult(key, Outcome.UNCHANGED)
    return RowResult(key, Outcome.UPDATED)


def _stored_row(schema: RowSchema, row: Row) -> dict[str, Any]:
    # As a database would: only the mapped columns, timestamps in UTC, and a copy, so the
    # caller changing its row later does not change what is stored.
    return {c.name: _stored_value(c, row.get(c.name)) for c in schema.columns}


def _stored_value(column: ColumnSpec, value: Any) -> Any:
    if column.type == "timestamp" and isinstance(value, datetime):
        return _utc(value)
    return copy.deepcopy(value)


def _utc(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


def _same(stored: Any, incoming: Any) -> bool:
    if isinstance(stored, datetime) and isinstance(incoming, datetime):
        return bool(_utc(stored) == _utc(incoming))
    return bool(stored == incoming)


# --- the contract ---------------------------------------------------------------------

T0 = datetime(2024, 5, 17, 8, 30, 12, 345678, tzinfo=UTC)
T1 = T0 + timedelta(seconds=1)

CONTRACT_SCHEMA = RowSchema(
    columns=(
        ColumnSpec("key", "text", nullable=False, length=64),
        ColumnSpec("name", "text"),
        ColumnSpec("n", "integer"),
        ColumnSpec("flag", "boolean"),
        ColumnSpec("data", "json"),
        ColumnSpec("updated_at", "timestamp"),
    ),
    key=("key",),
    guard="updated_at",
)


class TargetContract:
    """The behaviour every target must show, as a pytest test class to subclass.

    The subclass provides a fixture ``target_factory`` (a callable returning a fresh,
    empty target; the tests ``prepare`` it with ``schema`` and close it), implements
    ``read_back``, and, if its target refuses some rows, sets ``supports_refusal = True``
    and provides a fixture ``refused_row`` (build it with ``self.row``).

    Nothing here imports pytest at import time, so ``custsync.testing`` works without
    it: the tests ask for fixtures by parameter name, which needs no decorator, and
    import pytest only to skip. pytest does not rewrite the asserts of an installed
    module, so every assert carries its own message.
    """

    supports_refusal: ClassVar[bool] = False
    schema: ClassVar[RowSchema] = CONTRACT_SCHEMA

    # --- what the subclass provides ------------------------------------------------------

    def read_back(self, target: Any, key: Key) -> dict[str, Any] | None:
        """The row ``target`` stores under ``key`` (column name -> value, timestamps as
        datetimes), or None when it holds none."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement read_back(target, key) to run the contract"
        )

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def row(key: str, **values: Any) -> dict[str, Any]:
        """A row of ``schema``; keyword arguments replace the defaults."""
        defaults: dict[str, Any] = {
            "key": key,
            "name": f"name of {key}",
            "n": 1,
            "flag": True,
            "data": {"tier": "gold", "tags": ["a", "b"], "score": 1.5},
            "updated_at": T0,
        }
        return {**defaults, **values}

    @contextmanager
    def prepared(
        self, target_factory: TargetFactory, *, match_policy: MatchPolicy = "upsert"
    ) -> Iterator[Target]:
        """A fresh target, prepared with ``schema`` and closed after use."""
        target = target_factory()
        try:
            target.prepare(replace(self.schema, match_policy=match_policy))
            yield target
        finally:
            target.close()

    def seed(self, target: Target, rows: Sequence[Row]) -> None:
        results = target.write(rows)
        assert all(r.outcome is Outcome.INSERTED for r in results), (
            f"seeding an empty target should insert every row, got {_outcomes(results)}"
        )

    def expect(self, results: Sequence[RowResult], want: Mapping[Key, Outcome]) -> None:
        """One result per row, matched by key, with the wanted outcomes."""
        keys = [r.key for r in results]
        assert sorted(keys) == sorted(want), f"results for keys {keys}, expected {list(want)}"
        got = _outcomes(results)
        assert got == dict(want), f"outcomes {got}, expected {dict(want)}"

    def stored(self, target: Target, key: str) -> dict[str, Any]:
        found = self.read_back(target, (key,))
        assert found is not None, f"no row stored under key {key!r}"
        return found

    def assert_stored(self, target: Target, row: Row) -> None:
        found = self.stored(target, row["key"])
        for column in self.schema.columns:
            want, got = row[column.name], found.get(column.name)
            assert _same(got, want), f"{row['key']}.{column.name}: stored {got!r}, wrote {want!r}"

    # --- inserted, updated, unchanged ------------------------------------------------------

    def test_new_rows_are_inserted(self, target_factory: TargetFactory) -> None:
        rows = [self.row("a"), self.row("b"), self.row("c")]
        with self.prepared(target_factory) as target:
            results = target.write(rows)
            self.expect(results, {(r["key"],): Outcome.INSERTED for r in rows})
            for row in rows:
                self.assert_stored(target, row)

    def test_rewriting_the_same_rows_is_unchanged(self, target_factory: TargetFactory) -> None:
        rows = [self.row("a"), self.row("b", n=None, flag=False, data=[1, {"x": None}])]
        with self.prepared(target_factory) as target:
            self.seed(target, rows)
            results = target.write([dict(r) for r in rows])
            self.expect(results, {("a",): Outcome.UNCHANGED, ("b",): Outcome.UNCHANGED})

    def test_newer_rows_with_changed_values_are_updated(
        self, target_factory: TargetFactory
    ) -> None:
        with self.prepared(target_factory) as target:
            self.seed(target, [self.row("a"), self.row("b")])
            changed = [self.row("a", name="Ada", updated_at=T1), self.row("b", n=7, updated_at=T1)]
            results = target.write(changed)
            self.expect(results, {("a",): Outcome.UPDATED, ("b",): Outcome.UPDATED})
            for row in changed:
                self.assert_stored(target, row)

    def test_a_change_in_any_one_column_is_an_update(self, target_factory: TargetFactory) -> None:
        changed = [
            self.row("name", name="other"),
            self.row("n", n=2),
            self.row("flag", flag=False),
            self.row("data", data={"tier": "gold", "tags": ["a", "c"], "score": 1.5}),
            self.row("to-null", name=None),
            self.row("guard", updated_at=T1),
        ]
        with self.prepared(target_factory) as target:
            self.seed(target, [self.row(r["key"]) for r in changed])
            results = target.write(changed)
            self.expect(results, {(r["key"],): Outcome.UPDATED for r in changed})
            for row in changed:
                self.assert_stored(target, row)

    def test_the_same_instant_in_another_zone_is_unchanged(
        self, target_factory: TargetFactory
    ) -> None:
        plus_two = T0.astimezone(timezone(timedelta(hours=2)))
        with self.prepared(target_factory) as target:
            self.seed(target, [self.row("a")])
            results = target.write([self.row("a", updated_at=plus_two)])
            self.expect(results, {("a",): Outcome.UNCHANGED})

    # --- the guard: never go backwards -----------------------------------------------------

    def test_an_older_row_is_stale_and_not_written(self, target_factory: TargetFactory) -> None:
        newer = self.row("a", name="newer", updated_at=T1)
        with self.prepared(target_factory) as target:
            self.seed(target, [newer])
            results = target.write([self.row("a", name="older", updated_at=T0)])
            self.expect(results, {("a",): Outcome.STALE})
            self.assert_stored(target, newer)

    def test_an_equal_guard_with_new_content_updates(self, target_factory: TargetFactory) -> None:
        with self.prepared(target_factory) as target:
            self.seed(target, [self.row("a", name="first")])
            second = self.row("a", name="second")
            results = target.write([second])
            self.expect(results, {("a",): Outcome.UPDATED})
            self.assert_stored(target, second)

    def test_an_incoming_null_guard_is_written(self, target_factory: TargetFactory) -> None:
        with self.prepared(target_factory) as target:
            self.seed(target, [self.row("a", updated_at=T1)])
            undated = self.row("a", name="undated", updated_at=None)
            results = target.write([undated])
            self.expect(results, {("a",): Outcome.UPDATED})
            self.assert_stored(target, undated)

    def test_a_stored_null_guard_is_overwritten(self, target_factory: TargetFactory) -> None:
        with self.prepared(target_factory) as target:
            self.seed(target, [self.row("a", updated_at=None)])
            dated = self.row("a", name="dated", updated_at=T0)
            results = target.write([dated])
            self.expect(results, {("a",): Outcome.UPDATED})
            self.assert_stored(target, dated)

    # --- results and previews --------------------------------------------------------------

    def test_results_are_correlated_by_key(self, target_factory: TargetFactory) -> None:
        with self.prepared(target_factory) as target:
            self.seed(target, [self.row(k, updated_at=T1) for k in ("upd", "same", "old")])
            batch = [
                *(self.row(f"new-{i}") for i in range(5)),
                self.row("upd", name="changed", updated_at=T1),
                self.row("same", updated_at=T1),
                self.row("old", name="older", updated_at=T0),
            ]
            random.Random(7).shuffle(batch)
            results = target.write(batch)
            want = {(f"new-{i}",): Outcome.INSERTED for i in range(5)}
            want |= {
                ("upd",): Outcome.UPDATED,
                ("same",): Outcome.UNCHANGED,
                ("old",): Outcome.STALE,
            }
            self.expect(results, want)

    def test_preview_reports_what_write_does_and_writes_nothing(
        self, target_factory: TargetFactory
    ) -> None:
        with self.prepared(target_factory) as target:
            if not isinstance(target, Previewable):
                import pytest  # lazily: see the class docstring

                pytest.skip(f"{type(target).__name__} is not Previewable")
            seeded = [self.row(k) for k in ("upd", "same", "old")]
            self.seed(target, seeded)
            batch = [
                self.row("new"),
                self.row("upd", name="changed", updated_at=T1),
                self.row("same"),
                self.row("old", updated_at=T0 - timedelta(days=1)),
            ]
            previewed = {r.key: r.outcome for r in target.preview(batch)}
            assert self.read_back(target, ("new",)) is None, "preview wrote a new row"
            for row in seeded:
                self.assert_stored(target, row)
            written = {r.key: r.outcome for r in target.write(batch)}
            assert previewed == written, f"preview said {previewed}, write did {written}"

    def test_an_empty_batch_returns_no_results(self, target_factory: TargetFactory) -> None:
        with self.prepared(target_factory) as target:
            assert list(target.write([])) == [], "an empty write should return []"

    # --- match policies --------------------------------------------------------------------

    def test_update_only_fails_absent_keys_and_creates_nothing(
        self, target_factory: TargetFactory
    ) -> None:
        with self.prepared(target_factory, match_policy="update_only") as target:
            results = target.write([self.row("a")])
            self.expect(results, {("a",): Outcome.FAILED})
            assert results[0].message, "a FAILED result must say why"
            assert self.read_back(target, ("a",)) is None, "update_only created a row"

    def test_update_only_updates_existing_keys(self, target_factory: TargetFactory) -> None:
        with self.prepared(target_factory) as target:
            self.seed(target, [self.row("a")])
            # The next run of the job, with another policy.
            target.prepare(replace(self.schema, match_policy="update_only"))
            changed = self.row("a", name="changed", updated_at=T1)
            results = target.write([changed, self.row("absent")])
            self.expect(results, {("a",): Outcome.UPDATED, ("absent",): Outcome.FAILED})
            self.assert_stored(target, changed)

    def test_create_only_inserts_new_keys_and_leaves_existing_rows(
        self, target_factory: TargetFactory
    ) -> None:
        first = self.row("a")
        with self.prepared(target_factory, match_policy="create_only") as target:
            self.seed(target, [first])
            results = target.write([self.row("a", name="changed", updated_at=T1), self.row("b")])
            self.expect(results, {("a",): Outcome.UNCHANGED, ("b",): Outcome.INSERTED})
            self.assert_stored(target, first)
            self.assert_stored(target, self.row("b"))

    # --- refusals ---------------------------------------------------------------------------

    def test_a_refused_row_fails_alone_and_the_rest_commits(
        self, target_factory: TargetFactory, request: pytest.FixtureRequest
    ) -> None:
        if not self.supports_refusal:
            import pytest  # lazily: see the class docstring

            pytest.skip(f"{type(self).__name__} declares no refused_row (supports_refusal)")
        refused: Row = request.getfixturevalue("refused_row")
        refused_key = self.schema.key_of(refused)
        good = [self.row(f"good-{i}") for i in range(6)]
        batch: list[Row] = [*good[:3], refused, *good[3:]]
        with self.prepared(target_factory) as target:
            results = target.write(batch)
            want = {(r["key"],): Outcome.INSERTED for r in good} | {refused_key: Outcome.FAILED}
            self.expect(results, want)
            failed = next(r for r in results if r.key == refused_key)
            assert failed.message, "a FAILED result must carry the target's reason"
            for row in good:
                self.assert_stored(target, row)
            assert self.read_back(target, refused_key) is None, "the refused row was stored"

    # --- round trips ------------------------------------------------------------------------

    def test_timestamps_round_trip_in_utc_with_microseconds(
        self, target_factory: TargetFactory
    ) -> None:
        stamps = {
            "plus-two": datetime(
                2024, 5, 17, 10, 30, 12, 345678, tzinfo=timezone(timedelta(hours=2))
            ),
            "minus-five": datetime(
                2024, 12, 31, 19, 59, 59, 999999, tzinfo=timezone(-timedelta(hours=5))
            ),
            "one-micro": datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        }
        with self.prepared(target_factory) as target:
            self.seed(target, [self.row(key, updated_at=ts) for key, ts in stamps.items()])
            for key, ts in stamps.items():
                got = self.stored(target, key)["updated_at"]
                assert isinstance(got, datetime), f"{key}: read back {got!r}, not a datetime"
                assert got.utcoffset() == timedelta(0), f"{key}: read back {got!r}, not UTC"
                assert got == ts, f"{key}: read back {got.isoformat()}, wrote {ts.isoformat()}"

    def test_json_values_round_trip(self, target_factory: TargetFactory) -> None:
        values: dict[str, Any] = {
            "object": {
                "s": 'é ü 日本 "quoted"',
                "i": 42,
                "f": 2.5,
                "b": False,
                "null": None,
                "list": [1, "two", {"three": [3]}],
                "empty": {},
            },
            "list": [{"a": 1}, [], "x", None, True],
            "string": "just text",
        }
        with self.prepared(target_factory) as target:
            self.seed(target, [self.row(key, data=value) for key, value in values.items()])
            for key, value in values.items():
                got = self.stored(target, key)["data"]
                assert got == value, f"{key}: read back {got!r}, wrote {value!r}"

    def test_null_values_round_trip(self, target_factory: TargetFactory) -> None:
        empty = self.row("a", name=None, n=None, flag=None, data=None, updated_at=None)
        with self.prepared(target_factory) as target:
            self.seed(target, [empty])
            self.assert_stored(target, empty)

    # --- transactions across writes (``Transactional`` targets only) ------------------------

    def transactional(self, target: Target) -> Transactional:
        if not isinstance(target, Transactional):
            import pytest

            pytest.skip(f"{type(target).__name__} is not Transactional")
        return target

    def test_writes_after_begin_are_stored_at_commit_and_not_before(
        self, target_factory: TargetFactory
    ) -> None:
        with self.prepared(target_factory) as target:
            held = self.transactional(target)
            held.begin()
            first = [self.row(f"k{n}", n=n) for n in range(60)]
            self.expect(target.write(first), {(r["key"],): Outcome.INSERTED for r in first})
            # The next batch sees the first: its keys are held, by this transaction.
            second = [self.row(f"k{n}", n=n + 1, updated_at=T1) for n in range(30, 90)]
            self.expect(
                target.write(second),
                {
                    **{(f"k{n}",): Outcome.UPDATED for n in range(30, 60)},
                    **{(f"k{n}",): Outcome.INSERTED for n in range(60, 90)},
                },
            )
            third = [self.row(f"k{n}", n=n + 2, updated_at=T1) for n in range(80, 90)]
            third += [self.row(f"k{n}", n=n, updated_at=T1) for n in range(0, 10)]
            results = target.write(third)
            assert self.read_back(target, ("k0",)) is None, "a row was stored before commit"
            held.commit()
            self.expect(
                results,
                {
                    **{(f"k{n}",): Outcome.UPDATED for n in range(80, 90)},
                    **{(f"k{n}",): Outcome.UPDATED for n in range(0, 10)},  # updated_at
                },
            )
            for row in [*first[10:30], *second[:50], *third]:
                self.assert_stored(target, row)

    def test_rollback_discards_every_write_since_begin(self, target_factory: TargetFactory) -> None:
        with self.prepared(target_factory) as target:
            held = self.transactional(target)
            self.seed(target, [self.row("kept")])
            held.begin()
            target.write([self.row("gone")])
            target.write([self.row("kept", name="changed", updated_at=T1)])
            held.rollback()
            assert self.read_back(target, ("gone",)) is None, "a row rolled back was stored"
            self.assert_stored(target, self.row("kept"))
            # Without a transaction open, a write commits on its own again.
            self.expect(target.write([self.row("gone")]), {("gone",): Outcome.INSERTED})
            self.assert_stored(target, self.row("gone"))

    def test_closing_a_target_rolls_back_what_is_not_committed(
        self, target_factory: TargetFactory
    ) -> None:
        with self.prepared(target_factory) as target:
            held = self.transactional(target)
            self.seed(target, [self.row("kept")])
            held.begin()
            target.write([self.row("never")])
        # Closed with the transaction open: a run that died before its commit.
        assert self.read_back(target, ("never",)) is None, "an uncommitted row was stored"
        self.assert_stored(target, self.row("kept"))


def _outcomes(results: Sequence[RowResult]) -> dict[Key, Outcome]:
    return {r.key: r.outcome for r in results}
