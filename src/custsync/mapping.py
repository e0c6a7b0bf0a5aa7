"""Mappings: data, not code. A mapping file turns one record into another: a ``Customer``
into a target row (outbound), or a legacy export row into a Customer-shaped dict (inbound).

Each field compiles once into a small function; applying a mapping to a batch is then a
loop of plain calls. The grammar and the evaluation order are DESIGN.md's: resolve the
path(s), then ``transform``, then ``map``, then ``default``; ``type`` fixes the column type.
"""

from __future__ import annotations

import operator
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, tzinfo
from pathlib import Path
from typing import Any, Literal, cast, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from pydantic import BaseModel, SecretStr

from custsync import presets
from custsync.errors import ConfigError, FieldError
from custsync.model import RELATIONSHIPS, SECRET_KEYS, TO_MANY, Customer
from custsync.targets.base import FieldType

FIELD_TYPES: tuple[str, ...] = get_args(FieldType)
Direction = Literal["outbound", "inbound"]
DateOrder = Literal["DMY", "MDY", "YMD"]
Getter = Callable[[Any], Any]
_MISSING: Any = object()


class _Fail(Exception):
    """A field could not be produced for one record (caught per record, never escapes)."""


# --- transforms ------------------------------------------------------------------------

_SPACES = re.compile(r"\s+")


def _str_only(fn: Callable[[str], Any]) -> Callable[[Any], Any]:
    def apply(value: Any) -> Any:
        return fn(value) if isinstance(value, str) else value

    return apply


TRANSFORMS: dict[str, Callable[[Any], Any]] = {
    "lower": _str_only(str.lower),
    "upper": _str_only(str.upper),
    "strip": _str_only(str.strip),
    "title": _str_only(str.title),
    "collapse_whitespace": _str_only(lambda s: _SPACES.sub(" ", s).strip()),
    # Shopify exports prefix ids and phone numbers with ' so spreadsheets keep them as text.
    "strip_apostrophe": _str_only(lambda s: s[1:] if s.startswith("'") else s),
    "digits": _str_only(lambda s: "".join(ch for ch in s if ch.isdigit())),
    # WooCommerce guests have customer_id 0: make it empty (then `default` applies).
    "empty_if_zero": lambda v: None if v in (0, "0", 0.0) else v,
}
TRANSFORMS["collapse"] = TRANSFORMS["collapse_whitespace"]


def is_empty(value: Any) -> bool:
    return value is None or value == ""


# --- type coercion ---------------------------------------------------------------------

_TRUE = frozenset({"true", "t", "yes", "y", "1", "on"})
_FALSE = frozenset({"false", "f", "no", "n", "0", "off"})


def _to_jsonable(value: Any) -> Any:
    """A JSON value for a target row; secret-named keys at any depth are left out (a legacy
    export's metadata may carry a password hash)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, dict):
        return {
            k: _to_jsonable(v)
            for k, v in value.items()
            if not (isinstance(k, str) and k.lower() in SECRET_KEYS)
        }
    if isinstance(value, list | tuple):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return format_timestamp(value)
    if isinstance(value, SecretStr):
        raise _Fail("is a secret and is never written out")
    return value


def format_timestamp(value: datetime) -> str:
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _coerce_text(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, datetime):
        return format_timestamp(value)
    return orjson.dumps(_to_jsonable(value)).decode()


def _coerce_integer(value: Any) -> Any:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip().replace(",", ""))
        except ValueError:
            pass
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if number.is_integer():
            return int(number)
    raise _Fail("is not an integer")


def _coerce_float(value: Any) -> Any:
    if value is None or (isinstance(value, float | int) and not isinstance(value, bool)):
        return None if value is None else float(value)
    if isinstance(value, str):
        try:
            return float(value.strip().replace(",", ""))
        except ValueError:
            pass
    raise _Fail("is not a number")


def _coerce_boolean(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _Fail("is not a boolean (true/false, yes/no, 1/0)")


_SECRET_KEY_BYTES = re.compile(
    rb'"(?:' + b"|".join(k.encode() for k in sorted(SECRET_KEYS)) + rb')"\s*:', re.IGNORECASE
)


# orjson refuses (TypeError) anything but plain JSON types under these options: what it
# accepts needs no conversion, so the value itself is the row's value.
_PLAIN_JSON = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _plain_json(value: Any) -> bytes | None:
    """The JSON text of a dict or list holding plain JSON types only and no secret-named
    key, else None. The common case in C: orjson checks the types as it writes, and a
    scan of the bytes says whether a secret-named key needs the slow, filtering walk."""
    try:
        blob = orjson.dumps(value, option=_PLAIN_JSON)
    except TypeError:
        return None
    # ``find``, not ``in``: bytes' ``in`` first tries its argument as an integer and
    # builds a TypeError for each word (a third of a microsecond per record in all).
    low = blob.lower()
    if (
        low.find(b"token") >= 0 or low.find(b"secret") >= 0 or low.find(b"password") >= 0
    ) and _SECRET_KEY_BYTES.search(blob):
        # Every secret name holds one of those words: the pattern runs only when one is in.
        return None
    return blob


def _coerce_json(value: Any) -> Any:
    if not isinstance(value, dict | list):
        return _to_jsonable(value)
    return value if _plain_json(value) is not None else _to_jsonable(value)


def json_text(value: Any) -> str:
    """A JSON value as the text a JSON column stores (keys that are not text as text)."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _coerced_json_text(value: Any) -> Any:
    """``json_text(_coerce_json(value))``, a plain value dumped once (the check's dump is
    the text: what orjson accepts under ``_PLAIN_JSON`` it writes as ``json_text`` does)."""
    if value.__class__ is dict or value.__class__ is list:
        blob = _plain_json(value)
        if blob is not None:
            return blob.decode()
    coerced = _coerce_json(value)
    return None if coerced is None else json_text(coerced)


@dataclass(frozen=True, slots=True)
class DateParser:
    """Reads timestamps as exports write them: ISO 8601, or day- or month-first dates,
    which are ambiguous and so need ``date_order`` (never a guess). Dates without a zone
    are in ``zone``."""

    order: DateOrder | None = None
    zone: tzinfo = UTC

    _SLASHED = re.compile(
        r"^\s*(\d{1,4})[/.\-](\d{1,2})[/.\-](\d{1,4})"
        r"(?:[ T,]+(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?\s*([AaPp][Mm])?)?\s*$"
    )

    def __call__(self, value: Any) -> datetime | None:
        if value is None or isinstance(value, datetime):
            return self._zone(value) if value is not None else None
        if isinstance(value, date):
            return datetime(value.year, value.month, value.day, tzinfo=self.zone).astimezone(UTC)
        if not isinstance(value, str):
            raise _Fail("is not a timestamp")
        text = value.strip()
        if not text:
            return None
        iso = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
        try:
            return self._zone(datetime.fromisoformat(iso))
        except ValueError:
            pass
        match = self._SLASHED.match(text)
        if match is None:
            raise _Fail(f"is not a timestamp this mapping can read ({self._hint()})")
        a, b, c, hh, mm, ss, frac, ampm = match.groups()
        if len(a) == 4:
            year, month, day = int(a), int(b), int(c)
        elif self.order is None:
            raise _Fail("is a day/month date: set date_order = 'DMY' or 'MDY' in the mapping")
        elif self.order == "DMY":
            day, month, year = int(a), int(b), int(c)
        elif self.order == "MDY":
            month, day, year = int(a), int(b), int(c)
        else:
            raise _Fail("does not match date_order = 'YMD'")
        if year < 100:
            year += 2000 if year < 70 else 1900
        hour = int(hh or 0)
        if ampm:
            hour = hour % 12 + (12 if ampm.lower() == "pm" else 0)
        try:
            parsed = datetime(
                year,
                month,
                day,
                hour,
                int(mm or 0),
                int(ss or 0),
                int((frac or "0").ljust(6, "0")),
            )
        except ValueError as exc:
            raise _Fail(f"is not a valid date ({exc})") from None
        return self._zone(parsed)

    def _zone(self, value: datetime) -> datetime:
        if value.tzinfo is None:
            value = value.replace(tzinfo=self.zone)
        return value.astimezone(UTC)

    def _hint(self) -> str:
        return "ISO 8601, or dd/mm/yy with date_order"


_COERCE: dict[str, Callable[[Any], Any]] = {
    "text": _coerce_text,
    "integer": _coerce_integer,
    "float": _coerce_float,
    "boolean": _coerce_boolean,
    "json": _coerce_json,
}


# --- paths -----------------------------------------------------------------------------


def _step(value: Any, segment: str) -> Any:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get(segment)
    if isinstance(value, BaseModel):
        found = getattr(value, segment, _MISSING)
        if found is _MISSING:
            extra = value.model_extra or {}
            return extra.get(segment)
        return found
    if isinstance(value, list | tuple) and segment.lstrip("-").isdigit():
        index = int(segment)
        return value[index] if -len(value) <= index < len(value) else None
    return None


def _compile_path(path: str) -> Getter:
    segments = tuple(path.split("."))
    if len(segments) == 1:
        name = segments[0]
        return lambda record: _step(record, name)
    if len(segments) == 2:
        first, second = segments
        return lambda record: _step(_step(record, first), second)

    def get(record: Any) -> Any:
        value = record
        for segment in segments:
            value = _step(value, segment)
            if value is None:
                return None
        return value

    return get


def _customer_field_type(path: str) -> FieldType | None:
    """The column type a Customer path implies; None when the path is not a Customer's."""
    root, _, rest = path.partition(".")
    if root == "metadata":
        return "json" if not rest else "text"
    if root in ("links", "meta"):
        if rest in ("self", "mode"):
            return "text"
        return "json" if not rest else None
    if root in RELATIONSHIPS:
        if not rest:
            return "json"
        return "text"
    if root == "anonymization_info":
        return "json" if not rest else "text"
    if rest or root not in Customer.model_fields:
        return None
    annotation = str(Customer.model_fields[root].annotation)
    if "datetime" in annotation.lower():
        return "timestamp"
    if "bool" in annotation:
        return "boolean"
    if "int" in annotation:
        return "integer"
    return "text"


def _check_customer_path(path: str, *, where: str, source: str | None) -> FieldType:
    if not path or any(not part for part in path.split(".")):
        raise ConfigError(f"{path!r} is not a valid path", source=source, key=where)
    root = path.split(".", 1)[0]
    secret = next((part for part in path.split(".") if part.lower() in SECRET_KEYS), None)
    if secret is not None:
        raise ConfigError(
            f"{secret} is a secret: it is never copied into a target row", source=source, key=where
        )
    if root in TO_MANY and "." in path and not path.split(".")[1].lstrip("-").isdigit():
        raise ConfigError(
            f"{root} is a list: address an item by its index ({root}.0.id)",
            source=source,
            key=where,
        )
    kind = _customer_field_type(path)
    if kind is None:
        known = ", ".join(sorted(f for f in Customer.model_fields if f != "password"))
        raise ConfigError(
            f"{path!r} is not a Customer field or relationship (known: {known}; "
            "metadata.* is free)",
            source=source,
            key=where,
        )
    return kind


# --- field specs -----------------------------------------------------------------------

_TEMPLATE_FIELD = re.compile(r"\{([^{}]+)\}")
_SPEC_KEYS = frozenset(
    {"path", "paths", "const", "template", "transform", "map", "strict_map", "default", "type"}
)


@dataclass(frozen=True, slots=True)
class CompiledField:
    """One target field: how to compute it from a record, and its column type."""

    name: str
    type: FieldType
    compute: Callable[[Any], Any]
    paths: tuple[str, ...]  # the source paths it reads (for sparse reads, for `check`)
    is_guard_candidate: bool  # a plain `updated_at` path: the never-go-backwards guard
    # For a field that is only path(s) and a default: (default, coerce), so the mapping
    # can inline it into generated code. None for anything else.
    plain: tuple[Any, Callable[[Any], Any]] | None = None


def _compile_field(
    name: str,
    spec: Any,
    *,
    direction: Direction,
    dates: DateParser,
    source: str | None,
    where: str,
) -> CompiledField:
    if isinstance(spec, str):
        spec = {"path": spec}
    elif isinstance(spec, list):
        spec = {"paths": spec}
    if not isinstance(spec, dict):
        raise ConfigError(
            "a field is a path, a list of paths, or a table", source=source, key=where
        )
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} (known: {sorted(_SPEC_KEYS)})",
            source=source,
            key=where,
        )
    kinds = [k for k in ("path", "paths", "const", "template") if k in spec]
    if len(kinds) != 1:
        raise ConfigError(
            "a field needs exactly one of path, paths, const or template", source=source, key=where
        )

    inferred: FieldType = "text"
    paths: tuple[str, ...] = ()
    resolve: Callable[[Any], Any]
    if "const" in spec:
        constant = spec["const"]
        inferred = _type_of_value(constant)
        resolve = lambda record: constant  # noqa: E731 - a closure over one constant
    elif "template" in spec:
        template = spec["template"]
        if not isinstance(template, str):
            raise ConfigError("template must be a string", source=source, key=where)
        names = _TEMPLATE_FIELD.findall(template)
        if not names:
            raise ConfigError("template names no {path}", source=source, key=where)
        paths = tuple(n.strip() for n in names)
        getters = {p: _source_getter(p, direction, source, where) for p in paths}
        resolve = _template(template, getters)
    else:
        raw_paths = spec.get("paths", spec.get("path"))
        if isinstance(raw_paths, str):
            raw_paths = [raw_paths]
        if (
            not isinstance(raw_paths, list)
            or not raw_paths
            or not all(isinstance(p, str) for p in raw_paths)
        ):
            raise ConfigError("paths must be a non-empty list of strings", source=source, key=where)
        paths = tuple(raw_paths)
        getters_list = [_source_getter(p, direction, source, where) for p in paths]
        if direction == "outbound":
            kinds_of = {_customer_field_type(p) for p in paths}
            if len(kinds_of) == 1:
                only = kinds_of.pop()
                inferred = only if only is not None else "text"
        resolve = _first_non_empty(getters_list)

    transforms = _transforms(spec.get("transform"), source=source, where=where)
    value_map = spec.get("map")
    if value_map is not None and not isinstance(value_map, dict):
        raise ConfigError("map must be a table", source=source, key=where)
    strict_map = bool(spec.get("strict_map", False))
    if strict_map and value_map is None:
        raise ConfigError("strict_map needs a map", source=source, key=where)
    default = spec.get("default")
    declared = spec.get("type")
    if declared is not None and declared not in FIELD_TYPES:
        raise ConfigError(
            f"unknown type {declared!r} (known: {', '.join(FIELD_TYPES)})", source=source, key=where
        )
    if declared is None and value_map:
        map_types = {_type_of_value(v) for v in value_map.values()}
        if len(map_types) == 1:
            inferred = map_types.pop()
    if declared is None and transforms:
        inferred = "text" if inferred in ("text", "json") else inferred
    column_type = cast(FieldType, declared or inferred)
    coerce = dates if column_type == "timestamp" else _COERCE[column_type]

    def compute(record: Any) -> Any:
        value = resolve(record)
        for transform in transforms:
            value = transform(value)
        if value_map is not None and not is_empty(value):
            lookup = value if isinstance(value, str) else _coerce_text(value)
            if lookup in value_map:
                value = value_map[lookup]
            elif strict_map:
                raise _Fail("the value is not in the field's map (strict_map)")
        if value is None or value == "":
            value = default
        return coerce(value)

    def compute_plain(record: Any) -> Any:
        # The common field (a path, nothing else): the same steps without the empty loops.
        value = resolve(record)
        if value is None or value == "":
            value = default
        return coerce(value)

    plain = None
    if not transforms and value_map is None:
        compute = compute_plain
        if paths and "template" not in spec and "const" not in spec:
            plain = (default, coerce)

    guard = paths == ("updated_at",) and "const" not in spec and "template" not in spec
    return CompiledField(name, column_type, compute, paths, guard, plain)


def _type_of_value(value: Any) -> FieldType:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, datetime | date):
        return "timestamp"
    if isinstance(value, dict | list):
        return "json"
    return "text"


def _transforms(spec: Any, *, source: str | None, where: str) -> tuple[Callable[[Any], Any], ...]:
    if spec is None:
        return ()
    names = [spec] if isinstance(spec, str) else spec
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError("transform is a name or a list of names", source=source, key=where)
    out = []
    for name in names:
        if name not in TRANSFORMS:
            raise ConfigError(
                f"unknown transform {name!r} (known: {', '.join(sorted(TRANSFORMS))})",
                source=source,
                key=where,
            )
        out.append(TRANSFORMS[name])
    return tuple(out)


def _source_getter(path: str, direction: Direction, source: str | None, where: str) -> Getter:
    if direction == "outbound":
        _check_customer_path(path, where=where, source=source)
        root, _, rest = path.partition(".")
        if not rest and root in Customer.model_fields:
            # A Customer field: the hot, simple case. The engine maps validated dicts;
            # a Customer model works too.
            attribute = operator.attrgetter(root)
            return lambda r: r.get(root) if type(r) is dict else attribute(r)
        return _compile_path(path)
    return _column_getter(path)


def _column_getter(name: str) -> Getter:
    """Inbound: a column of a legacy row, matched case- and space-insensitively (real
    exports drift: ``EMAIL``, ``Email``, `` email``); a dotted path reaches into JSON."""
    wanted = _fold(name)
    nested = _compile_path(name) if "." in name else None

    def get(row: Any) -> Any:
        if not isinstance(row, dict):
            return None
        if name in row:
            return row[name]
        for column, value in row.items():
            if isinstance(column, str) and _fold(column) == wanted:
                return value
        return nested(row) if nested is not None else None

    return get


def _fold(name: str) -> str:
    return " ".join(name.lower().split())


def _first_non_empty(getters: Sequence[Getter]) -> Getter:
    if len(getters) == 1:
        return getters[0]

    def first(record: Any) -> Any:
        for get in getters:
            value = get(record)
            if not is_empty(value):
                return value
        return None

    return first


def _template(template: str, getters: Mapping[str, Getter]) -> Getter:
    def render(record: Any) -> Any:
        def one(match: re.Match[str]) -> str:
            value = getters[match.group(1).strip()](record)
            return "" if is_empty(value) else str(_coerce_text(value))

        text = _SPACES.sub(" ", _TEMPLATE_FIELD.sub(one, template)).strip()
        return text or None

    return render


# --- mappings --------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledMapping:
    """A compiled mapping. Outbound: ``apply`` takes Customers and gives target rows.
    Inbound: it takes legacy rows and gives Customer-shaped dicts."""

    name: str
    direction: Direction
    fields: tuple[CompiledField, ...]
    description: str = ""
    key: tuple[str, ...] = ()  # the preset's suggested key column(s), if it names one
    source: str | None = None

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def guard(self) -> str | None:
        """The target field holding the source's ``updated_at``, if the mapping has one."""
        for compiled in self.fields:
            if compiled.is_guard_candidate:
                return compiled.name
        return None

    def source_paths(self) -> set[str]:
        return {p for f in self.fields for p in f.paths}

    def column_types(self) -> dict[str, FieldType]:
        return {f.name: f.type for f in self.fields}

    def __post_init__(self) -> None:
        object.__setattr__(self, "_fast", _generate(self) if self.direction == "outbound" else None)

    def encoder(
        self, names: Sequence[str], converters: Sequence[Callable[[Any], Any] | None]
    ) -> Callable[[dict[str, Any]], tuple[Any, ...]] | None:
        """A function mapping a validated record straight to a target codec's encoded row
        (``RowCodec.names`` and ``converters``), without the mapped dict between: what
        ``codec.encode(apply_one(record))`` gives, where that succeeds. It raises where
        that would, and may raise where ``apply_one`` would succeed field by field: the
        caller then takes that path, which names what failed. None for an inbound one."""
        if self.direction != "outbound":
            return None
        return _generate_encoder(self, names, converters)

    def apply_one(self, record: Any) -> dict[str, Any]:
        """Map one record; raise ``RecordFailure`` naming every field that failed."""
        fast = self._fast  # type: ignore[attr-defined]
        if fast is not None and type(record) is dict:
            try:
                return fast(record)  # type: ignore[no-any-return]
            except Exception:  # noqa: BLE001 - the field-by-field path says what failed
                pass
        return self._apply_slowly(record)

    def _apply_slowly(self, record: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        errors: list[FieldError] = []
        for compiled in self.fields:
            try:
                out[compiled.name] = compiled.compute(record)
            except _Fail as exc:
                errors.append(FieldError(compiled.name, f"{_describe(compiled)} {exc}"))
            except (ValueError, TypeError, OverflowError) as exc:
                errors.append(
                    FieldError(compiled.name, f"{_describe(compiled)}: {type(exc).__name__}")
                )
        if errors:
            raise RecordFailure(errors)
        if self.direction == "inbound":
            return _nest(out)
        return out

    def apply(self, records: Iterable[Any]) -> list[dict[str, Any] | list[FieldError]]:
        results: list[dict[str, Any] | list[FieldError]] = []
        for record in records:
            try:
                results.append(self.apply_one(record))
            except RecordFailure as failure:
                results.append(failure.errors)
        return results


def _generate(mapping: CompiledMapping) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """One Python function computing every field of an outbound mapping from a validated
    record (a dict): field-by-field closures cost a call and a loop step per field. Plain
    fields are inlined; the rest call their compiled closure. Any exception sends the
    record down the field-by-field path, which names the failing field."""
    namespace: dict[str, Any] = {"E": {}, "datetime": datetime}
    lines = ["def fast(r):", *_field_lines(mapping, namespace, frozenset())]
    values = ", ".join(f"{compiled.name!r}: v{i}" for i, compiled in enumerate(mapping.fields))
    lines.append(f"    return {{{values}}}")
    exec("\n".join(lines), namespace)
    return cast(Callable[[dict[str, Any]], dict[str, Any]], namespace["fast"])


def _generate_encoder(
    mapping: CompiledMapping,
    names: Sequence[str],
    converters: Sequence[Callable[[Any], Any] | None],
) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """``_generate``'s function, returning the row as a target's codec encodes it: the
    values of ``names`` in order, each converted as ``converters`` say. A JSON field the
    codec writes as ``json_text`` is checked and written with one dump."""
    positions = {compiled.name: i for i, compiled in enumerate(mapping.fields)}
    as_text = frozenset(
        positions[name]
        for name, convert in zip(names, converters, strict=True)
        if convert is json_text and name in positions
    )
    namespace: dict[str, Any] = {"E": {}, "datetime": datetime, "J": _coerced_json_text}
    lines = ["def encoded(r):"]
    lines += _field_lines(mapping, namespace, as_text)
    items = []
    for column, (name, convert) in enumerate(zip(names, converters, strict=True)):
        at = positions.get(name)
        if at is None:
            items.append("None")  # not mapped: the codec finds nothing in the row
        elif convert is None or at in as_text:
            items.append(f"v{at}")
        else:
            namespace[f"k{column}"] = convert
            items.append(f"(None if v{at} is None else k{column}(v{at}))")
    lines.append(f"    return ({', '.join(items)},)")
    exec("\n".join(lines), namespace)
    return cast(Callable[[dict[str, Any]], tuple[Any, ...]], namespace["encoded"])


def _field_lines(
    mapping: CompiledMapping, namespace: dict[str, Any], as_text: frozenset[int]
) -> list[str]:
    """The statements computing each field ``i`` into ``v{i}``; a field in ``as_text``
    ends as its JSON text, not as the value (a plain JSON field with one dump, ``J``)."""
    namespace["json_text"] = json_text
    lines = ["    g = r.get"]  # looked up once, called once per path
    for i, compiled in enumerate(mapping.fields):
        inlinable = compiled.plain is not None and all(
            not any(part.lstrip("-").isdigit() for part in path.split("."))
            for path in compiled.paths
        )
        if not inlinable or compiled.plain is None:
            namespace[f"f{i}"] = compiled.compute
            lines.append(f"    v{i} = f{i}(r)")
        else:
            plain, texted = _plain_field_lines(i, compiled, namespace, i in as_text)
            lines += plain
            if texted:
                continue
        if i in as_text:
            lines.append(f"    if v{i} is not None: v{i} = json_text(v{i})")
    return lines


def _plain_field_lines(
    i: int, compiled: CompiledField, namespace: dict[str, Any], as_text: bool
) -> tuple[list[str], bool]:
    """A path (or paths), a default and a coercion, inline; and whether the field ends as
    its JSON text (``as_text`` and a JSON field: checked and dumped at once)."""
    assert compiled.plain is not None
    default, coerce = compiled.plain
    namespace[f"d{i}"] = default
    namespace[f"c{i}"] = coerce
    lines = []
    for n, path in enumerate(compiled.paths):
        parts = path.split(".")
        expr = f"g({parts[0]!r})"
        for part in parts[1:]:
            expr = f"({expr} or E).get({part!r})"
        if n == 0:
            lines.append(f"    v{i} = {expr}")
        else:
            lines.append(f"    if v{i} is None or v{i} == '': v{i} = {expr}")
    if default is None:  # None stays None: only an empty text becomes it
        lines.append(f"    if v{i} == '': v{i} = None")
    else:
        lines.append(f"    if v{i} is None or v{i} == '': v{i} = d{i}")
    # Values already of the column's type skip the call (the coercions leave them as
    # they are): a validated record is mostly such values.
    already = {
        "text": f"v{i}.__class__ is str",
        "integer": f"v{i}.__class__ is int",
        "float": f"v{i}.__class__ is float",
        "boolean": f"v{i}.__class__ is bool",
        # aware, at UTC (a zero offset is falsy)
        "timestamp": f"(v{i}.__class__ is datetime and v{i}.tzinfo is not None "
        f"and not v{i}.utcoffset())",
    }.get(compiled.type)
    if already is not None:
        lines.append(f"    if v{i} is not None and not {already}: v{i} = c{i}(v{i})")
    elif coerce is _coerce_json:  # which leaves None as it is
        lines.append(f"    if v{i} is not None: v{i} = {'J' if as_text else f'c{i}'}(v{i})")
        return lines, as_text
    else:
        lines.append(f"    v{i} = c{i}(v{i})")
    return lines, False


class RecordFailure(Exception):
    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))


def _describe(compiled: CompiledField) -> str:
    if compiled.paths:
        return "value of " + " | ".join(compiled.paths)
    return "value"


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        parts = path.split(".")
        target = out
        for part in parts[:-1]:
            nxt = target.get(part)
            if not isinstance(nxt, dict):
                nxt = target[part] = {}
            target = nxt
        if value is None and (len(parts) > 1 or parts[-1] in target):
            # An empty column adds no null leaf to metadata, and never erases a value set
            # by an earlier field.
            continue
        target[parts[-1]] = value
    return out


def compile_mapping(
    fields: Mapping[str, Any],
    *,
    direction: Direction,
    name: str = "inline",
    description: str = "",
    key: Sequence[str] = (),
    date_order: str | None = None,
    timezone: str | None = None,
    source: str | None = None,
    section: str = "fields",
) -> CompiledMapping:
    """Compile mapping fields; every problem is a ConfigError naming the field."""
    if not fields:
        raise ConfigError("the mapping has no fields", source=source, key=section)
    if date_order is not None and date_order not in get_args(DateOrder):
        raise ConfigError(
            f"date_order must be DMY, MDY or YMD, not {date_order!r}",
            source=source,
            key="date_order",
        )
    zone: tzinfo = UTC
    if timezone is not None:
        try:
            zone = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"unknown time zone {timezone!r}", source=source, key="timezone"
            ) from None
    dates = DateParser(cast(DateOrder | None, date_order), zone)
    compiled = []
    for field_name, spec in fields.items():
        where = f"{section}.{field_name}"
        if direction == "inbound":
            target_type = _check_customer_path(field_name, where=where, source=source)
        compiled_field = _compile_field(
            field_name, spec, direction=direction, dates=dates, source=source, where=where
        )
        if direction == "inbound":
            # Inbound values land in Customer fields: their type is the Customer's, unless
            # the mapping fixes one (metadata.* is free).
            declared = spec.get("type") if isinstance(spec, dict) else None
            if declared is None and target_type != compiled_field.type:
                compiled_field = _compile_field(
                    field_name,
                    {**_as_table(spec), "type": target_type},
                    direction=direction,
                    dates=dates,
                    source=source,
                    where=where,
                )
        compiled.append(compiled_field)
    return CompiledMapping(
        name=name,
        direction=direction,
        fields=tuple(compiled),
        description=description,
        key=tuple(key),
        source=source,
    )


def _as_table(spec: Any) -> dict[str, Any]:
    if isinstance(spec, str):
        return {"path": spec}
    if isinstance(spec, list):
        return {"paths": spec}
    return dict(spec)


@dataclass(frozen=True)
class MappingFile:
    """A mapping file as read: its raw fields, before compilation."""

    name: str
    path: Path
    fields: dict[str, Any]
    description: str = ""
    direction: Direction | None = None
    key: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    def compile(
        self,
        *,
        direction: Direction,
        extra: Mapping[str, Any] | None = None,
        source: str | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> CompiledMapping:
        """Compile, with the job's ``extra`` fields and ``overrides`` of ``date_order`` /
        ``timezone`` (both given by a job take precedence over the file's)."""
        options = {**self.options, **{k: v for k, v in (overrides or {}).items() if v}}
        if self.direction is not None and self.direction != direction:
            raise ConfigError(
                f"mapping {self.name!r} is an {self.direction} mapping; it cannot be used "
                f"as an {direction} one",
                source=source,
            )
        if extra:
            # The job's own fields are checked first, so their errors name the job file.
            compile_mapping(
                extra,
                direction=direction,
                date_order=options.get("date_order"),
                timezone=options.get("timezone"),
                source=source,
                section="mapping.fields",
            )
        fields = {**self.fields, **(extra or {})}
        return compile_mapping(
            fields,
            direction=direction,
            name=self.name,
            description=self.description,
            key=self.key,
            date_order=options.get("date_order"),
            timezone=options.get("timezone"),
            source=str(self.path),
        )


_FILE_KEYS = frozenset({"description", "direction", "key", "fields", "date_order", "timezone"})


def load_mapping_file(
    ref: str, *, base_dir: Path | None = None, source: str | None = None, key: str = "mapping"
) -> MappingFile:
    """Find a mapping by preset name (``erp_customer``) or by path, and read it."""
    path = presets.find_mapping(ref, base_dir=base_dir)
    if path is None:
        known = ", ".join(sorted(presets.mapping_names()))
        raise ConfigError(
            f"no mapping {ref!r}: not a preset ({known}) nor a file", source=source, key=key
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read mapping: {exc}", source=str(path)) from exc
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} (known: {sorted(_FILE_KEYS)})", source=str(path)
        )
    fields = data.get("fields")
    if not isinstance(fields, dict) or not fields:
        raise ConfigError("a mapping file needs a non-empty [fields] table", source=str(path))
    direction = data.get("direction")
    if direction not in (None, "inbound", "outbound"):
        raise ConfigError("direction is inbound or outbound", source=str(path), key="direction")
    raw_key = data.get("key", ())
    return MappingFile(
        name=path.stem,
        path=path,
        fields=fields,
        description=str(data.get("description", "")),
        direction=direction,
        key=(raw_key,) if isinstance(raw_key, str) else tuple(raw_key),
        options={k: data[k] for k in ("date_order", "timezone") if k in data},
    )
