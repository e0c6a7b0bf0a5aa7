"""``custsync reconcile``: find target rows whose customer no longer exists.

Deletions are invisible to an ``updated_at`` scan, so a reconciliation lists every id the
source holds (Commerce Layer: a keyset scan of ids only) and every row of the target with
the source id it was written from, and acts on the rows whose id is gone, as the job's
``on_deleted`` says: report them, flag them (a timestamp column), or delete them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from custsync.errors import ConfigError
from custsync.sources.base import Enumerable
from custsync.targets.base import Key, Reconcilable

if TYPE_CHECKING:
    from custsync.engine import Job

FLAG_COLUMN = "deleted_in_source_at"
# Deleting more than this share of the target's rows needs force=True: a token scoped to
# one market, or the wrong organisation, would otherwise empty the table.
SAFETY_SHARE = 0.5


@dataclass
class ReconcileResult:
    job: str
    action: str
    source_ids: int = 0
    target_rows: int = 0
    missing: int = 0
    acted: int = 0
    examples: list[str] = field(default_factory=list)
    dry_run: bool = False
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "action": self.action,
            "dry_run": self.dry_run,
            "source_ids": self.source_ids,
            "target_rows": self.target_rows,
            "missing": self.missing,
            "acted": self.acted,
            "examples": self.examples,
            "duration_s": round(self.duration_s, 3),
        }


def id_column(job: Job) -> str:
    """The target column holding the source's id: a mapping field that is just ``id``."""
    for compiled in job.config.mapping.fields:
        if compiled.paths == ("id",) and compiled.plain is not None:
            return compiled.name
    raise ConfigError(
        'reconcile needs the source\'s id in a column: map a field to "id"',
        key="mapping.fields",
    )


def reconcile(job: Job, *, dry_run: bool = False, force: bool = False) -> ReconcileResult:
    started = time.monotonic()
    action = job.config.sync.on_deleted
    result = ReconcileResult(job.name, action, dry_run=dry_run)
    column = id_column(job)
    source = job.make_source()
    target = job.make_target()
    try:
        if not isinstance(source, Enumerable):
            raise ConfigError(
                f"the {job.config.source.connector} source cannot list its ids; reconcile "
                'needs connector = "commercelayer"',
                key="source.connector",
            )
        if not isinstance(target, Reconcilable):
            raise ConfigError(
                f"the {job.config.target.connector} target cannot list its rows",
                key="target.connector",
            )
        target.prepare(job.config.schema_, create=False)
        present = set(source.ids())
        result.source_ids = len(present)
        gone: list[Key] = []
        for key, source_id in target.scan(column):
            result.target_rows += 1
            if source_id is not None and str(source_id) not in present:
                gone.append(key)
                if len(result.examples) < 10:
                    result.examples.append(str(source_id))
        result.missing = len(gone)
        if dry_run or action == "report" or not gone:
            return result
        if (
            action == "delete"
            and not force
            and result.missing > SAFETY_SHARE * max(result.target_rows, 1)
        ):
            raise ConfigError(
                f"{result.missing} of {result.target_rows} rows would be deleted: more than "
                f"{SAFETY_SHARE:.0%}. Check the credentials' scope, then run with --force",
                key="sync.on_deleted",
            )
        if action == "flag":
            result.acted = target.flag(gone, column=FLAG_COLUMN)
        else:
            result.acted = target.delete(gone)
        return result
    finally:
        source.close()
        target.close()
        result.duration_s = time.monotonic() - started
