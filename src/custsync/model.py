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
    SecretStr,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    with_config,
)
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
# unit test holds the two definitions to the same fields and the same verdicts. Nested
# objects are TypedDicts too: pydantic checks and copies them in its own code faster than
# any validator of ours could look at them (measured: 10% on the whole against a single
# Python check of the uncopied dicts, 25% against one per object).
@with_config(ConfigDict(extra="allow"))
class RelatedRecord(TypedDict, total=False):
    id: str | None
    type: str | None


@with_config(ConfigDict(extra="allow"))
class LinksRecord(TypedDict, total=False):
    self: str | None


@with_config(ConfigDict(extra="allow"))
class MetaRecord(TypedDict, total=False):
    mode: Mode | None


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
    customer_group: RelatedRecord | None
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
    links: LinksRecord | None
    meta: MetaRecord | None


_one_record: TypeAdapter[CustomerRecord] = TypeAdapter(CustomerRecord)
# The same schema leaving out the fields it does not know, which ``validate_records`` then
# copies over itself: pydantic's bookkeeping of unknown keys is a fifth of its time per
# record (measured in instructions with callgrind), and a record without one (almost
# every record) is told by its length alone. Its output is the full schema's: the known
# fields in the schema's order, then the unknown ones in the record's.
_KnownFields: Any = with_config(ConfigDict(extra="ignore"))(
    TypedDict(  # type: ignore[operator]
        "KnownFields", get_type_hints(CustomerRecord, include_extras=True), total=False
    )
)
_known_only: TypeAdapter[list[dict[str, Any]]] = TypeAdapter(list[_KnownFields])


def validate_records(
    records: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any] | list[FieldError]]:
    """``validate_batch`` into plain dicts (the engine's form of a validated Customer)."""
    try:
        validated = _known_only.validate_python(records)
        results = cast(list[dict[str, Any] | list[FieldError]], validated)
    except ValidationError:
        return [_validate_record(record) for record in records]
    for at, (record, result) in enumerate(zip(records, results, strict=True)):
        if len(result) == len(record):
            continue  # no field the schema does not know
        assert isinstance(result, dict)
        for name in record:
            if name not in result:
                if name.__class__ is not str:  # the full schema converts or refuses it
                    results[at] = _validate_record(record)
                    break
                result[name] = record[name]
    return results


def _validate_record(record: Mapping[str, Any]) -> dict[str, Any] | list[FieldError]:
    try:
        return cast(dict[str, Any], _one_record.validate_python(record))
    except ValidationError as exc:
        return field_errors(exc)


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
    """The linkage's id and type first, then the included object's attributes."""
    identifier, kind = linkage.get("id"), linkage.get("type")
    out: dict[str, Any] = {"id": identifier, "type": kind}
    found = included.get((str(kind), str(identifier)))
    if found is not None:
        attributes = found.get("attributes")
        if isinstance(attributes, dict):
            out.update(attributes)  # in C; the linkage's id and type stay (below)
            out["id"], out["type"] = identifier, kind
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
