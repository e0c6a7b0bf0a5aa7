"""Connections to the real PostgreSQL and MariaDB servers the integration tests use.

A server that cannot be reached skips its tests with a hint on how to point them at
one, except under CI=true, where it fails them: CI must never pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa

PG_URL_ENV = "CUSTSYNC_TEST_PG_URL"
MYSQL_URL_ENV = "CUSTSYNC_TEST_MYSQL_URL"
PG_URL_DEFAULT = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MYSQL_URL_DEFAULT = "mysql+pymysql://root@127.0.0.1:3306/test"
CONNECT_TIMEOUT_S = 3

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The folder sets the marker: everything here talks to real services.
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


def _checked_url(env_var: str, default: str, what: str) -> str:
    url = os.environ.get(env_var, default)
    engine = sa.create_engine(url, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "no server here"
        shown = engine.url.render_as_string(hide_password=True)
        message = (
            f"{what} is not reachable at {shown} ({type(exc).__name__}); "
            f"set {env_var} to the SQLAlchemy URL of a {what} server to run these tests"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    finally:
        engine.dispose()
    return url


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The URL of a reachable PostgreSQL server (env CUSTSYNC_TEST_PG_URL)."""
    return _checked_url(PG_URL_ENV, PG_URL_DEFAULT, "PostgreSQL")


@pytest.fixture(scope="session")
def mysql_url() -> str:
    """The URL of a reachable MariaDB/MySQL server (env CUSTSYNC_TEST_MYSQL_URL)."""
    return _checked_url(MYSQL_URL_ENV, MYSQL_URL_DEFAULT, "MariaDB/MySQL")
