"""Duplicate keys across a whole run, resolved by the job's ``duplicates`` policy.

Batches are written as they come, so a key may meet its duplicate in a later batch after
the first record was committed. The ledger remembers, per key, the record that holds the
key so far (its ``updated_at``, order, id, outcome and content): up to a bound of them in
a compact table in memory, the rest in a scratch SQLite file, so memory stays flat
however many keys a run sees. When a later record wins, the earlier one becomes the loser
after the fact: the engine moves it from its count to ``duplicates`` and writes it to the
rejects file.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import orjson

from custsync._sqlite import bind_nulls_directly
from custsync.model import SECRET_KEYS
from custsync.targets.base import Key, Outcome

Policy = Literal["keep_latest", "keep_first", "merge", "reject"]
_EPOCH = datetime.min.replace(tzinfo=UTC)
_CHUNK = 500
_SPILL_CHUNK = 32
# Holders kept in memory (about 190 bytes each: 28 MB at most) before they move to the
# scratch file: a run of 100,000 keys never touches the file, a larger one moves them in
# sorted runs, which SQLite takes several times faster than each batch's scattered keys.
_MEMORY_KEYS = 150_000
# In memory a holder is one bytes object: this head, then its id when that is not its key.
_HEAD = struct.Struct("<qqqIIb")  # ts in microseconds (or _NO_TS), seq, at, size, item, outcome
_NO_TS = -(2**63)
_OUTCOMES: tuple[str | None, ...] = (None, *(outcome.value for outcome in Outcome))
_OUTCOME_CODES = {outcome: code for code, outcome in enumerate(_OUTCOMES)}
# updated_at kept as whole microseconds since 1970: exact, so ties stay ties.
_UNIX = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class PackedRecords:
    """Records as one JSON array, decoded only when something reads one of them (a
    reject).

    A parallel run's worker packs the records of each stretch it prepares, in one orjson
    call (a call per record costs four times as much): the writer's side then neither
    unpickles the records nor serialises them again for the ledger, which spills the
    array as it is (``scrubbed``: without the records' top-level secrets).
    """

    __slots__ = ("_records", "blob", "scrubbed")

    def __init__(self, blob: bytes, scrubbed: bytes) -> None:
        self.blob = blob
        self.scrubbed = scrubbed
        self._records: list[dict[str, Any]] | None = None

    @classmethod
    def pack(cls, records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """Each record packed, or as it is when it is not plain JSON (it then travels as
        itself: a huge integer, a key that is not text)."""
        try:
            blob = orjson.dumps(records)
        except TypeError:
            if len(records) == 1:
                return list(records)
            return [packed for record in records for packed in cls.pack([record])]
        if all(SECRET_KEYS.isdisjoint(record) for record in records):
            scrubbed = blob
        else:
            scrubbed = orjson.dumps([_scrub(record) for record in records])
        packed = cls(blob, scrubbed)
        return [PackedRecord(packed, item) for item in range(len(records))]

    def __reduce__(self) -> tuple[type[PackedRecords], tuple[bytes, bytes]]:
        return (PackedRecords, (self.blob, self.scrubbed))

    def record(self, item: int) -> dict[str, Any]:
        if self._records is None:
            self._records = orjson.loads(self.blob)
        return self._records[item]

    def __repr__(self) -> str:
        return "PackedRecords(...)"  # never the content: it may hold a secret


class PackedRecord(Mapping[str, Any]):
    """One record of a ``PackedRecords`` (pickled with it: the array travels once)."""

    __slots__ = ("item", "pack")

    def __init__(self, pack: PackedRecords, item: int) -> None:
        self.pack = pack
        self.item = item

    def __reduce__(self) -> tuple[type[PackedRecord], tuple[PackedRecords, int]]:
        return (PackedRecord, (self.pack, self.item))

    def __getitem__(self, key: str) -> Any:
        return self.pack.record(self.item)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.pack.record(self.item))

    def __len__(self) -> int:
        return len(self.pack.record(self.item))

    def __repr__(self) -> str:
        return "PackedRecord(...)"  # never the content: it may hold a secret


@dataclass(slots=True)
class Candidate:
    """A record that mapped to a row with a key, competing for that key."""

    key: Key
    ts: datetime | None
    seq: int
    source_id: str
    record: Mapping[str, Any]  # as read; the rejects writer masks its secrets
    row: dict[str, Any] | tuple[Any, ...]  # as mapped, or as the target's codec encoded it
    outcome: str | None = None  # once written: the target's outcome

    def rank(self) -> tuple[datetime, int]:
        return (self.ts or _EPOCH, self.seq)

    def __reduce__(self) -> tuple[type[Candidate], tuple[Any, ...]]:
        # A parallel run pickles thousands a batch: a tuple of the fields is a sixth of
        # the default's work for a class with slots (a state dict per object).
        return (
            Candidate,
            (self.key, self.ts, self.seq, self.source_id, self.record, self.row, self.outcome),
        )


@dataclass(slots=True)
class Resolution:
    """The outcome of one batch: who is written, who lost, and earlier winners unseated."""

    winners: list[Candidate] = field(default_factory=list)
    losers: list[tuple[Candidate, Candidate]] = field(default_factory=list)  # (loser, winner)
    # Earlier committed holders of a key that a winner of this batch replaces, by key.
    unseated: dict[Key, Candidate] = field(default_factory=dict)
    # merge only: holders that keep their key but gained fields, written again, not counted.
    rewrites: list[Candidate] = field(default_factory=list)


def _merge(ranked: Sequence[Candidate]) -> dict[str, Any]:
    """Fields of later records override earlier ones, but an empty value never erases."""
    merged: dict[str, Any] = {}
    for candidate in ranked:
        row = candidate.row
        assert isinstance(row, dict)  # a merge run keeps rows as mapped (never encoded)
        for name, value in row.items():
            if (value is not None and value != "") or name not in merged:
                merged[name] = value
    return merged


class Ledger:
    """Who holds each key so far in this run.

    A table (key, ``updated_at``, order, id, outcome) finds holders by key: up to
    ``memory_keys`` of its rows in memory, then all of them moved, in key order, to a
    scratch SQLite file. Their records, needed only when a holder later loses, are
    appended to a spill file beside it and read back by offset. The files go when the run
    ends.
    """

    def __init__(
        self, policy: Policy, *, directory: Path | None = None, memory_keys: int = _MEMORY_KEYS
    ) -> None:
        self.policy = policy
        self._memory_keys = memory_keys
        self._recent: dict[str, bytes] = {}  # key -> _HEAD, then the id if not the key
        self._recent_rows: dict[str, bytes] = {}  # merge only: key -> its pickled row
        self._stored = 0  # holders moved to the file
        self._dir = tempfile.TemporaryDirectory(prefix="custsync-run-", dir=directory)
        folder = Path(self._dir.name)
        bind_nulls_directly()
        self._db = sqlite3.connect(folder / "ledger.db")
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        # One process uses the file: no lock to take and give back at every statement.
        self._db.execute("PRAGMA locking_mode = EXCLUSIVE")
        # 8 MiB of page cache: pages beyond it come from the OS's file cache. More adds to
        # the peak memory of a large run (measured: +27 MB at 1M keys) and saves no time.
        self._db.execute("PRAGMA cache_size = -8192")
        self._db.execute(
            "CREATE TABLE holder (key TEXT PRIMARY KEY, ts INTEGER, seq INTEGER, source_id TEXT,"
            " outcome TEXT, at INTEGER, size INTEGER, item INTEGER, row BLOB) WITHOUT ROWID"
        )
        self._spill = (folder / "records.jsonl").open("w+b")
        self._end = 0

    def close(self) -> None:
        self._db.close()
        self._spill.close()
        self._dir.cleanup()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _key(key: Key) -> str:
        # Keys are text (the engine makes them so); a unit separator joins composite ones.
        return key[0] if len(key) == 1 and isinstance(key[0], str) else "\x1f".join(map(str, key))

    def _record(self, at: int, size: int, item: int, chunks: dict[int, list[Any]]) -> Any:
        chunk = chunks.get(at)
        if chunk is None:
            chunk = chunks[at] = orjson.loads(os.pread(self._spill.fileno(), size, at))
        return chunk[item]

    def _held(self, text: str) -> tuple[Any, ...]:
        """A holder kept in memory, as the file's table holds one (a ``holder`` row)."""
        held = self._recent[text]
        ts, seq, at, size, item, outcome = _HEAD.unpack_from(held)
        return (
            text,
            ts if ts != _NO_TS else None,
            seq,
            held[_HEAD.size :].decode(errors="surrogatepass") or text,
            _OUTCOMES[outcome],
            at,
            size,
            item,
            self._recent_rows.get(text),
        )

    def _holders(self, keys: Sequence[Key]) -> dict[Key, Candidate]:
        if not self._recent and not self._stored:
            return {}
        encoded = {self._key(k): k for k in keys}
        found_rows = [self._held(text) for text in encoded if text in self._recent]
        elsewhere = [text for text in encoded if text not in self._recent] if self._stored else []
        for start in range(0, len(elsewhere), _CHUNK):  # not in memory: in the file, or new
            chunk = elsewhere[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            found_rows += self._db.execute(
                "SELECT key, ts, seq, source_id, outcome, at, size, item, row FROM holder "
                f"WHERE key IN ({marks})",
                chunk,
            )
        found: dict[Key, Candidate] = {}
        spilled: dict[int, list[Any]] = {}
        for text, ts, seq, source_id, outcome, at, size, item, row in found_rows:
            key = encoded[text]
            found[key] = Candidate(
                key,
                _UNIX + timedelta(microseconds=ts) if ts is not None else None,
                seq,
                source_id,
                self._record(at, size, item, spilled),
                pickle.loads(row) if row is not None else {},
                outcome,
            )
        return found

    def resolve(self, candidates: Sequence[Candidate]) -> Resolution:
        groups: dict[Key, list[Candidate]] = {}
        for candidate in candidates:
            groups.setdefault(candidate.key, []).append(candidate)
        holders = self._holders(list(groups))
        result = Resolution()
        for key, group in groups.items():
            holder = holders.get(key)
            contenders = ([holder] if holder is not None else []) + group
            if len(contenders) == 1:
                result.winners.append(group[0])
                continue
            if self.policy in ("keep_first", "reject"):
                winner = contenders[0]  # the holder, when there is one, came first
            else:
                winner = max(contenders, key=Candidate.rank)
            for loser in contenders:
                if loser is not winner and loser is not holder:
                    result.losers.append((loser, winner))
            if self.policy == "merge":
                merged = _merge(sorted(contenders, key=Candidate.rank))
                if winner is holder:
                    if merged != holder.row:
                        # The holder keeps the key but gains fields from older records.
                        result.rewrites.append(
                            Candidate(
                                key,
                                holder.ts,
                                holder.seq,
                                holder.source_id,
                                holder.record,
                                merged,
                                holder.outcome,
                            )
                        )
                    continue
                winner.row = merged
            if winner is holder:
                continue
            result.winners.append(winner)
            if holder is not None:
                result.unseated[key] = holder
        return result

    def commit(self, holders: Sequence[Candidate]) -> None:
        """Record the new holders of their keys (after the target's write)."""
        if not holders:
            return
        # Records lose their top-level secrets before they touch the scratch files; rows
        # are kept only where a later record may merge into them.
        keep_rows = self.policy == "merge"
        recent, rows, pack_head = self._recent, self._recent_rows, _HEAD.pack
        codes = _OUTCOME_CODES

        def hold(candidate: Candidate, at: int, size: int, item: int) -> None:
            text = self._key(candidate.key)
            ts = candidate.ts
            head = pack_head(
                (ts - _UNIX) // _MICROSECOND if ts is not None else _NO_TS,
                candidate.seq,
                at,
                size,
                item,
                codes[candidate.outcome],
            )
            source_id = candidate.source_id
            recent[text] = (
                head if source_id == text else head + source_id.encode(errors="surrogatepass")
            )
            if keep_rows:
                rows[text] = pickle.dumps(candidate.row, protocol=pickle.HIGHEST_PROTOCOL)

        self._spill.seek(self._end)
        # A parallel run's records come packed (``PackedRecords``): each array is spilled
        # once, as it is. The others go in chunks: one orjson call for a chunk costs a
        # fraction of one call per record, and a holder is read back (rarely) by chunk.
        spilled: dict[int, tuple[int, int]] = {}  # id of a PackedRecords: (at, size)
        plain: list[Candidate] = []
        for candidate in holders:
            record = candidate.record
            if record.__class__ is not PackedRecord:
                plain.append(candidate)
                continue
            pack = record.pack
            place = spilled.get(id(pack))
            if place is None:
                place = spilled[id(pack)] = (self._end, len(pack.scrubbed))
                self._spill.write(pack.scrubbed)
                self._end += len(pack.scrubbed)
            hold(candidate, *place, record.item)
        for start in range(0, len(plain), _SPILL_CHUNK):
            part = plain[start : start + _SPILL_CHUNK]
            blob = orjson.dumps([_scrub(c.record) for c in part], default=str)
            self._spill.write(blob)
            for item, candidate in enumerate(part):
                hold(candidate, self._end, len(blob), item)
            self._end += len(blob)
        self._spill.flush()
        if len(recent) >= self._memory_keys:
            self._store_recent()

    def _store_recent(self) -> None:
        """Move the holders in memory to the file, in key order: SQLite then visits each
        page of its key index once for the lot. The rows are made as SQLite takes them
        (a list of them all would double the ledger's memory for the moment)."""
        recent, rows = self._recent, self._recent_rows
        entries = (self._held(text) for text in sorted(recent))
        # The connection stays in one transaction for the whole run (sqlite3 opens it at
        # the first INSERT): without a journal, a commit would only cost time.
        self._db.executemany(
            "INSERT OR REPLACE INTO holder VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", entries
        )
        self._stored += len(recent)
        recent.clear()
        rows.clear()


def _scrub(record: Mapping[str, Any]) -> Mapping[str, Any]:
    if SECRET_KEYS.isdisjoint(record):
        return record  # the common case, checked in C
    return {k: v for k, v in record.items() if k.lower() not in SECRET_KEYS}
