"""custsync.testing: MemoryTarget passes the target contract, MemorySource batches and
resumes like the real sources, and the contract itself catches a target that is wrong."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from custsync.errors import TargetError
from custsync.sources.base import Source
from custsync.targets.base import (
    ColumnSpec,
    Key,
    Outcome,
    Previewable,
    Row,
    RowSchema,
    Target,
)
from custsync.testing import NO_ROW, MemorySource, MemoryTarget, TargetContract

pytest_plugins = ["pytester"]

T0 = datetime(2024, 5, 17, 8, 30, 12, 345678, tzinfo=UTC)


def _too_long(row: Row) -> str | None:
    return "key longer than 64 characters" if len(row["key"]) > 64 else None


class TestMemoryTargetContract(TargetContract):
    supports_refusal = True

    @pytest.fixture
    def target_factory(self) -> Callable[[], Target]:
        return lambda: MemoryTarget(refuse=_too_long)

    @pytest.fixture
    def refused_row(self) -> dict[str, Any]:
        return self.row("x" * 65)

    def read_back(self, target: Any, key: Key) -> dict[str, Any] | None:
        assert isinstance(target, MemoryTarget)
        found = target.rows.get(key)
        return dict(found) if found is not None else None


# --- MemorySource -----------------------------------------------------------------------


def _customer(i: int, updated_at: datetime | None = None) -> dict[str, Any]:
    stamp = (updated_at or T0 + timedelta(minutes=i)).isoformat()
    attributes = {"email": f"c{i}@example.com", "updated_at": stamp}
    return {"id": f"cust{i}", "type": "customers", "attributes": attributes}


def _read_all(source: MemorySource, **kwargs: Any) -> list[Any]:
    args: dict[str, Any] = {"since": None, "cursor": None, "batch_size": 2} | kwargs
    return list(source.read(**args))


def test_memory_source_satisfies_the_source_protocol() -> None:
    assert isinstance(MemorySource([]), Source)


def test_memory_source_yields_batches_of_batch_size_with_origins() -> None:
    batches = _read_all(MemorySource([_customer(i) for i in range(5)]), batch_size=2)
    assert [len(b.records) for b in batches] == [2, 2, 1]
    origins = [r.origin for b in batches for r in b.records]
    assert origins == [f"memory#{i}" for i in range(5)]


def test_memory_source_normalises_resources_and_flat_records() -> None:
    flat = {"id": "flat1", "email": "f@example.com", "customer_group_id": "grp1", "phone": ""}
    batch = _read_all(MemorySource([_customer(0), flat]))[0]
    resource, exported = (r.data for r in batch.records)
    assert resource["email"] == "c0@example.com"
    assert resource["id"] == "cust0"
    assert "attributes" not in resource
    assert exported["customer_group"] == {"id": "grp1", "type": "customer_groups"}
    assert exported["phone"] is None


def test_memory_source_of_a_generator_can_be_read_twice() -> None:
    source = MemorySource(_customer(i) for i in range(3))
    first, second = _read_all(source), _read_all(source)
    assert [r.data for b in first for r in b.records] == [r.data for b in second for r in b.records]


def test_memory_source_records_do_not_share_state_between_reads() -> None:
    source = MemorySource([_customer(0)])
    _read_all(source)[0].records[0].data["email"] = "changed@example.com"
    assert _read_all(source)[0].records[0].data["email"] == "c0@example.com"


def test_unordered_memory_source_gives_no_checkpoint_and_ignores_the_cursor() -> None:
    batches = _read_all(MemorySource([_customer(i) for i in range(3)]), cursor={"offset": 2})
    assert [b.checkpoint for b in batches] == [None, None]
    assert sum(len(b.records) for b in batches) == 3


def test_ordered_memory_source_checkpoints_the_latest_updated_at_and_offset() -> None:
    records = [_customer(0), _customer(1, T0 + timedelta(hours=1)), _customer(2)]
    batches = _read_all(MemorySource(records, ordered=True), batch_size=2)
    checkpoints = [b.checkpoint for b in batches]
    assert [c.cursor for c in checkpoints] == [{"offset": 2}, {"offset": 3}]
    # The greatest updated_at so far, not the last one: record 2 is older than record 1.
    assert [c.watermark for c in checkpoints] == [T0 + timedelta(hours=1)] * 2


def test_ordered_memory_source_resumes_after_the_cursor_offset() -> None:
    records = [_customer(i) for i in range(5)]
    batches = _read_all(MemorySource(records, ordered=True), cursor={"offset": 3})
    assert [r.origin for b in batches for r in b.records] == ["memory#3", "memory#4"]
    assert batches[-1].checkpoint.cursor == {"offset": 5}
    assert batches[-1].checkpoint.watermark == T0 + timedelta(minutes=4)


def test_resumed_read_keeps_the_watermark_of_records_before_the_offset() -> None:
    records = [_customer(0, T0 + timedelta(days=1)), _customer(1), _customer(2)]
    batches = _read_all(MemorySource(records, ordered=True), cursor={"offset": 1})
    assert batches[0].checkpoint.watermark == T0 + timedelta(days=1)


def test_ordered_memory_source_without_timestamps_checkpoints_no_watermark() -> None:
    batches = _read_all(MemorySource([{"id": "a"}], ordered=True))
    assert batches[0].checkpoint.watermark is None


def test_ordered_memory_source_at_its_end_yields_nothing() -> None:
    assert _read_all(MemorySource([_customer(0)], ordered=True), cursor={"offset": 1}) == []


@pytest.mark.parametrize("cursor", [{"offset": -1}, {"offset": "2"}, {"offset": True}])
def test_ordered_memory_source_refuses_a_malformed_cursor(cursor: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="offset"):
        MemorySource([], ordered=True).read(since=None, cursor=cursor, batch_size=1)


def test_memory_source_refuses_a_batch_size_below_one() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        MemorySource([]).read(since=None, cursor=None, batch_size=0)


# --- MemoryTarget beyond the contract ---------------------------------------------------

SCHEMA = RowSchema(
    (ColumnSpec("key", "text", nullable=False), ColumnSpec("name", "text")), ("key",)
)


def _prepared(**kwargs: Any) -> MemoryTarget:
    target = MemoryTarget(**kwargs)
    assert target.prepare(SCHEMA) == []
    return target


def test_memory_target_satisfies_target_and_previewable() -> None:
    target = MemoryTarget()
    assert isinstance(target, Target)
    assert isinstance(target, Previewable)


def test_memory_target_counts_write_calls_and_not_previews() -> None:
    target = _prepared()
    target.write([{"key": "a", "name": "x"}])
    target.write([])
    target.preview([{"key": "b", "name": "x"}])
    assert target.writes == 2


def test_memory_target_refuses_to_write_before_prepare() -> None:
    with pytest.raises(TargetError, match="prepare"):
        MemoryTarget().write([{"key": "a"}])


def test_memory_target_refuses_a_key_twice_in_one_write() -> None:
    with pytest.raises(ValueError, match="twice"):
        _prepared().write([{"key": "a", "name": "x"}, {"key": "a", "name": "y"}])


def test_memory_target_stores_only_mapped_columns_as_a_copy() -> None:
    target = _prepared()
    row = {"key": "a", "name": "x", "not_mapped": 1}
    target.write([row])
    row["name"] = "changed later"
    assert target.rows[("a",)] == {"key": "a", "name": "x"}


def test_memory_target_update_only_message_names_the_policy() -> None:
    target = MemoryTarget()
    target.prepare(RowSchema(SCHEMA.columns, SCHEMA.key, match_policy="update_only"))
    [result] = target.write([{"key": "a", "name": "x"}])
    assert (result.outcome, result.message) == (Outcome.FAILED, NO_ROW)


def test_memory_target_asks_refuse_only_about_rows_it_would_write() -> None:
    asked: list[str] = []

    def refuse(row: Row) -> str | None:
        asked.append(row["key"])
        return None

    target = _prepared(refuse=refuse)
    target.write([{"key": "a", "name": "x"}])
    target.write([{"key": "a", "name": "x"}, {"key": "b", "name": "y"}])
    assert asked == ["a", "b"]


def test_memory_target_preview_includes_refusals() -> None:
    target = _prepared(refuse=lambda row: "no" if row["key"] == "bad" else None)
    rows = [{"key": "bad", "name": "x"}, {"key": "good", "name": "y"}]
    previewed = target.preview(rows)
    assert [r.outcome for r in previewed] == [Outcome.FAILED, Outcome.INSERTED]
    assert target.rows == {}
    assert target.write(rows) == previewed


def test_memory_target_rows_stay_readable_after_close() -> None:
    with _prepared() as target:
        target.write([{"key": "a", "name": "x"}])
    assert list(target.rows) == [("a",)]


# --- the contract itself ----------------------------------------------------------------


def test_importing_custsync_testing_needs_no_pytest() -> None:
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "from custsync.testing import MemorySource, MemoryTarget, TargetContract\n"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def _run_contract(pytester: pytest.Pytester, body: str) -> pytest.RunResult:
    pytester.makepyfile(
        test_third_party=textwrap.dedent(
            """
            import pytest
            from custsync.targets.base import Outcome
            from custsync.testing import MemoryTarget, TargetContract
            """
        )
        + textwrap.dedent(body)
    )
    return pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")


def test_contract_skips_refusal_for_a_target_that_declares_none(pytester: pytest.Pytester) -> None:
    result = _run_contract(
        pytester,
        """
        class TestPlain(TargetContract):
            @pytest.fixture
            def target_factory(self):
                return MemoryTarget

            def read_back(self, target, key):
                return target.rows.get(key)
        """,
    )
    contract_tests = [name for name in dir(TargetContract) if name.startswith("test_")]
    result.assert_outcomes(passed=len(contract_tests) - 1, skipped=1)


def test_contract_fails_a_target_that_never_reports_unchanged(pytester: pytest.Pytester) -> None:
    result = _run_contract(
        pytester,
        """
        class AlwaysUpdates(MemoryTarget):
            def write(self, rows):
                return [
                    type(r)(r.key, Outcome.UPDATED) if r.outcome is Outcome.UNCHANGED else r
                    for r in super().write(rows)
                ]

        class TestAlwaysUpdates(TargetContract):
            @pytest.fixture
            def target_factory(self):
                return AlwaysUpdates

            def read_back(self, target, key):
                return target.rows.get(key)
        """,
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 3
    result.stdout.fnmatch_lines(["*test_rewriting_the_same_rows_is_unchanged*"])


def test_contract_fails_a_target_that_goes_backwards(pytester: pytest.Pytester) -> None:
    result = _run_contract(
        pytester,
        """
        from dataclasses import replace

        class NoGuard(MemoryTarget):
            def prepare(self, schema, *, create=True):
                return super().prepare(replace(schema, guard=None), create=create)

        class TestNoGuard(TargetContract):
            @pytest.fixture
            def target_factory(self):
                return NoGuard

            def read_back(self, target, key):
                return target.rows.get(key)
        """,
    )
    result.stdout.fnmatch_lines(["*FAILED*test_an_older_row_is_stale_and_not_written*"])


def test_contract_without_read_back_says_what_to_implement(pytester: pytest.Pytester) -> None:
    result = _run_contract(
        pytester,
        """
        class TestForgetful(TargetContract):
            @pytest.fixture
            def target_factory(self):
                return MemoryTarget
        """,
    )
    result.stdout.fnmatch_lines(["*must implement read_back(target, key)*"])
