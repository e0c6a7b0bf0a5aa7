"""custsync: keep Commerce Layer customers in sync with ERPs, CRMs, warehouses and
legacy CRMs.

    import custsync
    result = custsync.Job.from_file("job.toml").run()
    df = custsync.read_customers({"connector": "file", "path": "export.json"})
"""

from custsync._version import __version__
from custsync.engine import Job, RunResult
from custsync.errors import (
    ConfigError,
    CustsyncError,
    FatalError,
    LockedError,
    MissingDependencyError,
    RecordError,
    RetriableError,
)
from custsync.model import Customer
from custsync.reading import iter_customers, read_customers
from custsync.sources.base import Source
from custsync.targets.base import Outcome, RowResult, RowSchema, Target

__all__ = [
    "ConfigError",
    "Customer",
    "CustsyncError",
    "FatalError",
    "Job",
    "LockedError",
    "MissingDependencyError",
    "Outcome",
    "RecordError",
    "RetriableError",
    "RowResult",
    "RowSchema",
    "RunResult",
    "Source",
    "Target",
    "__version__",
    "iter_customers",
    "read_customers",
]
