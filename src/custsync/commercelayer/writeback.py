"""Writeback: the id a target assigned to each row, written back into Commerce Layer.

Why it exists: a job whose target makes its own ids (a CRM record id, an ERP customer
number, a database identity column) must upsert by the Commerce Layer id, since no external
key exists before its first run. Writing the target's id back into ``reference`` (with
``reference_origin``) or a ``metadata`` key gives every customer that key, so later jobs
(and other systems) can match on it. It fills only empty fields: a value already there,
whoever wrote it, is never overwritten.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from custsync.commercelayer.client import ApiError, AuthError, CommerceLayerClient
from custsync.commercelayer.source import PAGE_SIZE
from custsync.commercelayer.target import api_message, find_customers
from custsync.errors import ConfigError

log = logging.getLogger("custsync.commercelayer")


class WritebackConfig(Protocol):
    """The job's ``[writeback]`` table (``custsync.config.WritebackSettings``)."""

    @property
    def field(self) -> str: ...

    @property
    def origin(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class WritebackItem:
    """One customer the run read, and the id the target reported for its row.

    ``reference`` and ``metadata`` are the customer's values as the run read them, or None
    where it did not read them (sparse fieldsets): a value already set there skips the
    customer without a request; anything else is checked against the API first."""

    customer_id: str
    target_id: str
    reference: str | None = None
    metadata: Mapping[str, Any] | None = None


class WritebackStatus(StrEnum):
    WRITTEN = "written"
    SKIPPED = "skipped"  # the field holds a value already: left as it is
    FAILED = "failed"  # the API refused (``message`` says why) or the customer is gone


@dataclass(frozen=True, slots=True)
class WritebackResult:
    customer_id: str
    status: WritebackStatus
    message: str | None = None


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class Writeback:
    """Writes target ids into ``reference`` or ``metadata.<key>`` where it is empty.

    Customers whose field looked empty when read are read again (one list request per 25,
    ``filter[q][id_in]``) just before the PATCH: the field is filled only if it is still
    empty, and metadata is merged into what is stored now, then sent whole (whether a
    PATCH merges metadata is unknown). The client paces the PATCHes by the write limits
    and retries them as it retries everything.
    """

    def __init__(self, client: CommerceLayerClient, settings: WritebackConfig) -> None:
        self.client = client
        name = settings.field
        self.origin = settings.origin
        self.metadata_key: str | None = None
        if name.startswith("metadata."):
            key = name.removeprefix("metadata.")
            if not key or "." in key:
                raise ConfigError(
                    "a metadata key is one name: metadata.<key>", key="writeback.field"
                )
            self.metadata_key = key
            if settings.origin is not None:
                raise ConfigError(
                    'origin sets reference_origin: it applies to field = "reference" only',
                    key="writeback.origin",
                )
        elif name != "reference":
            raise ConfigError(
                'writeback.field is "reference" or "metadata.<key>"', key="writeback.field"
            )
        self.field = name

    def __repr__(self) -> str:
        return f"Writeback({self.field} in {self.client.base_url})"

    def write(self, items: Sequence[WritebackItem]) -> list[WritebackResult]:
        """One result per item, correlated by customer id. An item for a customer seen
        before in the same call gets the first one's result."""
        unique: dict[str, WritebackItem] = {}
        for item in items:
            unique.setdefault(item.customer_id, item)
        results: dict[str, WritebackResult] = {}
        candidates = []
        for item in unique.values():
            held = self._read_value(item)
            if not _empty(held):
                results[item.customer_id] = self._skipped(item.customer_id, held == item.target_id)
            else:
                candidates.append(item)
        current = self._current([item.customer_id for item in candidates])
        for item in candidates:
            results[item.customer_id] = self._write_one(item, current.get(item.customer_id))
        written = sum(r.status is WritebackStatus.WRITTEN for r in results.values())
        failed = sum(r.status is WritebackStatus.FAILED for r in results.values())
        if written or failed:
            log.info("writeback of %s: %d written, %d failed", self.field, written, failed)
        return [results[item.customer_id] for item in items]

    def _read_value(self, item: WritebackItem) -> Any:
        if self.metadata_key is None:
            return item.reference
        return None if item.metadata is None else item.metadata.get(self.metadata_key)

    def _current(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        fields = ["reference", "reference_origin"] if self.metadata_key is None else ["metadata"]
        found: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(ids, PAGE_SIZE):
            for customer in find_customers(self.client, {"id_in": ",".join(chunk)}, fields=fields):
                found[str(customer["id"])] = customer.get("attributes") or {}
        return found

    def _write_one(self, item: WritebackItem, stored: Mapping[str, Any] | None) -> WritebackResult:
        ident = item.customer_id
        if stored is None:
            return WritebackResult(ident, WritebackStatus.FAILED, f"customer {ident} not found")
        attributes: dict[str, Any]
        if self.metadata_key is None:
            held = stored.get("reference")
            if not _empty(held):
                return self._skipped(ident, held == item.target_id)
            attributes = {"reference": item.target_id}
            if self.origin is not None:
                attributes["reference_origin"] = self.origin
        else:
            metadata = dict(stored.get("metadata") or {})
            held = metadata.get(self.metadata_key)
            if not _empty(held):
                return self._skipped(ident, held == item.target_id)
            metadata[self.metadata_key] = item.target_id
            attributes = {"metadata": metadata}
        try:
            self.client.request(
                "PATCH",
                f"/customers/{ident}",
                json={"data": {"type": "customers", "id": ident, "attributes": attributes}},
                kind="write",
            )
        except AuthError:
            raise
        except ApiError as exc:
            return WritebackResult(ident, WritebackStatus.FAILED, api_message(exc))
        return WritebackResult(ident, WritebackStatus.WRITTEN)

    def _skipped(self, ident: str, same: bool) -> WritebackResult:
        detail = "set already" if same else "set already, to another value (left as it is)"
        return WritebackResult(ident, WritebackStatus.SKIPPED, f"{self.field} is {detail}")


def _chunks(values: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
