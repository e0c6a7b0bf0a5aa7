"""The duplicate ledger with records packed as a parallel run's worker packs them: each
array travels and is spilled once, and a holder that later loses is read back whole,
less its top-level secrets."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

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
