"""The ``commercelayer`` target: customers upserted into Commerce Layer (migrations into
it), matched by email or by ``reference``, through POST/PATCH or the Imports API.

A write looks the batch's customers up first (``filter[q][email_in]`` or
``filter[q][reference_in]``, 25 a page, keyset by id), decides each row against what is
stored, and sends only what differs. ``metadata`` is merged on our side (stored keys we do
not map are kept) and sent whole, since whether a PATCH merges it is unknown. A batch with
more than ``import_threshold`` rows to write goes through one import per ``import_size``
rows; its ``errors_log`` becomes FAILED rows. Writes are paced by the client's write limits.

Commerce Layer sets ``created_at``/``updated_at`` itself, so there is no field a row could
hold the source's ``updated_at`` in: the never-go-backwards guard cannot be kept here, and
the watermark alone keeps a run from going backwards (DESIGN.md, "HTTP targets").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import Field, SecretStr, model_validator

from custsync.commercelayer.client import ApiError, AuthError, CommerceLayerClient
from custsync.commercelayer.source import PAGE_SIZE, ConnectionSettings, make_client
from custsync.errors import ConfigError, TargetError
from custsync.targets.base import Key, Outcome, Row, RowResult, RowSchema, TargetSettings

log = logging.getLogger("custsync.commercelayer")

# The customer's writable attributes (schema v7.9.16) and its one writable relationship,
# addressed as ``customer_group_id`` (the Exports/Imports form).
TEXT_FIELDS = (
    "email",
    "reference",
    "reference_origin",
    "tax_exemption_code",
    "shopper_reference",
    "profile_id",
)
FIELDS = (*TEXT_FIELDS, "metadata", "customer_group_id", "password")
MAX_IMPORT_INPUTS = 10_000


class CommerceLayerTargetSettings(TargetSettings, ConnectionSettings):
    connector: Literal["commercelayer"] = "commercelayer"
    match_by: Literal["email", "reference"] = "email"
    # More rows to write than this in one batch go through the Imports API (0 = never).
    import_threshold: int = Field(default=200, ge=0)
    # Inputs per import: the API takes up to 10,000 (older documentation says 2,000).
    import_size: int = Field(default=2_000, ge=1, le=MAX_IMPORT_INPUTS)
    # How long to wait for an import to finish before the run fails (it is re-run safely).
    import_timeout: float = Field(default=1_800.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _key_is_match_by(cls, values: Any) -> Any:
        # The key column is the field customers are matched on: default it, so a job
        # needs no ``key`` (a different one is refused by ``prepare``, naming it).
        if isinstance(values, dict) and values.get("key") is None:
            return {**values, "key": values.get("match_by", "email")}
        return values


_NOT_FOUND = "no customer with this {field}, and match_policy = update_only"


@dataclass
class _Plan:
    """What to do with one row: the request to send, or the outcome without one."""

    key: Key
    outcome: Outcome
    customer_id: str | None = None  # the matched customer (None: create one)
    attributes: dict[str, Any] = field(default_factory=dict)
    group: Any = None  # customer_group_id to set, when ``set_group``
    set_group: bool = False
    password: str | None = None  # on create only: never read back, never compared
    message: str | None = None
    row: Row | None = None

    def result(self, outcome: Outcome | None = None, message: str | None = None) -> RowResult:
        return RowResult(
            self.key, outcome or self.outcome, message or self.message, self.customer_id
        )


def find_customers(
    client: CommerceLayerClient,
    filters: Mapping[str, str],
    *,
    fields: Sequence[str] | None = None,
    include_group: bool = False,
) -> Iterator[dict[str, Any]]:
    """Every customer matching ``filters`` (``{"email_in": "a,b"}``), 25 a page, keyset by
    id (the last id the server returned), as Commerce Layer's own helpers walk a list."""
    params: dict[str, Any] = {f"filter[q][{name}]": value for name, value in filters.items()}
    params |= {"sort": "id", "page[size]": PAGE_SIZE}
    if fields is not None:
        params["fields[customers]"] = ",".join(fields)
    if include_group:
        params["include"] = "customer_group"
        params["fields[customer_groups]"] = "name"
    last_id: str | None = None
    while True:
        if last_id is not None:
            params["filter[q][id_gt]"] = last_id
        document = client.get("/customers", params)
        data = document.get("data") or []
        for customer in data:
            if client.mode is None:
                client.learn_mode((customer.get("meta") or {}).get("mode"))
            yield customer
        if len(data) < PAGE_SIZE or not (document.get("links") or {}).get("next"):
            return
        last_id = str(data[-1]["id"])


def api_message(error: ApiError) -> str:
    """The API's own words for a refusal, with the field it points at."""
    where = f" ({error.pointer})" if error.pointer else ""
    return f"{error.code or error.status}: {error.detail}{where}"


def _email_key(value: Any) -> str:
    # The API holds e-mails unique regardless of case and surrounding blanks.
    return str(value).strip().lower()


def _chunks(values: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


def _text(value: Any) -> str | None:
    """A row value as the API's text attribute; empty is null."""
    if value is None:
        return None
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        text = str(value).strip()
        return text or None
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"must be text, not {type(value).__name__}")


def _json_object(value: Any) -> dict[str, Any]:
    """A metadata value as the JSON object the API will store (so comparisons are between
    JSON values, whatever Python types the mapping produced)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"must be an object, not {type(value).__name__}")
    try:
        loaded = orjson.loads(orjson.dumps(value))
    except orjson.JSONEncodeError as exc:  # orjson's is a TypeError: say what it is
        raise TypeError(f"is not JSON: {exc}") from None
    assert isinstance(loaded, dict)
    return loaded


def _origin_of(customer: Mapping[str, Any]) -> str | None:
    return (customer.get("attributes") or {}).get("reference_origin") or None


def _group_of(customer: Mapping[str, Any]) -> str | None:
    linkage = ((customer.get("relationships") or {}).get("customer_group") or {}).get("data")
    return str(linkage["id"]) if isinstance(linkage, dict) and linkage.get("id") else None


class CommerceLayerTarget:
    """Upserts customers into Commerce Layer. See the module docstring for how."""

    def __init__(
        self,
        settings: CommerceLayerTargetSettings,
        *,
        base_dir: Path | None = None,
        client: CommerceLayerClient | None = None,
        sleep: Callable[[float], None] = time.sleep,
        poll_interval: float = 0.5,
        max_poll_interval: float = 15.0,
    ) -> None:
        self.settings = settings
        self._owns_client = client is None
        self.client = client or make_client(settings)
        self._sleep = sleep
        self._poll_interval = poll_interval
        self._max_poll_interval = max_poll_interval
        self._schema: RowSchema | None = None
        self.imports: list[str] = []  # ids of the imports this target ran, for reports

    def __repr__(self) -> str:
        return f"CommerceLayerTarget({self.client.base_url}, match_by={self.settings.match_by})"

    # --- Target -------------------------------------------------------------------------

    def prepare(self, schema: RowSchema, *, create: bool = True) -> list[str]:
        """Check the rows' fields against what a customer can be written with (nothing is
        created: Commerce Layer has its customers already)."""
        match_by = self.settings.match_by
        unknown = [c.name for c in schema.columns if c.name not in FIELDS]
        if unknown:
            raise ConfigError(
                f"{unknown[0]!r} is not a writable field of Commerce Layer customers "
                f"(writable: {', '.join(FIELDS)})",
                key=f"mapping.fields.{unknown[0]}",
            )
        if schema.key != (match_by,):
            raise ConfigError(
                f"match_by = {match_by!r}: the key must be the {match_by!r} field, "
                f"not {', '.join(schema.key) or 'nothing'}",
                key="target.key",
            )
        names = {c.name for c in schema.columns}
        if "email" not in names and schema.match_policy != "update_only":
            raise ConfigError(
                "creating customers needs an email: map the email field "
                '(or set match_policy = "update_only")',
                key="mapping.fields",
            )
        self._schema = schema
        notes = []
        if schema.guard is not None:
            notes.append(
                f"the commercelayer target cannot keep the never-go-backwards guard "
                f"({schema.guard}): Commerce Layer sets updated_at itself; the watermark "
                "alone keeps runs from going backwards"
            )
        if "password" in names:
            notes.append("password is set on customers this job creates, never changed after")
        return notes

    def write(self, rows: Sequence[Row]) -> list[RowResult]:
        plans = self._plan(rows)
        pending = [p for p in plans if p.outcome in (Outcome.INSERTED, Outcome.UPDATED)]
        threshold = self.settings.import_threshold
        if threshold and len(pending) > threshold:
            done = self._import(pending)
        else:
            done = {id(p): self._send(p) for p in pending}
        return [done.get(id(p)) or p.result() for p in plans]

    def preview(self, rows: Sequence[Row]) -> list[RowResult]:
        return [p.result() for p in self._plan(rows)]

    def check(self) -> list[str]:
        document = self.client.get("/customers", {"page[size]": 1, "fields[customers]": "id"})
        for customer in document.get("data") or []:
            self.client.learn_mode((customer.get("meta") or {}).get("mode"))
        count = (document.get("meta") or {}).get("record_count")
        mode = self.client.mode or "unknown"
        return [
            f"reached {self.client.base_url}: {count} customers ({mode} mode), "
            f"matched by {self.settings.match_by}"
        ]

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    # --- deciding ----------------------------------------------------------------------

    def _ready(self) -> RowSchema:
        if self._schema is None:
            raise TargetError("prepare() must be called before writing")
        return self._schema

    def _plan(self, rows: Sequence[Row]) -> list[_Plan]:
        schema = self._ready()
        if not rows:
            return []
        match_by = self.settings.match_by
        norm: Callable[[Any], str] = _email_key if match_by == "email" else str
        stored = self._lookup(schema, [str(r[match_by]) for r in rows])
        plans: list[_Plan] = []
        claimed: dict[str, Key] = {}  # a customer can take one row per batch
        for row in rows:
            key = schema.key_of(row)
            found = stored.get(norm(row[match_by]), [])
            if match_by == "reference":
                found = self._same_origin(schema, row, found)
            if len(found) > 1:
                plans.append(
                    _Plan(
                        key,
                        Outcome.FAILED,
                        message=f"reference is not unique: {len(found)} customers",
                    )
                )
                continue
            current = found[0] if found else None
            if current is not None and current["id"] in claimed:
                plans.append(
                    _Plan(
                        key,
                        Outcome.FAILED,
                        message=f"the same customer as key {claimed[current['id']]!r} in this "
                        "batch (e-mails compare case-insensitively)",
                    )
                )
                continue
            if current is not None:
                claimed[current["id"]] = key
            plans.append(self._decide(schema, key, row, current))
        return plans

    @staticmethod
    def _same_origin(
        schema: RowSchema, row: Row, found: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """A reference is an id in the system ``reference_origin`` names: when the rows say
        which system, a customer whose reference belongs to another one is not a match
        (one without an origin is, when no customer has the row's own)."""
        if not found or "reference_origin" not in {c.name for c in schema.columns}:
            return found
        try:
            origin = _text(row.get("reference_origin"))
        except TypeError:
            return found
        if origin is None:
            return found
        same = [c for c in found if _origin_of(c) == origin]
        return same or [c for c in found if _origin_of(c) is None]

    def _decide(
        self, schema: RowSchema, key: Key, row: Row, current: dict[str, Any] | None
    ) -> _Plan:
        try:
            wanted, metadata, group, password = self._wanted(schema, row)
        except TypeError as exc:
            return _Plan(key, Outcome.FAILED, message=str(exc))
        if current is None:
            if schema.match_policy == "update_only":
                message = _NOT_FOUND.format(field=self.settings.match_by)
                return _Plan(key, Outcome.FAILED, message=message)
            attributes: dict[str, Any] = {k: v for k, v in wanted.items() if v is not None}
            if metadata is not None:
                attributes["metadata"] = metadata
            return _Plan(
                key,
                Outcome.INSERTED,
                attributes=attributes,
                group=group,
                set_group=group is not _UNSET and group is not None,
                password=password,
                row=row,
            )
        plan = _Plan(key, Outcome.UNCHANGED, customer_id=str(current["id"]))
        if schema.match_policy == "create_only":
            return plan
        stored = current.get("attributes") or {}
        for name, value in wanted.items():
            old = stored.get(name)
            if name == "email" and old is not None and value is not None:
                same = _email_key(old) == _email_key(value)
            else:
                same = (old or None) == value
            if not same:
                plan.attributes[name] = value
        if metadata is not None:
            before = stored.get("metadata") or {}
            merged = {**before, **metadata}
            if merged != before:
                plan.attributes["metadata"] = merged
        if group is not _UNSET and _group_of(current) != group:
            plan.group, plan.set_group = group, True
        if plan.attributes or plan.set_group:
            plan.outcome = Outcome.UPDATED
        return plan

    @staticmethod
    def _wanted(
        schema: RowSchema, row: Row
    ) -> tuple[dict[str, str | None], dict[str, Any] | None, Any, str | None]:
        """The row as the API's values: text attributes, metadata (None: leave it), the
        group (``_UNSET``: not mapped) and the password. Errors name the field only."""
        wanted: dict[str, str | None] = {}
        metadata: dict[str, Any] | None = None
        group: Any = _UNSET
        password: str | None = None
        for column in schema.columns:
            name, value = column.name, row.get(column.name)
            try:
                if name == "metadata":
                    metadata = None if value is None else _json_object(value)
                elif name == "customer_group_id":
                    group = _text(value)
                elif name == "password":
                    password = _text(value)
                else:
                    wanted[name] = _text(value)
            except TypeError as exc:
                raise TypeError(f"{name} {exc}") from None
        return wanted, metadata, group, password

    def _lookup(self, schema: RowSchema, keys: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """The stored customers for these keys, by normalised key: a few list requests."""
        match_by = self.settings.match_by
        names = {c.name for c in schema.columns}
        fields = sorted(
            ({"email", "reference", "reference_origin"} | (names & set(TEXT_FIELDS)))
            | ({"metadata"} & names)
        )
        include_group = "customer_group_id" in names
        if include_group:
            fields.append("customer_group")
        values: list[str] = []
        for key in dict.fromkeys(keys):
            values.append(key)
            if match_by == "email" and key.lower() != key:
                values.append(key.lower())  # the API may keep e-mails as typed, or lowered
        # A value holding a comma cannot go in an `_in` list: it is asked for alone.
        plain = [v for v in values if "," not in v]
        odd = [v for v in values if "," in v]
        queries: list[dict[str, str]] = [
            {f"{match_by}_in": ",".join(chunk)} for chunk in _chunks(plain, PAGE_SIZE)
        ]
        queries += [{f"{match_by}_eq": value} for value in odd]
        norm: Callable[[Any], str] = _email_key if match_by == "email" else str
        found: dict[str, dict[str, dict[str, Any]]] = {}
        for filters in queries:
            for customer in find_customers(
                self.client, filters, fields=fields, include_group=include_group
            ):
                value = (customer.get("attributes") or {}).get(match_by)
                if value is not None:
                    found.setdefault(norm(value), {})[str(customer["id"])] = customer
        return {key: list(by_id.values()) for key, by_id in found.items()}

    def _find_by_email(self, email: str) -> dict[str, Any] | None:
        """The customer holding ``email`` whatever its case (the API compares e-mails so):
        ``_start`` and ``_end`` match case-insensitively where ``_in`` does not."""
        schema = self._ready()
        wanted = _email_key(email)
        names = {c.name for c in schema.columns}
        include_group = "customer_group_id" in names
        for customer in find_customers(
            self.client,
            {"email_start": email.strip(), "email_end": email.strip()},
            include_group=include_group,
        ):
            if _email_key((customer.get("attributes") or {}).get("email")) == wanted:
                return customer
        return None

    # --- writing one by one --------------------------------------------------------------

    def _send(self, plan: _Plan) -> RowResult:
        try:
            if plan.customer_id is None:
                return self._create(plan)
            return self._update(plan)
        except AuthError:
            raise
        except ApiError as exc:
            vanished = exc.status == 404 and exc.code == "RECORD_NOT_FOUND" and not exc.pointer
            if vanished and plan.customer_id is not None:
                return plan.result(
                    Outcome.FAILED,
                    f"customer {plan.customer_id} no longer exists (deleted since the "
                    "lookup); the next run creates it",
                )
            return plan.result(Outcome.FAILED, api_message(exc))

    def _body(self, plan: _Plan, attributes: Mapping[str, Any]) -> dict[str, Any]:
        data: dict[str, Any] = {"type": "customers", "attributes": dict(attributes)}
        if plan.customer_id is not None:
            data["id"] = plan.customer_id
        if plan.set_group:
            linkage = None if plan.group is None else {"type": "customer_groups", "id": plan.group}
            data["relationships"] = {"customer_group": {"data": linkage}}
        return {"data": data}

    def _create(self, plan: _Plan) -> RowResult:
        attributes = dict(plan.attributes)
        if plan.password is not None:
            attributes["password"] = plan.password
        try:
            response = self.client.request(
                "POST", "/customers", json=self._body(plan, attributes), kind="write"
            )
        except ApiError as exc:
            taken = exc.status == 422 and (exc.pointer or "").endswith("/email")
            if not taken or "email" not in plan.attributes:
                raise
            # The e-mail is taken: by the customer we looked for, held in another case (or
            # created by a retried POST whose answer was lost), or by someone else.
            current = self._find_by_email(plan.attributes["email"])
            if current is None or not self._is_ours(plan, current):
                raise
            assert plan.row is not None
            again = self._decide(self._ready(), plan.key, plan.row, current)
            if again.outcome is Outcome.UPDATED:
                return self._update(again)
            return again.result()
        created = response.json()["data"]["id"]
        return RowResult(plan.key, Outcome.INSERTED, None, str(created))

    def _is_ours(self, plan: _Plan, current: dict[str, Any]) -> bool:
        if self.settings.match_by == "email":
            return True
        stored = current.get("attributes") or {}
        if stored.get("reference") != plan.attributes.get("reference"):
            return False
        assert plan.row is not None
        return bool(self._same_origin(self._ready(), plan.row, [current]))

    def _update(self, plan: _Plan) -> RowResult:
        assert plan.customer_id is not None
        self.client.request(
            "PATCH",
            f"/customers/{plan.customer_id}",
            json=self._body(plan, plan.attributes),
            kind="write",
        )
        return plan.result(Outcome.UPDATED)

    # --- writing through the Imports API ---------------------------------------------------

    def _import(self, plans: Sequence[_Plan]) -> dict[int, RowResult]:
        """Write ``plans`` through imports of at most ``import_size`` inputs; inserted or
        updated as the lookup decided, the rows of ``errors_log`` FAILED."""
        results: dict[int, RowResult] = {}
        kept = self._guard_emails(plans, results)
        chunks = [
            kept[start : start + self.settings.import_size]
            for start in range(0, len(kept), self.settings.import_size)
        ]
        started: list[tuple[str, Sequence[_Plan]]] = []
        for chunk in chunks:
            inputs = [self._input(plan) for plan in chunk]
            try:
                response = self.client.request(
                    "POST",
                    "/imports",
                    json={
                        "data": {
                            "type": "imports",
                            "attributes": {
                                "resource_type": "customers",
                                "format": "json",
                                "inputs": inputs,
                                # Without it an import stops past 10% errors, leaving which
                                # rows it wrote unknown.
                                "skip_errors": True,
                            },
                        }
                    },
                    kind="write",
                )
            except AuthError:
                raise
            except ApiError as exc:
                raise TargetError(
                    f"Commerce Layer refused an import of {len(inputs)} customers: "
                    f"{api_message(exc)}"
                ) from exc
            ident = str(response.json()["data"]["id"])
            self.imports.append(ident)
            log.info("import %s of %d customers started", ident, len(inputs))
            started.append((ident, chunk))
        for ident, sent in started:
            attributes = self._wait_for_import(ident)
            errors = attributes.get("errors_log") or {}
            status = attributes.get("status")
            log.info(
                "import %s %s: %s processed, %s errors",
                ident,
                status,
                attributes.get("processed_count"),
                attributes.get("errors_count"),
            )
            for index, plan in enumerate(sent):
                problems = errors.get(str(index))
                if problems:
                    results[id(plan)] = plan.result(Outcome.FAILED, _import_message(problems))
                elif status != "completed":
                    results[id(plan)] = plan.result(
                        Outcome.FAILED,
                        f"import {ident} ended {status}: this row may not be written "
                        "(a re-run settles it)",
                    )
                else:
                    results[id(plan)] = plan.result()
        return results

    def _guard_emails(self, plans: Sequence[_Plan], results: dict[int, RowResult]) -> list[_Plan]:
        """An import matches inputs without an id by e-mail: when customers are matched by
        reference, a new row whose e-mail another customer holds would overwrite that
        customer. Such rows fail, as a POST of them would (422, taken)."""
        new = [p for p in plans if p.customer_id is None and p.attributes.get("email")]
        if self.settings.match_by != "reference" or not new:
            return list(plans)
        emails = sorted({str(p.attributes["email"]) for p in new})
        values = sorted({*emails, *(e.lower() for e in emails)})
        taken: set[str] = set()
        for chunk in _chunks([v for v in values if "," not in v], PAGE_SIZE):
            for customer in find_customers(
                self.client, {"email_in": ",".join(chunk)}, fields=["email"]
            ):
                taken.add(_email_key((customer.get("attributes") or {}).get("email")))
        new_ids = {id(p) for p in new}
        kept = []
        for plan in plans:
            if id(plan) in new_ids and _email_key(plan.attributes["email"]) in taken:
                results[id(plan)] = plan.result(
                    Outcome.FAILED,
                    "VALIDATION_ERROR: email has already been taken, by a customer with "
                    "another reference (/data/attributes/email)",
                )
            else:
                kept.append(plan)
        return kept

    @staticmethod
    def _input(plan: _Plan) -> dict[str, Any]:
        # Imports take the flat form of a customer: relationships as <name>_id.
        item: dict[str, Any] = dict(plan.attributes)
        if plan.customer_id is not None:
            item["id"] = plan.customer_id
        elif plan.password is not None:
            item["password"] = plan.password
        if plan.set_group:
            item["customer_group_id"] = plan.group
        return item

    def _wait_for_import(self, ident: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.settings.import_timeout
        interval = self._poll_interval
        while True:
            self._sleep(interval)
            document = self.client.get(f"/imports/{ident}")
            attributes: dict[str, Any] = document["data"]["attributes"]
            if attributes.get("status") not in ("pending", "in_progress"):
                return attributes
            if time.monotonic() >= deadline:
                raise TargetError(
                    f"import {ident} did not finish within {self.settings.import_timeout:g}s "
                    f"(status {attributes.get('status')}); re-run the job once it has"
                )
            interval = min(interval * 1.5, self._max_poll_interval)


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


def _import_message(problems: Any) -> str:
    """An ``errors_log`` entry (``{"email": ["has already been taken"]}``) as one line."""
    if isinstance(problems, Mapping):
        parts = []
        for name, messages in problems.items():
            listed = messages if isinstance(messages, list) else [messages]
            parts.append(f"{name} {', '.join(str(m) for m in listed)}")
        return "import: " + "; ".join(parts)
    return f"import: {problems}"
