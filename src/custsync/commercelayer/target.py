"""The ``commercelayer`` target (migrations into Commerce Layer): being built."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from custsync.commercelayer.source import ConnectionSettings
from custsync.errors import ConfigError
from custsync.targets.base import TargetSettings


class CommerceLayerTargetSettings(TargetSettings, ConnectionSettings):
    connector: Literal["commercelayer"] = "commercelayer"
    match_by: Literal["email", "reference"] = "email"


class CommerceLayerTarget:
    def __init__(self, settings: CommerceLayerTargetSettings, *, base_dir: Path | None = None):
        raise ConfigError("the commercelayer target is not available yet", key="target.connector")
