"""The canonical record, ``Customer``, and the parsing of every Commerce Layer input form.

A Commerce Layer customer reaches us as a JSON:API resource (inside a list document, with
related objects in ``included``), as a flat Exports API record, or as a CSV row of an
export. ``normalize`` turns each of them into one Customer-shaped dict; ``Customer``
validates that dict. Fields the model does not know are kept (Commerce Layer adds some).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Required, cast, get_type_hints

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from custsync.errors import FieldError

# The fast syntactic check the product asks for: one @, no spaces, a dot in the domain.
# Full RFC validation is deliberately not done: it is too slow for the speed goals.
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"
Email = Annotated[str, StringConstraints(strip_whitespace=True, pattern=EMAIL_PATTERN)]
Status = Literal["prospect", "acquired", "repeat"]
Mode = Literal["test", "live"]

ATTRIBUTES: tuple[str, ...] = (
    "email",
    "password",
    "status",
    "has_password",
    "total_orders_count",
    "shopper_reference",
    "profile_id",
    "tax_exemption_code",
    "anonymization_status",
    "anonymization_info",
    "created_at",
    "updated_at",
    "reference",
    "reference_origin",
    "metadata",
)
TO_ONE: tuple[str, ...] = ("customer_group",)
TO_MANY: tuple[str, ...] = (
    "customer_addresses",
    "customer_payment_sources",
    "customer_subscriptions",
    "orders",
    "order_subscriptions",
    "returns",
    "sku_lists",
    "attachments",
    "events",
    "tags",
)
RELATIONSHIPS: tuple[str, ...] = TO_ONE + TO_MANY
# Keys whose values are secrets wherever they appear in a record (legacy exports included).
SECRET_KEYS = frozenset(
    {"password", "password_hash", "rp_token", "client_secret", "access_token", "token", "secret"}
)
REDACTED = "**********"


class Related(BaseModel):
    """A related resource: its linkage, plus its attributes when the input included it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str | None = None
    type: str | None = None


class Links(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    self: str | None = None


class ResourceMeta(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    mode: Mode | None = None


class Customer(BaseModel):
    """A Commerce Layer customer (schema v7.9.16), flattened: attributes at the top level,
    relationships as ``Related`` objects, ``links.self`` and ``meta.mode`` kept."""

    model_config = ConfigDict(extra="allow", frozen=True, hide_input_in_errors=True)

    id: str | None = None
    type: Literal["customers"] = "customers"
    email: Email
    password: SecretStr | None = Field(default=None, repr=False, exclude=True)
    status: Status | None = None
    has_password: bool | None = None
    total_orders_count: int | None = None
    shopper_reference: str | None = None
    profile_id: str | None = None
    tax_exemption_code: str | None = None
    anonymization_status: str | None = None
    anonymization_info: dict[str, Any] | None = None
    # Commerce Layer stamps UTC with milliseconds; a timestamp without a zone is refused
    # rather than guessed (inbound mappings declare the zone of legacy dates).
    created_at: AwareDatetime | None = None
    updated_at: AwareDatetime | None = None
    reference: str | None = None
    reference_origin: str | None = None
    metadata: dict[str, Any] | None = None
    customer_group: Related | None = None
    customer_addresses: list[Related] | None = None
    customer_payment_sources: list[Related] | None = None
    customer_subscriptions: list[Related] | None = None
    orders: list[Related] | None = None
    order_subscriptions: list[Related] | None = None
    returns: list[Related] | None = None
    sku_lists: list[Related] | None = None
    attachments: list[Related] | None = None
    events: list[Related] | None = None
    tags: list[Related] | None = None
    links: Links | None = None
    meta: ResourceMeta | None = None

    @property
    def mode(self) -> str | None:
        return self.meta.mode if self.meta is not None else None


CUSTOMER_FIELDS = frozenset(Customer.model_fields) | {"links.self", "meta.mode"}
_batch_adapter: TypeAdapter[list[Customer]] = TypeAdapter(list[Customer])


# The same schema as plain dicts, for the engine's hot path: pydantic validates into dicts
# well over half again as fast as into models, and the mapping reads dicts as easily. A
# unit test holds the two definitions to the same fields and the same verdicts.
# The to-one relationship, ``links`` and ``meta`` are checked field by field in place
# rather than copied into new dicts: a third of the validation's time otherwise. Errors name
# the nested field (``meta.mode``) as pydantic would; ``field_errors`` reads it back.
def _nested_error(problems: list[tuple[str, str]]) -> PydanticCustomError:
    """One error for every problem of a nested object: (its field, the message)."""
    return PydanticCustomError("custsync_nested", problems[0][1], {"problems": tuple(problems)})


def _checked_object(
    value: Any, text_fields: tuple[str, ...], *, mode: bool = False
) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        if not isinstance(value, Mapping):
            raise PydanticCustomError("dict_type", "Input should be a valid dictionary")
        value = dict(value)
    # Every problem, as pydantic's own model reports them: keys that are not text, then
    # the fields that must be text, then meta's mode.
    problems = [(str(key), "Keys should be strings") for key in value if not isinstance(key, str)]
    for name in text_fields:
        item = value.get(name)
        if item is None or isinstance(item, str):
            continue
        if isinstance(item, bytes | bytearray):
            try:
                value = {**value, name: bytes(item).decode("utf-8")}
                continue
            except UnicodeDecodeError:
                pass
        problems.append((name, "Input should be a valid string"))
    if mode and value.get("mode") not in _MODES:
        problems.append(("mode", "Input should be 'test' or 'live'"))
    if problems:
        raise _nested_error(problems)
    return cast(dict[str, Any], value)


def _check_related(value: Any) -> dict[str, Any] | None:
    return _checked_object(value, ("id", "type"))


def _check_links(value: Any) -> dict[str, Any] | None:
    return _checked_object(value, ("self",))


def _check_meta(value: Any) -> dict[str, Any] | None:
    return _checked_object(value, (), mode=True)


_MODES = (None, "test", "live")


@with_config(ConfigDict(extra="allow"))
class RelatedRecord(TypedDict, total=False):
    id: str | None
    type: str | None


@with_config(ConfigDict(extra="allow", hide_input_in_errors=True))
class CustomerRecord(TypedDict, total=False):
    id: str | None
    type: Literal["customers"]
    email: Required[Email]
    password: SecretStr | None
    status: Status | None
    has_password: bool | None
    total_orders_count: int | None
    shopper_reference: str | None
    profile_id: str | None
    tax_exemption_code: str | None
    anonymization_status: str | None
    anonymization_info: dict[str, Any] | None
    created_at: AwareDatetime | None
    updated_at: AwareDatetime | None
    reference: str | None
    reference_origin: str | None
    metadata: dict[str, Any] | None
    customer_group: Annotated[dict[str, Any] | None, PlainValidator(_check_related)]
    customer_addresses: list[RelatedRecord] | None
    customer_payment_sources: list[RelatedRecord] | None
    customer_subscriptions: list[RelatedRecord] | None
    orders: list[RelatedRecord] | None
    order_subscriptions: list[RelatedRecord] | None
    returns: list[RelatedRecord] | None
    sku_lists: list[RelatedRecord] | None
    attachments: list[RelatedRecord] | None
    events: list[RelatedRecord] | None
    tags: list[RelatedRecord] | None
    links: Annotated[dict[str, Any] | None, PlainValidator(_check_links)]
    meta: Annotated[dict[str, Any] | None, PlainValidator(_check_meta)]


# The careful form: every field checked by pydantic or a validator of ours, every error
# named as the model names it.
_one_record: TypeAdapter[CustomerRecord] = TypeAdapter(CustomerRecord)


def _plain_nested(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """The hot path's record: the nested objects (the group, links, meta, metadata) are
    looked at here, in one call, and passed through as they are, not copied, when they
    are plain (dicts keyed by text; the group's and links' values text): three validator
    calls and a copy a record cost more (+12% on the whole). Anything else goes the
    careful way (``_one_record``), which names every error."""
    if value.__class__ is dict:
        group = value.get("customer_group")
        links = value.get("links")
        meta = value.get("meta")
        metadata = value.get("metadata")
        info = value.get("anonymization_info")
        try:
            # Keys must be text: joining them is the cheapest check (TypeError otherwise).
            "".join(group or ())
            "".join(links or ())
            "".join(meta or ())
            "".join(metadata or ())
            "".join(info or ())
        except TypeError:
            return _one_record.validate_python(value)
        if (
            (
                group is None
                or (
                    group.__class__ is dict
                    and (group.get("id") is None or group["id"].__class__ is str)
                    and (group.get("type") is None or group["type"].__class__ is str)
                )
            )
            and (
                links is None
                or (
                    links.__class__ is dict
                    and (links.get("self") is None or links["self"].__class__ is str)
                )
            )
            and (meta is None or (meta.__class__ is dict and meta.get("mode") in _MODES))
            and (metadata is None or metadata.__class__ is dict)
            and (info is None or info.__class__ is dict)
        ):
            return handler(value)
    return _one_record.validate_python(value)


_PLAIN = dict.fromkeys(("customer_group", "links", "meta", "metadata", "anonymization_info"), Any)
_hints = get_type_hints(CustomerRecord, include_extras=True)
_PlainRecord: Any = with_config(ConfigDict(extra="allow", hide_input_in_errors=True))(
    TypedDict(  # type: ignore[operator]
        "_PlainRecord",
        {
            name: _PLAIN.get(
                name, Required[hint] if name in CustomerRecord.__required_keys__ else hint
            )
            for name, hint in _hints.items()
        },
        total=False,
    )
)
_record_adapter: TypeAdapter[list[CustomerRecord]] = TypeAdapter(
    list[Annotated[_PlainRecord, WrapValidator(_plain_nested)]]
)
_plain_record: TypeAdapter[CustomerRecord] = TypeAdapter(
    Annotated[_PlainRecord, WrapValidator(_plain_nested)]
)


def validate_records(
    records: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any] | list[FieldError]]:
    """``validate_batch`` into plain dicts (the engine's form of a validated Customer)."""
    try:
        return cast(
            list[dict[str, Any] | list[FieldError]], _record_adapter.validate_python(records)
        )
    except ValidationError:
        pass
    results: list[dict[str, Any] | list[FieldError]] = []
    for record in records:
        try:
            results.append(cast(dict[str, Any], _plain_record.validate_python(record)))
        except ValidationError as exc:
            results.append(field_errors(exc))
    return results


def validate_batch(
    records: Sequence[Mapping[str, Any]],
) -> list[Customer | list[FieldError]]:
    """Validate records at once; each slot holds the Customer or the field errors of its
    record. The whole batch goes through pydantic in one call; only when it fails are the
    records validated one by one, so the common path pays no per-record overhead."""
    try:
        return list(_batch_adapter.validate_python(records))
    except ValidationError:
        pass
    results: list[Customer | list[FieldError]] = []
    for record in records:
        try:
            results.append(Customer.model_validate(record))
        except ValidationError as exc:
            results.append(field_errors(exc))
    return results


def field_errors(exc: ValidationError) -> list[FieldError]:
    """Name each failing field by its dotted path; the message never repeats the input."""
    errors: list[FieldError] = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(part) for part in error["loc"]) or "record"
        if error["type"] == "custsync_nested":
            problems = error["ctx"]["problems"]
            errors.extend(FieldError(f"{loc}.{field}", message) for field, message in problems)
            continue
        errors.append(FieldError(loc, error["msg"]))
    return errors


# --- parsing the Commerce Layer input forms -------------------------------------------


def iter_records(obj: Any) -> Iterator[dict[str, Any]]:
    """Customer-shaped dicts from one parsed JSON value, in any form Commerce Layer gives:
    a list document (``{"data": [...], "included": [...]}``), a resource object, a flat
    Exports record, or a JSON array of either."""
    if isinstance(obj, list):
        for item in obj:
            yield from iter_records(item)
        return
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object or array, got {type(obj).__name__}")
    if "data" in obj and ("attributes" not in obj) and isinstance(obj["data"], list | dict):
        included = index_included(obj.get("included"))
        data = obj["data"]
        for resource in data if isinstance(data, list) else [data]:
            if not isinstance(resource, dict):
                raise ValueError("a list document's data holds something other than objects")
            yield from_resource(resource, included)
        return
    yield normalize(obj)


def normalize(obj: Mapping[str, Any]) -> dict[str, Any]:
    """One object that is either a JSON:API resource or a flat record."""
    if isinstance(obj.get("attributes"), dict):
        return from_resource(obj, {})
    return from_flat(obj)


IncludedIndex = dict[tuple[str, str], Mapping[str, Any]]


def index_included(included: Any) -> IncludedIndex:
    index: IncludedIndex = {}
    if isinstance(included, list):
        for item in included:
            if isinstance(item, dict) and "type" in item and "id" in item:
                index[(str(item["type"]), str(item["id"]))] = item
    return index


def _related(linkage: Mapping[str, Any], included: IncludedIndex) -> dict[str, Any]:
    out: dict[str, Any] = {"id": linkage.get("id"), "type": linkage.get("type")}
    found = included.get((str(linkage.get("type")), str(linkage.get("id"))))
    if found is not None:
        attributes = found.get("attributes")
        if isinstance(attributes, dict):
            for name, value in attributes.items():
                out.setdefault(name, value)
    return out


def from_resource(resource: Mapping[str, Any], included: IncludedIndex) -> dict[str, Any]:
    """A JSON:API resource object -> a Customer-shaped dict."""
    out: dict[str, Any] = {}
    attributes = resource.get("attributes")
    if isinstance(attributes, dict):
        out.update(attributes)
    for name in ("id", "type"):
        if name in resource:
            out[name] = resource[name]
    links = resource.get("links")
    if isinstance(links, dict):
        out["links"] = {"self": links.get("self")}
    meta = resource.get("meta")
    if isinstance(meta, dict):
        out["meta"] = meta
    relationships = resource.get("relationships")
    if isinstance(relationships, dict):
        for name, rel in relationships.items():
            if not isinstance(rel, dict) or "data" not in rel:
                continue  # links only: the relationship was not requested
            data = rel["data"]
            if data is None:
                out[name] = None
            elif isinstance(data, list):
                out[name] = [_related(item, included) for item in data if isinstance(item, dict)]
            elif isinstance(data, dict):
                out[name] = _related(data, included)
    return out


def from_flat(record: Mapping[str, Any]) -> dict[str, Any]:
    """A flat Exports record (JSON or CSV) -> a Customer-shaped dict.

    Relationships arrive as ``<rel>_id`` (or as a nested object when included); CSV
    cells are strings, so empty cells become null and a JSON ``metadata`` cell is parsed;
    dotted headers (``customer_group.name``) become nested values.
    """
    out: dict[str, Any] = {}
    for name, value in record.items():
        if value == "":
            value = None
        if "." in name:
            head, _, rest = name.partition(".")
            nested = out.setdefault(head, {})
            if isinstance(nested, dict):
                _set_path(nested, rest.split("."), value)
            continue
        if name.endswith("_id") and name[:-3] in RELATIONSHIPS:
            rel = name[:-3]
            if value is not None:
                current = out.get(rel)
                if isinstance(current, dict):
                    current.setdefault("id", value)
                else:
                    out[rel] = {"id": value, "type": _plural(rel)}
            continue
        out[name] = value
    for name in ("metadata", "anonymization_info", "links", "meta", *RELATIONSHIPS):
        value = out.get(name)
        if isinstance(value, str) and value[:1] in ("{", "["):
            # Left as text when it is not JSON: validation then names the field.
            with contextlib.suppress(orjson.JSONDecodeError):
                out[name] = orjson.loads(value)
    return out


def _plural(relationship: str) -> str:
    return relationship if relationship.endswith("s") else relationship + "s"


def _set_path(target: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        nxt = target.setdefault(part, {})
        if not isinstance(nxt, dict):
            return
        target = nxt
    target[parts[-1]] = value


_SECRET_NAMES = "|".join(sorted(SECRET_KEYS, key=len, reverse=True))
# A secret inside text that could not be parsed: "password": "x", password=x, password: x.
_SECRET_IN_TEXT = re.compile(
    rf"""(["']?(?:{_SECRET_NAMES})["']?\s*[:=]\s*)("(?:[^"\\]|\\.)*"|'[^']*'|[^,;}}\s]+)""",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """Mask what looks like a secret's value in unparsed text (a malformed input line)."""
    return _SECRET_IN_TEXT.sub(lambda m: f'{m.group(1)}"{REDACTED}"', text)


def redact(value: Any) -> Any:
    """A deep copy of a record with every secret-named key masked (rejects, logs)."""
    if isinstance(value, dict):
        return {
            k: (
                REDACTED
                if k.lower() in SECRET_KEYS and v not in (None, "")
                else redact_text(v)
                if k == "_raw" and isinstance(v, str)
                else redact(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def parse_timestamp(value: Any) -> datetime | None:
    """A timestamp from a record, as aware UTC, or None when absent or unreadable."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
