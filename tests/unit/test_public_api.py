"""The public names users import from ``custsync``: changing this list is a decision."""

from __future__ import annotations

import custsync

PUBLIC = {
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
}


def test_the_public_names_are_exactly_these() -> None:
    assert set(custsync.__all__) == PUBLIC


def test_every_public_name_is_importable() -> None:
    for name in custsync.__all__:
        assert getattr(custsync, name) is not None, name


def test_the_testing_module_imports_without_pytest_fixtures_running() -> None:
    import custsync.testing as testing

    assert {"MemorySource", "MemoryTarget", "TargetContract"} <= set(testing.__all__)
