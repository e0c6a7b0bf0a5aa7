"""The error tree: one root, grouped by what the user or the engine does about it.

Configuration errors stop a run before anything is read (exit 2); record errors send one
record to the rejects file and the run goes on; retriable errors may succeed on a retry;
fatal errors end the run (exit 1). Messages name a record by its id or key and a field,
never by its content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class CustsyncError(Exception):
    """The root of every error custsync raises on purpose."""


class ConfigError(CustsyncError):
    """The job file, a mapping or a connector setting is wrong: the user fixes it (exit 2).

    ``source`` names the file and ``key`` the setting, so the message can point at both.
    """

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.source = source
        self.key = key
        where = ", ".join(part for part in (source, f"key {key!r}" if key else None) if part)
        super().__init__(f"{where}: {message}" if where else message)


class MissingDependencyError(ConfigError):
    """An optional dependency is not installed; the message says which extra brings it."""

    def __init__(self, what: str, extra: str):
        self.extra = extra
        super().__init__(f"{what} needs an optional dependency: pip install 'custsync[{extra}]'")


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem with one field of one record."""

    field: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class RecordError(CustsyncError):
    """One record is bad; it goes to the rejects file and the run goes on."""

    def __init__(self, errors: Sequence[FieldError], *, source_id: str | None = None):
        self.errors = tuple(errors)
        self.source_id = source_id
        fields = ", ".join(f"{e.field}: {e.message}" for e in self.errors)
        super().__init__(f"record {source_id or '?'}: {fields}")


class RetriableError(CustsyncError):
    """The network, a lock wait, a throttle: the same call may succeed later."""


class FatalError(CustsyncError):
    """The run cannot go on (a target that refuses every write, a lost connection)."""


class SourceError(FatalError):
    """A source could not be read (a missing file, an unreadable format)."""


class TargetError(FatalError):
    """A target could not be written or prepared."""


class StateError(FatalError):
    """The state store could not be read or written."""


class LockedError(CustsyncError):
    """Another run of the same job holds its lock (exit 75)."""

    def __init__(self, job: str):
        self.job = job
        super().__init__(f"job {job!r} is already running (its lock is held); nothing was touched")


class Interrupted(CustsyncError):
    """SIGTERM or Ctrl-C: the run stopped after committing the batch in flight."""
