"""Finding sources and targets by name: built-ins, entry points, declarative profiles.

A connector is a settings model (pydantic, ``extra="forbid"``) and a factory taking the
validated settings and the job's folder. Built-ins are imported lazily, so a missing
optional driver only matters to the job that uses it. Third parties register through the
entry point groups ``custsync.sources`` and ``custsync.targets``; a profile in
``connectors/`` (TOML) names a driver and its defaults, so a system of a known shape needs
no code.
"""

from __future__ import annotations

import importlib
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from custsync import presets
from custsync.errors import ConfigError

Kind = Literal["source", "target"]
Factory = Callable[..., Any]


@dataclass(frozen=True)
class Connector:
    """A source or target that a job can name in ``connector = "..."``.

    ``settings`` validates its table of the job file; ``factory(settings, base_dir=...)``
    builds it. Third-party packages expose one of these from an entry point.
    """

    name: str
    kind: Kind
    settings: type[BaseModel]
    factory: Factory
    description: str = ""
    origin: str = "built-in"
    defaults: dict[str, Any] = field(default_factory=dict)


def _file_source() -> Connector:
    from custsync.sources.file import FileSource, FileSourceSettings

    return Connector(
        "file",
        "source",
        FileSourceSettings,
        FileSource,
        "Commerce Layer exports and legacy CRM files: JSON, JSON Lines, CSV, Parquet (.gz, globs)",
    )


def _sql_target() -> Connector:
    from custsync.targets._sqlrows import SqlTargetFactory, SqlTargetSettings

    return Connector(
        "sql",
        "target",
        SqlTargetSettings,
        SqlTargetFactory(),
        "Any SQLAlchemy database: native upserts on SQLite, PostgreSQL, MariaDB/MySQL",
    )


def _commercelayer_source() -> Connector:
    from custsync.commercelayer.source import CommerceLayerSettings, CommerceLayerSource

    return Connector(
        "commercelayer",
        "source",
        CommerceLayerSettings,
        CommerceLayerSource,
        "The Commerce Layer API: incremental by updated_at, throttled, resumable",
    )


def _commercelayer_target() -> Connector:
    from custsync.commercelayer.target import CommerceLayerTarget, CommerceLayerTargetSettings

    return Connector(
        "commercelayer",
        "target",
        CommerceLayerTargetSettings,
        CommerceLayerTarget,
        "Commerce Layer itself (migrations into it): upsert by email or reference",
    )


_BUILTINS: dict[tuple[Kind, str], Callable[[], Connector]] = {
    ("target", "commercelayer"): _commercelayer_target,
    ("source", "file"): _file_source,
    ("source", "commercelayer"): _commercelayer_source,
    ("target", "sql"): _sql_target,
}
_GROUPS: dict[Kind, str] = {"source": "custsync.sources", "target": "custsync.targets"}
# Connectors registered at run time (a notebook, a test, a program embedding custsync).
_REGISTERED: dict[tuple[Kind, str], Connector] = {}


def register(connector: Connector) -> None:
    """Make a connector available by name in this process, ahead of entry points and
    profiles (built-in names cannot be replaced)."""
    if (connector.kind, connector.name) in _BUILTINS:
        raise ConfigError(f"{connector.name!r} is a built-in {connector.kind} connector")
    _REGISTERED[(connector.kind, connector.name)] = connector


def unregister(kind: Kind, name: str) -> None:
    _REGISTERED.pop((kind, name), None)


def _from_entry_point(kind: Kind, name: str) -> Connector | None:
    for ep in entry_points(group=_GROUPS[kind]):
        if ep.name != name:
            continue
        try:
            loaded = ep.load()
        except ImportError as exc:
            raise ConfigError(
                f"the {kind} connector {name!r} ({ep.value}) cannot be imported: {exc}"
            ) from exc
        if callable(loaded) and not isinstance(loaded, Connector) and not isinstance(loaded, type):
            loaded = loaded()
        if not isinstance(loaded, Connector):
            raise ConfigError(
                f"entry point {ep.value} for {kind} {name!r} must give a custsync.plugins.Connector"
            )
        dist = getattr(ep, "dist", None)
        origin = f"entry point ({dist.name})" if dist is not None else "entry point"
        return Connector(
            loaded.name, kind, loaded.settings, loaded.factory, loaded.description, origin
        )
    return None


def _read_profile(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read connector profile: {exc}", source=str(path)) from exc


def _from_profile(kind: Kind, name: str) -> Connector | None:
    path = presets.connector_profiles().get(name)
    if path is None:
        return None
    profile = _read_profile(path)
    if profile.get("kind") != kind:
        return None
    driver = profile.get("driver")
    if not isinstance(driver, str) or driver == name:
        raise ConfigError("a profile needs a driver other than itself", source=str(path))
    base = find(kind, driver)
    defaults = profile.get("defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError("[defaults] must be a table", source=str(path))
    return Connector(
        name,
        kind,
        base.settings,
        base.factory,
        str(profile.get("description", base.description)),
        f"profile {path.name} (driver {driver})",
        {**base.defaults, **defaults, "connector": driver},
    )


def find(kind: Kind, name: str) -> Connector:
    """The connector ``name`` of ``kind``: built-in, then entry point, then profile."""
    builtin = _BUILTINS.get((kind, name))
    if builtin is not None:
        return builtin()
    registered = _REGISTERED.get((kind, name))
    if registered is not None:
        return registered
    found = _from_entry_point(kind, name) or _from_profile(kind, name)
    if found is None:
        known = ", ".join(sorted(c.name for c in available(kind)))
        raise ConfigError(f"no {kind} connector {name!r} (installed: {known})", key="connector")
    return found


def available(kind: Kind | None = None) -> list[Connector]:
    """Every connector installed, for ``custsync connectors``."""
    out: list[Connector] = []
    kinds: tuple[Kind, ...] = (kind,) if kind else ("source", "target")
    for k in kinds:
        names = {n for (kk, n) in _BUILTINS if kk == k} | {n for (kk, n) in _REGISTERED if kk == k}
        names |= {ep.name for ep in entry_points(group=_GROUPS[k])}
        names |= {
            n for n, p in presets.connector_profiles().items() if _read_profile(p).get("kind") == k
        }
        for name in sorted(names):
            try:
                out.append(find(k, name))
            except ConfigError as exc:
                out.append(Connector(name, k, BaseModel, _broken, f"unavailable: {exc}", "?"))
    return out


def _broken(*args: Any, **kwargs: Any) -> Any:
    raise ConfigError("this connector is unavailable")


def optional_import(module: str, *, what: str, extra: str) -> Any:
    """Import an optional dependency, or say which extra installs it."""
    from custsync.errors import MissingDependencyError

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(what, extra) from exc
