"""The wheel ships the mapping presets and connector profiles, so they resolve after a
plain ``pip install .``, not only in a checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [built] = out.glob("custsync-*.whl")
    return built


def test_the_wheel_holds_presets_profiles_and_py_typed(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())

    assert "custsync/_data/mappings/erp_customer.toml" in names
    assert "custsync/_data/mappings/flat_customer.toml" in names
    assert "custsync/_data/connectors/shopify_csv.toml" in names
    assert "custsync/py.typed" in names


def test_presets_resolve_from_an_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import custsync, custsync.presets as p;"
        "assert custsync.__file__.startswith(sys.argv[1]), custsync.__file__;"
        "print(sorted(p.mapping_names())); print(sorted(p.connector_profiles()));"
        "print(p.data_dirs('mappings'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(target)], check=True, capture_output=True, text=True
    ).stdout

    assert "'erp_customer'" in out
    assert "'shopify_csv'" in out
    assert str(ROOT / "mappings") not in out  # found inside the package, not the checkout
