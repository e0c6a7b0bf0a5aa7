"""The engine's semantics, end to end in one process: an in-memory source and target,
a state store in an SQLite file. What is pinned here is DESIGN.md's "Semantics that must
hold": counts, incremental reads, duplicates, rejects, checkpoints, dry runs, stopping."""

from __future__ import annotations

import json
import pickle
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custsync import plugins
from custsync.dedupe import Candidate, PackedRecords
from custsync.engine import COUNTS, Job, RunResult, _Prepared
from custsync.errors import FieldError, SourceError, TargetError
from custsync.plugins import Connector
from custsync.rejects import Reject
from custsync.sources.base import Checkpoint, SourceBatch, SourceSettings
from custsync.targets.base import Row, RowResult, TargetSettings
from custsync.testing import MemorySource, MemoryTarget


class MemorySourceSettings(SourceSettings):
    name: str = "default"


class MemoryTargetSettings(TargetSettings):
    name: str = "default"


SOURCES: dict[str, MemorySource] = {}
TARGETS: dict[str, MemoryTarget] = {}


@pytest.fixture(autouse=True)
def memory_connectors() -> Iterator[None]:
    plugins.register(
        Connector(
            "memory",
            "source",
            MemorySourceSettings,
            lambda settings, base_dir: SOURCES[settings.name],
        )
    )
    plugins.register(
        Connector(
            "memory",
            "target",
            MemoryTargetSettings,
            lambda settings, base_dir: TARGETS[settings.name],
        )
    )
    yield
    plugins.unregister("source", "memory")
    plugins.unregister("target", "memory")
    SOURCES.clear()
    TARGETS.clear()


def customer(
    cid: str, *, ts: str = "2026-01-02T10:00:00.000Z", email: str | None = None, **attrs: Any
) -> dict[str, Any]:
    return {
        "id": cid,
        "type": "customers",
        "attributes": {"email": email or f"{cid}@example.com", "updated_at": ts, **attrs},
    }


def make_job(
    tmp_path: Path,
    records: Sequence[dict[str, Any]],
    *,
    ordered: bool = False,
    local: bool = False,
    target: MemoryTarget | None = None,
    fields: dict[str, Any] | None = None,
    key: str = "cl_id",
    **sync: Any,
) -> tuple[Job, MemoryTarget]:
    SOURCES["default"] = MemorySource(records, ordered=ordered, local=local)
    TARGETS["default"] = target or MemoryTarget()
    mapping = fields or {
        "cl_id": "id",
        "email": {"path": "email", "transform": "lower"},
        "tier": "metadata.tier",
        "seen": "updated_at",
    }
    job = Job.from_dict(
        {
            "name": "t",
            "source": {"connector": "memory"},
            "target": {"connector": "memory", "key": key},
            "mapping": {"fields": mapping},
            "sync": {"batch_size": 2, "max_rejects": 100, **sync},
        },
        base_dir=tmp_path,
    )
    return job, TARGETS["default"]


def rejects(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / ".custsync" / "rejects" / "t.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_counts_add_up(result: RunResult) -> None:
    counts = result.counts()
    assert counts["read"] == sum(v for k, v in counts.items() if k != "read"), counts


def test_every_record_read_lands_in_exactly_one_count(tmp_path: Path) -> None:
    records = [
        customer("a"),
        customer("b", email="not-an-email"),
        customer("c", status="vip"),
        customer("a", ts="2026-01-02T11:00:00.000Z"),
        customer("d"),
    ]
    job, _ = make_job(tmp_path, records)

    result = job.run()

    assert_counts_add_up(result)
    assert (result.read, result.inserted, result.duplicates, result.rejected) == (5, 2, 1, 2)


def test_keep_latest_across_batches_replaces_an_earlier_committed_record(tmp_path: Path) -> None:
    records = [
        customer("a", metadata={"tier": "silver"}),
        customer("x"),
        customer("y"),
        customer("a", ts="2026-01-03T00:00:00.000Z", metadata={"tier": "gold"}),
    ]
    job, target = make_job(tmp_path, records, batch_size=1)

    result = job.run()

    assert target.rows[("a",)]["tier"] == "gold"
    assert (result.inserted, result.updated, result.duplicates) == (3, 0, 1)
    [dup] = rejects(tmp_path)
    assert dup["stage"] == "dedupe"
    assert dup["record"]["metadata"] == {"tier": "silver"}
    assert dup["duplicate_of"] == "a"
    assert_counts_add_up(result)


def test_keep_latest_keeps_an_earlier_newer_record(tmp_path: Path) -> None:
    records = [
        customer("a", ts="2026-01-03T00:00:00.000Z", metadata={"tier": "gold"}),
        customer("a", ts="2026-01-02T00:00:00.000Z", metadata={"tier": "silver"}),
    ]
    job, target = make_job(tmp_path, records, batch_size=1)

    result = job.run()

    assert target.rows[("a",)]["tier"] == "gold"
    assert (result.inserted, result.duplicates) == (1, 1)
    assert rejects(tmp_path)[0]["record"]["metadata"] == {"tier": "silver"}


def test_keep_latest_breaks_ties_by_the_last_seen(tmp_path: Path) -> None:
    records = [customer("a", metadata={"tier": "first"}), customer("a", metadata={"tier": "last"})]
    job, target = make_job(tmp_path, records)

    job.run()

    assert target.rows[("a",)]["tier"] == "last"


def test_keep_first_keeps_the_first_seen_even_if_older(tmp_path: Path) -> None:
    records = [
        customer("a", metadata={"tier": "first"}),
        customer("a", ts="2026-02-01T00:00:00.000Z", metadata={"tier": "later"}),
    ]
    job, target = make_job(tmp_path, records, batch_size=1, duplicates="keep_first")

    result = job.run()

    assert target.rows[("a",)]["tier"] == "first"
    assert result.duplicates == 1


def test_merge_fills_empty_fields_from_older_records(tmp_path: Path) -> None:
    fields = {"cl_id": "id", "tier": "metadata.tier", "city": "metadata.city", "seen": "updated_at"}
    records = [
        customer("a", metadata={"tier": "gold", "city": "Rome"}),
        customer("a", ts="2026-02-01T00:00:00.000Z", metadata={"city": "Milan"}),
    ]
    job, target = make_job(tmp_path, records, batch_size=1, duplicates="merge", fields=fields)

    result = job.run()

    assert target.rows[("a",)]["tier"] == "gold"
    assert target.rows[("a",)]["city"] == "Milan"
    assert (result.inserted, result.duplicates) == (1, 1)


def test_reject_policy_counts_later_duplicates_as_rejected(tmp_path: Path) -> None:
    records = [customer("a"), customer("a", ts="2026-02-01T00:00:00.000Z")]
    job, _ = make_job(tmp_path, records, duplicates="reject")

    result = job.run()

    assert (result.inserted, result.rejected, result.duplicates) == (1, 1, 0)


def test_duplicate_keys_that_differ_in_case_meet_after_the_mapping(tmp_path: Path) -> None:
    fields = {"email": {"path": "email", "transform": "lower"}, "seen": "updated_at"}
    records = [
        customer("a", email="Ann@Example.com"),
        customer("b", ts="2026-02-01T00:00:00.000Z", email="ann@example.com"),
    ]
    job, target = make_job(tmp_path, records, fields=fields, key="email")

    result = job.run()

    assert list(target.rows) == [("ann@example.com",)]
    assert rejects(tmp_path)[0]["duplicate_of"] == "b"
    assert result.duplicates == 1


def test_a_record_without_a_key_is_rejected_at_map_naming_the_column(tmp_path: Path) -> None:
    fields = {"customer_no": ["reference", "metadata.erp_id"], "seen": "updated_at"}
    job, _ = make_job(tmp_path, [customer("a")], fields=fields, key="customer_no")

    result = job.run()

    [reject] = rejects(tmp_path)
    assert reject["stage"] == "map"
    assert reject["errors"][0]["field"] == "customer_no"
    assert result.rejected == 1


def test_the_second_run_skips_what_the_first_committed(tmp_path: Path) -> None:
    records = [customer("a", ts="2026-01-01T00:00:00.000Z"), customer("b")]
    job, target = make_job(tmp_path, records)
    job.run()

    again = job.run()

    # a is older than the watermark; b sits at it, and the first run wrote it
    assert (again.skipped, again.unchanged) == (2, 0)
    assert sorted(target.rows) == [("a",), ("b",)]


def test_records_at_the_watermark_instant_arriving_later_are_not_lost(tmp_path: Path) -> None:
    job, target = make_job(tmp_path, [customer("a")])
    job.run()
    SOURCES["default"] = MemorySource([customer("a"), customer("b")])  # b: a tie, seen late

    result = job.run()

    assert ("b",) in target.rows
    assert result.inserted == 1


def test_full_refresh_reads_everything(tmp_path: Path) -> None:
    job, _ = make_job(tmp_path, [customer("a", ts="2026-01-01T00:00:00.000Z"), customer("b")])
    job.run()

    result = job.run(full_refresh=True)

    assert (result.skipped, result.unchanged) == (0, 2)


def test_a_stale_record_does_not_replace_a_newer_row(tmp_path: Path) -> None:
    job, target = make_job(
        tmp_path, [customer("a", ts="2026-03-01T00:00:00.000Z", metadata={"tier": "new"})]
    )
    job.run()
    SOURCES["default"] = MemorySource([customer("a", metadata={"tier": "old"})])

    result = job.run(full_refresh=True)

    assert result.stale == 1
    assert target.rows[("a",)]["tier"] == "new"


def test_a_dry_run_writes_nothing_and_moves_nothing(tmp_path: Path) -> None:
    job, target = make_job(tmp_path, [customer("a"), customer("b")])

    result = job.run(dry_run=True)

    assert result.inserted == 2
    assert target.rows == {}
    assert job.state_store().get("t").watermark is None


def test_environment_rejects_the_other_modes_records(tmp_path: Path) -> None:
    live = {**customer("a"), "meta": {"mode": "live"}}
    test = {**customer("b"), "meta": {"mode": "test"}}
    unknown = customer("c")
    SOURCES["default"] = MemorySource([live, test, unknown])
    TARGETS["default"] = MemoryTarget()
    job = Job.from_dict(
        {
            "name": "t",
            "source": {"connector": "memory", "environment": "live"},
            "target": {"connector": "memory", "key": "id"},
            "mapping": {"fields": {"id": "id"}},
            "sync": {"max_rejects": 10},
        },
        base_dir=tmp_path,
    )

    result = job.run()

    assert sorted(TARGETS["default"].rows) == [("a",), ("c",)]
    assert rejects(tmp_path)[0]["errors"][0]["field"] == "meta.mode"
    assert result.rejected == 1


def test_rejects_beyond_max_rejects_end_with_exit_3_and_still_move_the_watermark(
    tmp_path: Path,
) -> None:
    job, _ = make_job(tmp_path, [customer("a"), customer("b", email="bad")], max_rejects=0)

    result = job.run()

    assert (result.status, result.exit_code) == ("rejects_exceeded", 3)
    assert job.state_store().get("t").watermark is not None


def test_passwords_never_reach_the_rejects_file(tmp_path: Path) -> None:
    job, _ = make_job(tmp_path, [customer("a", email="bad", password="hunter2-secret")])

    job.run()

    text = (tmp_path / ".custsync" / "rejects" / "t.jsonl").read_text()
    assert "hunter2-secret" not in text
    assert '"password":"**********"' in text


class ExplodingTarget(MemoryTarget):
    """Fails every write after ``ok`` successful ones, like a database that went away."""

    def __init__(self, ok: int) -> None:
        super().__init__()
        self.ok = ok

    def write(self, rows: Sequence[Row]) -> list[RowResult]:
        if self.writes >= self.ok:
            raise TargetError("connection lost")
        return super().write(rows)


def test_a_failed_run_of_an_unordered_source_keeps_the_watermark(tmp_path: Path) -> None:
    records = [customer(c) for c in "abcdef"]
    job, _ = make_job(tmp_path, records, target=ExplodingTarget(ok=1))

    result = job.run()

    assert (result.status, result.exit_code) == ("failed", 1)
    assert "connection lost" in (result.error or "")
    assert job.state_store().get("t").watermark is None


def test_an_ordered_source_resumes_from_its_last_committed_checkpoint(tmp_path: Path) -> None:
    records = [customer(c, ts=f"2026-01-0{i + 1}T00:00:00.000Z") for i, c in enumerate("abcdef")]
    job, _ = make_job(tmp_path, records, ordered=True, target=ExplodingTarget(ok=2))
    assert job.run().status == "failed"
    assert job.state_store().get("t").cursor == {"offset": 4}

    TARGETS["default"] = MemoryTarget()
    result = job.run()

    assert result.status == "ok"
    assert result.read == 2  # e and f: the read resumed after the fourth record


def test_a_stop_request_ends_after_the_batch_in_flight(tmp_path: Path) -> None:
    records = [customer(c) for c in "abcdef"]
    job, target = make_job(tmp_path, records)
    stop = threading.Event()
    stop.set()

    result = job.run(stop=stop)

    assert (result.status, result.exit_code) == ("interrupted", 1)
    assert len(target.rows) == 2  # the first batch of two committed
    assert job.state_store().get("t").watermark is None


def test_limit_stops_early_and_keeps_the_watermark_of_an_unordered_source(tmp_path: Path) -> None:
    job, _ = make_job(tmp_path, [customer(c) for c in "abcdef"])

    result = job.run(limit=3)

    assert result.read == 4  # whole batches: the limit is reached inside the second
    assert job.state_store().get("t").watermark is None


# --- commits across batches (commit_interval) ----------------------------------------------


def rows_after_each_batch(
    job: Job, target: MemoryTarget, **run: Any
) -> tuple[RunResult, list[int]]:
    """The run, and how many rows the target had committed after each batch."""
    seen: list[int] = []
    result = job.run(progress=lambda counts: seen.append(len(target.rows)), **run)
    return result, seen


def test_a_local_source_commits_every_interval_not_every_batch(tmp_path: Path) -> None:
    records = [customer(c) for c in "abcdef"]
    job, target = make_job(tmp_path, records, local=True, commit_interval="1h")

    result, seen = rows_after_each_batch(job, target)

    assert result.status == "ok"
    assert seen == [0, 0, 0]  # three batches written into one open transaction
    assert (target.writes, target.commits, len(target.rows)) == (3, 1, 6)
    assert job.state_store().get("t").watermark is not None


def test_a_commit_interval_of_0_commits_every_batch(tmp_path: Path) -> None:
    records = [customer(c) for c in "abcdef"]
    job, target = make_job(tmp_path, records, local=True, commit_interval=0)

    result, seen = rows_after_each_batch(job, target)

    assert result.status == "ok"
    assert seen == [2, 4, 6]


def test_a_source_that_may_wait_on_a_remote_commits_every_batch(tmp_path: Path) -> None:
    """An API's next page may be minutes away (an export being made): what came before it
    is committed, not held."""
    records = [customer(c) for c in "abcdef"]
    job, target = make_job(tmp_path, records, local=False, commit_interval="1h")

    _, seen = rows_after_each_batch(job, target)

    assert seen == [2, 4, 6]


def test_a_transaction_commits_once_the_interval_has_passed(tmp_path: Path) -> None:
    records = [customer(c) for c in "abcdefgh"]
    job, target = make_job(tmp_path, records, local=True, commit_interval="1.5s")
    seen: list[int] = []
    with freeze_time("2026-03-01T12:00:00Z") as clock:

        def progress(counts: Any) -> None:
            seen.append(len(target.rows))
            clock.tick(1)  # each batch takes a second

        result = job.run(progress=progress)

    assert result.status == "ok"
    # Begun at 0 s; at 2 s, after the third batch, 1.5 s have passed: commit. The fourth
    # begins another, committed at the end of the run.
    assert seen == [0, 0, 6, 6]
    assert (target.commits, len(target.rows)) == (2, 8)


def test_a_failed_write_rolls_back_the_transaction_and_its_counts(tmp_path: Path) -> None:
    records = [customer(c) for c in "abcdef"]
    job, target = make_job(
        tmp_path, records, local=True, commit_interval="1h", target=ExplodingTarget(ok=2)
    )

    result = job.run()

    assert result.status == "failed"
    assert target.rows == {}
    assert result.inserted == 0  # the four rows written were rolled back
    assert any(
        "4 rows written since the run's last commit were rolled back" in n for n in result.notes
    )
    assert job.state_store().get("t").watermark is None

    TARGETS["default"] = clean = MemoryTarget()
    again = job.run()

    assert (again.status, again.inserted, len(clean.rows)) == ("ok", 6, 6)


def test_an_ordered_source_checkpoints_only_what_was_committed(tmp_path: Path) -> None:
    records = [customer(c, ts=f"2026-01-0{i + 1}T00:00:00.000Z") for i, c in enumerate("abcdef")]
    job, _ = make_job(
        tmp_path,
        records,
        ordered=True,
        local=True,
        commit_interval="1h",
        target=ExplodingTarget(ok=2),
    )

    assert job.run().status == "failed"

    assert job.state_store().get("t").cursor is None  # two batches written, none committed
    TARGETS["default"] = MemoryTarget()
    assert job.run().read == 6


def test_a_stop_request_commits_what_the_transaction_holds(tmp_path: Path) -> None:
    records = [customer(c) for c in "abcdef"]
    job, target = make_job(tmp_path, records, local=True, commit_interval="1h")
    stop = threading.Event()
    stop.set()

    result = job.run(stop=stop)

    assert result.status == "interrupted"
    assert (len(target.rows), target.commits) == (2, 1)


class FailingSource(MemorySource):
    """Fails after ``ok`` batches, like a file that ends in a broken line."""

    def __init__(self, records: Sequence[dict[str, Any]], ok: int) -> None:
        super().__init__(records, local=True)
        self.ok = ok

    def _batches(self, start: int, batch_size: int) -> Iterator[SourceBatch]:
        for number, batch in enumerate(super()._batches(start, batch_size)):
            if number == self.ok:
                raise SourceError("broken input after the second batch")
            yield batch


def test_a_source_error_commits_the_batches_written_before_it(tmp_path: Path) -> None:
    """They are whole, and a run committing every batch would have kept them too."""
    job, target = make_job(tmp_path, [], commit_interval="1h")
    SOURCES["default"] = FailingSource([customer(c) for c in "abcdef"], ok=2)

    result = job.run()

    assert result.status == "failed"
    assert "broken input" in (result.error or "")
    assert (len(target.rows), result.inserted) == (4, 4)
    assert job.state_store().get("t").watermark is None  # the input was not read whole


def test_a_second_run_while_the_lock_is_held_is_locked(tmp_path: Path) -> None:
    job, _ = make_job(tmp_path, [customer("a")])

    with job.state_store().lock("t"):
        result = job.run()

    assert (result.status, result.exit_code) == ("locked", 75)


def test_the_summary_has_designs_keys_in_order(tmp_path: Path) -> None:
    job, _ = make_job(tmp_path, [customer("a")])

    summary = job.run().as_dict()

    assert list(summary) == ["job", "run_id", "status", *COUNTS, "watermark", "duration_s"]


ids = st.sampled_from(list("abcdefgh"))
stamps = st.sampled_from(
    ["2026-01-01T00:00:00.000Z", "2026-01-02T00:00:00.000Z", "2026-01-03T00:00:00.000Z"]
)
tiers = st.sampled_from([None, "gold", "silver"])
records_strategy = st.lists(
    st.builds(
        lambda i, t, tier, bad: customer(
            i, ts=t, email="bad" if bad else None, metadata={"tier": tier}
        ),
        ids,
        stamps,
        tiers,
        st.booleans(),
    ),
    max_size=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    records=records_strategy,
    batch_size=st.integers(1, 5),
    policy=st.sampled_from(["keep_latest", "keep_first", "merge"]),
)
def test_running_twice_equals_running_once(
    tmp_path_factory: pytest.TempPathFactory,
    records: list[dict[str, Any]],
    batch_size: int,
    policy: str,
) -> None:
    folder = tmp_path_factory.mktemp("twice")
    job, target = make_job(folder, records, batch_size=batch_size, duplicates=policy)
    first = job.run()
    after_one = {k: dict(v) for k, v in target.rows.items()}

    second = job.run(full_refresh=True)

    assert target.rows == after_one
    assert second.inserted == 0
    # A duplicate split across batches may rewrite its row on the way to the same end
    # state (the earlier record is written before the later one wins): never more.
    assert second.updated <= second.duplicates
    assert_counts_add_up(first)
    assert_counts_add_up(second)
    assert first.inserted == len(after_one)


def test_ties_across_batches_keep_the_last_seen_to_the_microsecond(tmp_path: Path) -> None:
    tie = "2026-01-02T10:30:00.123457Z"
    records = [
        customer("a", ts=tie, metadata={"tier": "first"}),
        customer("x"),
        customer("a", ts=tie, metadata={"tier": "last"}),
    ]
    job, target = make_job(tmp_path, records, batch_size=1)

    result = job.run()

    assert target.rows[("a",)]["tier"] == "last"
    assert result.duplicates == 1


def test_a_value_the_target_cannot_store_is_rejected_naming_the_column(tmp_path: Path) -> None:
    # JSON holds no integer beyond 64 bits for the sql target's encoder; a record read by
    # a program (a notebook's own source) can carry one. Its record goes to the rejects
    # file at "map", naming the column; the others are written.
    SOURCES["default"] = MemorySource(
        [customer("a"), customer("b", metadata={"n": 2**70}), customer("c")]
    )
    job = Job.from_dict(
        {
            "name": "t",
            "source": {"connector": "memory"},
            "target": {"connector": "sql", "url": f"sqlite:///{tmp_path / 't.db'}", "key": "id"},
            "mapping": {"fields": {"id": "id", "metadata": "metadata", "seen": "updated_at"}},
            "sync": {"batch_size": 2, "max_rejects": 100},
        },
        base_dir=tmp_path,
    )

    result = job.run()

    assert (result.status, result.inserted, result.rejected) == ("ok", 2, 1)
    [reject] = rejects(tmp_path)
    assert (reject["stage"], reject["source_id"]) == ("map", "b")
    assert reject["errors"][0]["field"] == "metadata"
    assert "64-bit" in reject["errors"][0]["message"]
    assert reject["record"]["metadata"] == {"n": str(2**70)}  # as text: JSON holds no such int


# --- a prepared batch through the parallel run's pipe -------------------------------------


def candidate_fields(prepared: _Prepared) -> list[tuple[Any, ...]]:
    return [
        (c.key, c.ts, c.seq, c.source_id, dict(c.record), c.row, c.outcome)
        for c in prepared.candidates
    ]


@pytest.mark.parametrize("packed", [True, False], ids=["packed records", "plain records"])
def test_a_prepared_batch_pickles_whole(packed: bool) -> None:
    ts = datetime(2026, 1, 2, 10, 0, tzinfo=UTC)
    records: list[Mapping[str, Any]] = [{"id": f"c{n}", "n": n} for n in range(5)]
    if packed:
        records = PackedRecords.pack(records)
    prepared = _Prepared(
        read=7,
        skipped=1,
        notes=["a note"],
        checkpoint=Checkpoint(ts, {"offset": 7}),
        rejects=[Reject("validate", "c9", None, [FieldError("email", "bad")], {"id": "c9"})],
        candidates=[
            Candidate((f"c{n}",), ts if n % 2 else None, 0, f"c{n}", record, (f"c{n}", n))
            for n, record in enumerate(records)
        ],
        max_seen=ts,
    )

    back = pickle.loads(pickle.dumps(prepared))

    assert candidate_fields(back) == candidate_fields(prepared)
    assert (back.read, back.skipped, back.notes, back.checkpoint, back.max_seen) == (
        7,
        1,
        ["a note"],
        Checkpoint(ts, {"offset": 7}),
        ts,
    )
    assert [(r.source_id, r.errors) for r in back.rejects] == [("c9", prepared.rejects[0].errors)]

    prepared.candidates[3].seq, prepared.candidates[3].outcome = 12, "inserted"
    assert candidate_fields(pickle.loads(pickle.dumps(prepared))) == candidate_fields(prepared)


def test_a_run_that_fails_before_it_reads_is_in_the_run_log(tmp_path: Path) -> None:
    """A run is logged as it begins writing; one that fails before (its source cannot be
    opened) is logged as it ends, with its error."""

    def cannot_open(settings: Any, base_dir: Any) -> Any:
        raise SourceError("the export is gone")

    job, _ = make_job(tmp_path, [customer("a")])
    plugins.register(Connector("memory", "source", MemorySourceSettings, cannot_open))

    first = job.run()
    second = job.run()

    runs = job.state_store().runs("t")
    assert [(r.run_id, r.status) for r in runs] == [
        (second.run_id, "failed"),
        (first.run_id, "failed"),
    ]
    assert all("the export is gone" in (r.error or "") for r in runs)
    assert all(r.ended_at is not None and r.ended_at >= r.started_at for r in runs)


def test_a_run_is_logged_once_with_its_counts(tmp_path: Path) -> None:
    job, _ = make_job(tmp_path, [customer("a"), customer("b")])

    result = job.run()

    [run] = job.state_store().runs("t")
    assert (run.run_id, run.status, run.counts["inserted"]) == (result.run_id, "ok", 2)


def counting_target(target: MemoryTarget) -> list[int]:
    """Count how often the run makes its target (the connector's factory is called)."""
    made: list[int] = []

    def make(settings: Any, base_dir: Any) -> MemoryTarget:
        made.append(1)
        return target

    plugins.register(Connector("memory", "target", MemoryTargetSettings, make))
    return made


def test_a_run_with_nothing_to_write_never_makes_its_target(tmp_path: Path) -> None:
    job, target = make_job(tmp_path, [customer("a"), customer("b", ts="2026-01-01T00:00:00.000Z")])
    assert job.run().inserted == 2
    made = counting_target(target)

    again = job.run()

    assert (again.status, again.skipped, made) == ("ok", 2, [])


def test_a_first_run_makes_its_target_even_with_nothing_to_write(tmp_path: Path) -> None:
    job, target = make_job(tmp_path, [])
    made = counting_target(target)

    assert job.run().status == "ok"
    assert made == [1]


def test_a_record_at_the_watermark_the_last_run_rejected_is_read_again(tmp_path: Path) -> None:
    job, target = make_job(tmp_path, [customer("a"), customer("b", email="not-an-email")])
    assert job.run().rejected == 1
    SOURCES["default"] = MemorySource([customer("a"), customer("b")])  # b fixed, same time

    again = job.run()

    assert (again.skipped, again.inserted) == (1, 1)
    assert ("b",) in target.rows


def test_a_changed_record_at_the_watermark_under_another_time_is_written(
    tmp_path: Path,
) -> None:
    job, target = make_job(tmp_path, [customer("a", tier="gold")])
    job.run()
    later = "2026-01-02T10:00:00.001Z"
    SOURCES["default"] = MemorySource([customer("a", ts=later, metadata={"tier": "vip"})])

    again = job.run()

    assert again.updated == 1
    assert target.rows[("a",)]["tier"] == "vip"


def test_records_within_the_lookback_the_last_run_wrote_are_skipped(tmp_path: Path) -> None:
    records = [
        customer("a", ts="2026-01-02T09:59:59.000Z"),
        customer("b", ts="2026-01-02T10:00:00.000Z"),
        customer("c", ts="2026-01-02T09:00:00.000Z"),  # beyond the lookback
    ]
    job, _ = make_job(tmp_path, records, lookback="5s")
    job.run()
    records.append(customer("d", ts="2026-01-02T09:59:58.000Z"))  # new, inside the lookback
    SOURCES["default"] = MemorySource(records)

    again = job.run()

    assert (again.skipped, again.inserted, again.unchanged) == (3, 1, 0)


def test_at_most_a_thousand_keys_are_remembered_and_the_rest_compared(tmp_path: Path) -> None:
    records = [customer(f"c{n:04d}") for n in range(1_005)]
    job, _ = make_job(tmp_path, records, batch_size=100)
    job.run()

    again = job.run()

    assert (again.skipped, again.unchanged) == (1_000, 5)
    assert sum(len(keys) for keys in job.state_store().get("t").seen.values()) == 1_000


def test_other_values_for_a_remembered_key_and_time_are_written(tmp_path: Path) -> None:
    """The last run wrote key a at 10:00 with tier gold; a record of a at the same instant
    with tier vip is compared with the target as before (at equal times it wins)."""
    job, target = make_job(tmp_path, [customer("a", metadata={"tier": "gold"})])
    job.run()
    SOURCES["default"] = MemorySource([customer("a", metadata={"tier": "vip"})])

    again = job.run()

    assert (again.skipped, again.updated) == (0, 1)
    assert target.rows[("a",)]["tier"] == "vip"


def test_merging_duplicates_remembers_nothing_and_compares_again(tmp_path: Path) -> None:
    """A merged row took fields from a record that lost: were that record skipped, the
    winner read again alone would lose them. A merge run compares both as before."""
    fields = {"cl_id": "id", "tier": "metadata.tier", "city": "metadata.city", "seen": "updated_at"}
    records = [
        customer("a", metadata={"tier": "gold", "city": "Rome"}),
        customer("a", metadata={"city": "Milan"}),  # same instant: the later one wins
    ]
    job, target = make_job(tmp_path, records, duplicates="merge", fields=fields)
    job.run()

    again = job.run()

    assert (again.skipped, again.unchanged, again.duplicates) == (0, 1, 1)
    assert job.state_store().get("t").seen == {}
    assert (target.rows[("a",)]["tier"], target.rows[("a",)]["city"]) == ("gold", "Milan")
