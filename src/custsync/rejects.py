"""The rejects file: JSON Lines, appended to by each run, one rejected record a line.

Each line holds what the user needs to fix and replay the record: the run, the stage
that refused it, its id and key, the field errors, and the record as read (after an
inbound mapping, before the outbound one) with every secret masked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import orjson

from custsync.errors import FieldError, SourceError
from custsync.model import redact

Stage = Literal["validate", "map", "dedupe", "load"]


@dataclass(frozen=True, slots=True)
class Reject:
    stage: Stage
    source_id: str | None
    key: Any
    errors: Sequence[FieldError]
    record: Mapping[str, Any] | None
    duplicate_of: str | None = None


def _default(value: Any) -> Any:
    # Secrets never reach here (records are redacted first); anything else odd is text.
    return str(value)


def _plain(value: Any) -> Any:
    """``value`` with what orjson cannot write as text: a reject keeps its record."""
    if isinstance(value, Mapping):
        return {
            k if isinstance(k, str | int | float | bool) else str(k): _plain(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)
    return value


class RejectsWriter:
    """Appends rejects for one run. ``flush`` makes them durable: the engine calls it
    before a checkpoint, so a record is never both past the watermark and unrecorded."""

    def __init__(self, path: Path, *, run_id: str, dry_run: bool = False) -> None:
        self.path = path
        self.run_id = run_id
        self.dry_run = dry_run
        self.count = 0
        self._file: IO[bytes] | None = None

    def add(self, reject: Reject) -> None:
        self.count += 1
        if self.dry_run:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
        key = reject.key
        if isinstance(key, tuple):
            key = key[0] if len(key) == 1 else list(key)
        line = {
            "run_id": self.run_id,
            "stage": reject.stage,
            "source_id": reject.source_id,
            "key": key,
            "errors": [e.as_dict() for e in reject.errors],
            "duplicate_of": reject.duplicate_of,
            "record": redact(dict(reject.record)) if reject.record is not None else None,
        }
        try:
            text = orjson.dumps(line, default=_default, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:  # an integer beyond 64 bits (orjson's limit), a key of no JSON type
            text = orjson.dumps(_plain(line), default=_default, option=orjson.OPT_NON_STR_KEYS)
        self._file.write(text + b"\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None


def read_rejects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The lines of a rejects file, for ``--from-rejects``: (line number, parsed line).

    Only what the file held when the read began is read: a replay of a job's own rejects
    file appends to it while it reads, and must not read its own new lines."""
    try:
        handle = path.open("rb")
        end = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise SourceError(f"cannot open rejects file {path}: {exc.strerror}") from exc
    with handle:
        for number, line in enumerate(handle, start=1):
            if handle.tell() - len(line) >= end:
                break  # a line this run appended
            if not line.strip():
                continue
            try:
                parsed = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise SourceError(f"{path}:{number}: not a rejects line ({exc})") from exc
            if isinstance(parsed, dict):
                yield number, parsed
