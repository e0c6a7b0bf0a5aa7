"""Third-party connectors are found through the ``custsync.targets`` entry point group,
and a connector profile in ``connectors/`` needs no code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from textwrap import dedent

PLUGIN = '''
import json
from pathlib import Path
from pydantic import BaseModel, ConfigDict
from custsync.plugins import Connector
from custsync.targets.base import Outcome, RowResult, TargetSettings


class JsonDirSettings(TargetSettings):
    folder: str


class JsonDirTarget:
    """One JSON file per key: a toy third-party target."""

    def __init__(self, settings, *, base_dir):
        self.folder = Path(base_dir) / settings.folder
        self.schema = None

    def prepare(self, schema, *, create=True):
        self.schema = schema
        if create:
            self.folder.mkdir(parents=True, exist_ok=True)
        return []

    def write(self, rows):
        results = []
        for row in rows:
            key = self.schema.key_of(row)
            path = self.folder / (str(key[0]) + ".json")
            outcome = Outcome.UPDATED if path.exists() else Outcome.INSERTED
            path.write_text(json.dumps(row, default=str))
            results.append(RowResult(key, outcome))
        return results

    def close(self):
        pass


def connector():
    return Connector("jsondir", "target", JsonDirSettings, JsonDirTarget, "one JSON file per key")
'''


def install_plugin(site: Path) -> None:
    (site / "jsondir_plugin.py").write_text(PLUGIN)
    info = site / "jsondir_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jsondir-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[custsync.targets]\njsondir = jsondir_plugin:connector\n"
    )


def custsync(*args: str, cwd: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, "-m", "custsync.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_an_entry_point_target_is_listed_and_runs(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site)
    doc = {
        "data": [
            {"id": "c1", "type": "customers", "attributes": {"email": "a@example.com"}},
            {"id": "c2", "type": "customers", "attributes": {"email": "b@example.com"}},
        ]
    }
    (tmp_path / "in.jsonl").write_text(json.dumps(doc) + "\n")
    (tmp_path / "job.toml").write_text(
        dedent(
            """
            [source]
            connector = "file"
            path = "in.jsonl"
            [target]
            connector = "jsondir"
            folder = "out"
            key = "id"
            """
        )
    )

    listed = custsync("connectors", cwd=tmp_path, site=site)
    run = custsync("sync", "job.toml", "--json", cwd=tmp_path, site=site)

    assert "jsondir" in listed.stdout
    assert "entry point (jsondir-plugin)" in listed.stdout
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1])["inserted"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c1.json", "c2.json"]


def test_an_unknown_connector_setting_of_a_plugin_is_a_config_error(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install_plugin(site)
    (tmp_path / "job.toml").write_text(
        dedent(
            """
            [source]
            connector = "file"
            path = "in.jsonl"
            [target]
            connector = "jsondir"
            fodler = "out"
            key = "id"
            """
        )
    )

    run = custsync("sync", "job.toml", cwd=tmp_path, site=site)

    assert run.returncode == 2
    assert "target.fodler" in run.stderr


def test_a_source_profile_brings_its_defaults(tmp_path: Path) -> None:
    (tmp_path / "export.json").write_text(
        json.dumps([{"id": "c1", "email": "a@example.com", "updated_at": "2026-01-01T00:00:00Z"}])
    )
    (tmp_path / "job.toml").write_text(
        dedent(
            """
            [source]
            connector = "commercelayer_export"
            path = "export.json"
            [target]
            connector = "sql"
            url = "sqlite:///out.db"
            key = "id"
            """
        )
    )

    run = custsync("sync", "job.toml", "--json", cwd=tmp_path, site=tmp_path)

    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[-1])["inserted"] == 1
