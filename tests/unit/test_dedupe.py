"""The duplicate ledger with records packed as a parallel run's worker packs them: each
array travels and is spilled once, and a holder that later loses is read back whole,
less its top-level secrets."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custsync.dedupe import Candidate, Ledger, PackedRecord, PackedRecords

T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)


def record(cid: str, **extra: Any) -> dict[str, Any]:
    return {"id": cid, "email": f"{cid}@example.com", "metadata": {"tier": "gold"}, **extra}


def candidate(rec: Any, *, seconds: int) -> Candidate:
    return Candidate((rec["id"],), T0 + timedelta(seconds=seconds), 0, rec["id"], rec, {})


def test_packed_records_read_back_as_they_were_and_pickle_their_array_once() -> None:
    records = [record("a"), record("b", password="hunter2"), record("c")]

    packed = PackedRecords.pack(records)
    blob = pickle.dumps(packed, protocol=pickle.HIGHEST_PROTOCOL)
    back = pickle.loads(blob)

    assert all(isinstance(p, PackedRecord) for p in packed)
    assert [dict(p) for p in back] == records
    assert blob.count(b"hunter2") == 1  # one array (the scrubbed one has no password)
    assert back[0].pack is back[2].pack
    assert "hunter2" not in repr(packed) + repr(packed[1]) + repr(packed[1].pack)


def test_a_record_that_is_not_plain_json_travels_as_itself() -> None:
    huge = record("a", total=10**30)  # beyond orjson's 64-bit integers

    packed = PackedRecords.pack([huge, record("b")])

    assert packed[0] is huge
    assert isinstance(packed[1], PackedRecord)
    assert dict(packed[1]) == record("b")


def test_a_packed_holder_that_loses_later_is_read_back_without_its_secrets(
    tmp_path: Path,
) -> None:
    first = PackedRecords.pack([record("a", password="hunter2"), record("b")])
    with Ledger("keep_latest", directory=tmp_path) as ledger:
        holders = [candidate(rec, seconds=0) for rec in first]
        for number, holder in enumerate(holders, start=1):
            holder.seq, holder.outcome = number, "inserted"
        ledger.commit(holders)
        spill = next(tmp_path.glob("*/records.jsonl")).read_bytes()

        later = candidate(record("a", email="new@example.com"), seconds=60)
        later.seq = 3
        resolution = ledger.resolve([later])

    assert spill.count(b'"id":"a"') == 1  # the array, spilled once for both holders
    assert b"hunter2" not in spill
    assert resolution.winners == [later]
    unseated = resolution.unseated[("a",)]
    assert dict(unseated.record) == record("a")  # as read, less the password
    assert unseated.outcome == "inserted"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    batches=st.lists(
        st.lists(
            st.tuples(
                st.sampled_from(["a", "b", "c", "d", "e", "f", "g"]),
                st.one_of(st.none(), st.integers(0, 5)),
                st.booleans(),
                st.sampled_from(["", "x", "y"]),
            ),
            max_size=6,
        ),
        max_size=8,
    ),
    policy=st.sampled_from(["keep_latest", "keep_first", "merge", "reject"]),
)
def test_holders_moved_to_the_file_resolve_as_those_kept_in_memory(
    tmp_path: Path, batches: list[list[tuple[str, int | None, bool, str]]], policy: Any
) -> None:
    # The ledger keeps a bounded number of holders in memory and moves them to its file:
    # where a holder lives must never change a resolution.
    def run(memory_keys: int) -> list[Any]:
        seen: list[Any] = []
        seq = 0
        with Ledger(policy, directory=tmp_path, memory_keys=memory_keys) as ledger:
            for batch in batches:
                candidates = []
                for key, seconds, own_id, name in batch:
                    seq += 1
                    rec = record(key, name=name)
                    stamp = T0 + timedelta(seconds=seconds) if seconds is not None else None
                    source_id = f"{key}-{seq}" if own_id else key
                    candidates.append(Candidate((key,), stamp, seq, source_id, rec, {"n": name}))
                resolution = ledger.resolve(candidates)
                committed = resolution.winners + resolution.rewrites
                for n, candidate in enumerate(committed):
                    candidate.outcome = "inserted" if n % 2 else "updated"
                ledger.commit(committed)
                seen.append(
                    (
                        [(c.key, c.seq, c.row) for c in resolution.winners],
                        [(lo.seq, w.seq) for lo, w in resolution.losers],
                        {
                            k: (c.seq, c.ts, c.source_id, c.outcome, dict(c.record), c.row)
                            for k, c in resolution.unseated.items()
                        },
                        [(c.key, c.seq, c.row, c.outcome) for c in resolution.rewrites],
                    )
                )
        return seen

    assert run(memory_keys=2) == run(memory_keys=1_000_000)


def test_an_id_that_is_not_valid_unicode_is_held_as_it_was(tmp_path: Path) -> None:
    # A record's id may be a file's location, and a Linux file name need not be UTF-8
    # (Python keeps its bytes as lone surrogates): the ledger gives it back unchanged.
    odd = "customers-\udcff.csv:2"
    with Ledger("keep_latest", directory=tmp_path) as ledger:
        first = Candidate(("k",), T0, 1, odd, record("k"), {})
        first.outcome = "inserted"
        ledger.commit([first])
        later = candidate(record("k"), seconds=5)
        resolution = ledger.resolve([later])
    assert resolution.unseated[("k",)].source_id == odd
