"""The job file and the environment, turned into one frozen, typed ``JobConfig``.

Everything a user can get wrong in a job file is found here, before anything is read or
written: unknown or missing keys, unset environment variables, a connector that does not
exist, a mapping path that is not a Customer's, a key the mapping does not produce. Each
error names the file and the key (exit 2).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from custsync import plugins
from custsync.errors import ConfigError
from custsync.mapping import CompiledMapping, MappingFile, compile_mapping, load_mapping_file
from custsync.sources.base import SourceSettings
from custsync.targets.base import ColumnSpec, RowSchema, TargetSettings

_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
KEY_LENGTH = 255


def parse_duration(text: str | int | float) -> timedelta:
    """``"5m"``, ``"1h30m"``, ``"90s"``, ``"2d"`` or a number of seconds."""
    if isinstance(text, int | float):
        return timedelta(seconds=text)
    stripped = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", stripped):
        return timedelta(seconds=float(stripped))
    parts = _DURATION.findall(stripped)
    if not parts or _DURATION.sub("", stripped).strip():
        raise ValueError(f"{text!r} is not a duration (like 5m, 1h30m, 90s)")
    return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))


class SyncSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["incremental", "full"] = "incremental"
    compare: Literal["updated_at", "content"] = "updated_at"
    lookback: timedelta = timedelta(minutes=5)
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    # Read, validate and map in a second process while this one writes (file sources,
    # Linux, 2+ cores); false keeps a run in one process.
    parallel: bool = True
    # Commit a target that can hold a transaction across batches (SQL) at most this
    # often, not every batch: a commit is a flush to disk. A crash re-does what was not
    # committed (the checkpoint follows the commit); 0 commits every batch.
    commit_interval: timedelta = timedelta(seconds=5)
    max_rejects: float = Field(default=0.01, ge=0)
    duplicates: Literal["keep_latest", "keep_first", "merge", "reject"] = "keep_latest"
    on_deleted: Literal["report", "flag", "delete"] = "report"

    @field_validator("lookback", "commit_interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str | int | float):
            value = parse_duration(value)
        if isinstance(value, timedelta) and value < timedelta(0):
            raise ValueError("a duration cannot be negative")
        return value

    def rejects_exceeded(self, rejected: int, read: int) -> bool:
        """``max_rejects`` below 1 is a fraction of the records read, else a count."""
        if self.max_rejects < 1:
            return rejected > self.max_rejects * read
        return rejected > self.max_rejects


class MappingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str | None = None
    fields: dict[str, Any] = Field(default_factory=dict)


class WritebackSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    field: str
    origin: str | None = None


class RejectsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = None


class StateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = None


class JobConfig(BaseModel):
    """A whole job, validated. ``source`` and ``target`` are the connectors' own settings
    models; ``mapping`` and ``inbound`` are compiled; paths and sqlite URLs are absolute."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    source: SourceSettings
    target: TargetSettings
    mapping: CompiledMapping
    inbound: CompiledMapping | None
    sync: SyncSettings
    writeback: WritebackSettings | None
    rejects_path: Path
    state_url: str
    base_dir: Path
    job_file: Path | None = None

    @property
    def schema_(self) -> RowSchema:
        return row_schema(self.mapping, self.target)


def row_schema(mapping: CompiledMapping, target: TargetSettings) -> RowSchema:
    key = target.key_columns or mapping.key
    # Key columns are text (VARCHAR) whatever the mapping gives: the engine writes keys as
    # strings, so a key is found again whatever its source type was.
    columns = tuple(
        ColumnSpec(
            name,
            "text" if name in key else kind,
            nullable=name not in key,
            length=KEY_LENGTH if name in key else None,
        )
        for name, kind in mapping.column_types().items()
    )
    return RowSchema(
        columns=columns, key=key, guard=mapping.guard, match_policy=target.match_policy
    )


# --- loading ---------------------------------------------------------------------------

_TOP_KEYS = ("name", "source", "target", "mapping", "sync", "writeback", "rejects", "state")


def load_job_file(path: str | Path, *, env: Mapping[str, str] | None = None) -> JobConfig:
    """Read and validate a job file; every problem is a ConfigError naming file and key."""
    job_file = Path(path).expanduser().resolve()
    where = str(path)
    try:
        data = tomllib.loads(job_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("no such job file", source=where) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the job file: {exc.strerror}", source=where) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=where) from exc
    data = _interpolate(data, os.environ if env is None else env, source=where, path="")
    return build_job(
        data, base_dir=job_file.parent, default_name=job_file.stem, source=where, job_file=job_file
    )


def build_job(
    data: Mapping[str, Any],
    *,
    base_dir: Path,
    default_name: str = "job",
    source: str = "<dict>",
    job_file: Path | None = None,
) -> JobConfig:
    """Validate the job file's structure (``Job.from_dict`` takes the same)."""
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise ConfigError(
            f"unknown key (known: {', '.join(_TOP_KEYS)})", source=source, key=unknown[0]
        )
    for required in ("source", "target"):
        if not isinstance(data.get(required), dict):
            raise ConfigError(f"a job needs a [{required}] table", source=source, key=required)
    name = data.get("name", default_name)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}", name):
        raise ConfigError(
            "a job name is letters, digits, '.', '_' or '-' (at most 100)",
            source=source,
            key="name",
        )

    source_settings = _connector_settings("source", data["source"], base_dir, source)
    target_settings = _connector_settings("target", data["target"], base_dir, source)
    sync = _section(SyncSettings, data.get("sync", {}), "sync", source)
    mapping_settings = _section(MappingSettings, data.get("mapping", {}), "mapping", source)
    writeback = (
        _section(WritebackSettings, data["writeback"], "writeback", source)
        if "writeback" in data
        else None
    )
    rejects = _section(RejectsSettings, data.get("rejects", {}), "rejects", source)
    state = _section(StateSettings, data.get("state", {}), "state", source)

    assert isinstance(source_settings, SourceSettings)
    assert isinstance(target_settings, TargetSettings)
    if writeback is not None and source_settings.connector != "commercelayer":
        raise ConfigError(
            "writeback writes the target's ids back into Commerce Layer: it needs "
            'connector = "commercelayer" as the source',
            source=source,
            key="writeback",
        )

    mapping = _outbound_mapping(mapping_settings, base_dir, source)
    inbound = _inbound_mapping(source_settings, base_dir, source)

    key = target_settings.key_columns or mapping.key
    if not key:
        raise ConfigError(
            "name the column(s) rows are upserted on (the mapping preset names none)",
            source=source,
            key="target.key",
        )
    missing = [k for k in key if k not in mapping.field_names]
    if missing:
        raise ConfigError(
            f"the key column {missing[0]!r} is not a field of the mapping "
            f"(fields: {', '.join(mapping.field_names)})",
            source=source,
            key="target.key",
        )

    rejects_path = (
        _resolve_path(rejects.path, base_dir)
        if rejects.path
        else (base_dir / ".custsync" / "rejects" / f"{name}.jsonl")
    )
    state_url = (
        resolve_url(state.url, base_dir)
        if state.url
        else f"sqlite:///{base_dir / '.custsync' / 'state.db'}"
    )
    return JobConfig(
        name=name,
        source=source_settings,
        target=target_settings,
        mapping=mapping,
        inbound=inbound,
        sync=sync,
        writeback=writeback,
        rejects_path=rejects_path,
        state_url=state_url,
        base_dir=base_dir,
        job_file=job_file,
    )


def _outbound_mapping(settings: MappingSettings, base_dir: Path, source: str) -> CompiledMapping:
    preset: MappingFile | None = None
    if settings.preset:
        preset = load_mapping_file(
            settings.preset, base_dir=base_dir, source=source, key="mapping.preset"
        )
    elif not settings.fields:
        preset = load_mapping_file("flat_customer")
    if preset is not None:
        return preset.compile(direction="outbound", extra=settings.fields, source=source)
    return compile_mapping(
        settings.fields, direction="outbound", source=source, section="mapping.fields"
    )


def _connector_settings(
    kind: plugins.Kind, table: Mapping[str, Any], base_dir: Path, source: str
) -> Any:
    name = table.get("connector")
    if not isinstance(name, str):
        raise ConfigError("name the connector", source=source, key=f"{kind}.connector")
    try:
        connector = plugins.find(kind, name)
    except ConfigError as exc:
        raise ConfigError(str(exc), source=source, key=f"{kind}.connector") from None
    values = {**connector.defaults, **table, "connector": connector.defaults.get("connector", name)}
    if kind == "target" and isinstance(values.get("url"), str):
        values["url"] = resolve_url(values["url"], base_dir)
    return _section(connector.settings, values, kind, source)


def _section(model: type[BaseModel], values: Any, section: str, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError("must be a table", source=source, key=section)
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        # A misspelt key also makes the real one "missing": name the misspelling first.
        errors.sort(key=lambda e: e["type"] != "extra_forbidden")
        first = errors[0]
        loc = ".".join(str(p) for p in first["loc"])
        key = f"{section}.{loc}" if loc else section
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            known = [name for name in model.model_fields if name not in values]
            close = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
            message = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
        elif first["type"] == "missing":
            message = "required key is missing"
        raise ConfigError(message, source=source, key=key) from None


def _resolve_path(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def resolve_url(url: str, base_dir: Path) -> str:
    """A relative ``sqlite:///file.db`` resolves against the job file's folder."""
    prefix, sep, rest = url.partition(":///")
    if sep and prefix.startswith("sqlite") and rest and not rest.startswith(("/", ":memory:")):
        path, q, query = rest.partition("?")
        return f"{prefix}:///{(base_dir / path).resolve()}{q}{query}"
    return url


def _interpolate(value: Any, env: Mapping[str, str], *, source: str, path: str) -> Any:
    """``${VAR}`` and ``${VAR:-default}`` read the environment (job files only)."""
    if isinstance(value, str):

        def one(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"environment variable {name} is not set", source=source, key=path or None
            )

        return _ENV_VAR.sub(one, value)
    if isinstance(value, dict):
        return {
            k: _interpolate(v, env, source=source, path=f"{path}.{k}" if path else k)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            _interpolate(v, env, source=source, path=f"{path}[{i}]") for i, v in enumerate(value)
        ]
    return value


def build_source(
    data: Mapping[str, Any], *, base_dir: Path, source: str = "<dict>"
) -> tuple[SourceSettings, CompiledMapping | None]:
    """A ``[source]`` table alone (for ``read_customers``): its settings and inbound mapping."""
    settings = _connector_settings("source", data, base_dir, source)
    assert isinstance(settings, SourceSettings)
    return settings, _inbound_mapping(settings, base_dir, source)


def _inbound_mapping(
    settings: SourceSettings, base_dir: Path, source: str
) -> CompiledMapping | None:
    if not settings.mapping:
        if settings.date_order or settings.timezone:
            raise ConfigError(
                "date_order and timezone apply to an inbound mapping: set source.mapping",
                source=source,
                key="source.date_order" if settings.date_order else "source.timezone",
            )
        return None
    mapping_file = load_mapping_file(
        settings.mapping, base_dir=base_dir, source=source, key="source.mapping"
    )
    return mapping_file.compile(
        direction="inbound",
        source=source,
        overrides={"date_order": settings.date_order, "timezone": settings.timezone},
    )
