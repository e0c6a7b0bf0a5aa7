"""The ``commercelayer`` source: customers read from the API, incrementally by
``updated_at``, resumably, and never more than 25 a page.

A read freezes a window of ``updated_at`` — from the job's lower bound to the server's
clock (its ``Date`` header) at the start — and walks it by id, asking each time for the
records after the last id the server returned (``filter[q][id_gt]``, sorted by id), as
Commerce Layer's own "fetch everything" helper does. Records that change during the read
leave the window and are read by the next run, which starts below this window's end; ties
on ``updated_at`` cannot be lost because the walk does not page by time. The window and
the last id are the source's cursor, checkpointed after each committed batch, so a failed
or killed run resumes where it stopped. A full read (no lower bound) of more than
``export_threshold`` records reads the same window through the Exports API instead
(``exports.py``), checkpointing after each id range.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr

from custsync.commercelayer.client import CommerceLayerClient, Kind, base_url_for
from custsync.commercelayer.exports import ExportBackfill
from custsync.errors import ConfigError
from custsync.model import ATTRIBUTES, RELATIONSHIPS, iter_records
from custsync.sources.base import Checkpoint, RawRecord, SourceBatch, SourceSettings

log = logging.getLogger("custsync.commercelayer")

PAGE_SIZE = 25  # the API's maximum: never ask for more
INCLUDABLE = ("customer_group",)


class ConnectionSettings(BaseModel):
    """How to reach one organisation's API: shared by the source and the target."""

    organization: str | None = None
    base_url: str | None = None
    auth_url: str = "https://auth.commercelayer.io/oauth/token"
    client_id: str
    client_secret: SecretStr
    scope: str | None = None
    # The rate limits to pace to; default: learnt from the token or the records (test
    # limits until then). requests_per_minute / burst_per_10s override the table.
    mode: Literal["test", "live"] | None = None
    requests_per_minute: int | None = Field(default=None, ge=1)
    burst_per_10s: int | None = Field(default=None, ge=1)
    timeout: float = Field(default=30.0, gt=0)
    max_retry_time: float = Field(default=120.0, ge=0)


class CommerceLayerSettings(SourceSettings, ConnectionSettings):
    connector: Literal["commercelayer"] = "commercelayer"
    # A full read of more than this many records goes through the Exports API (0 = never).
    export_threshold: int = Field(default=10_000, ge=0)
    export_size: int = Field(default=5_000, ge=1, le=10_000)
    exports_in_flight: int = Field(default=3, ge=1, le=10)
    page_size: int = Field(default=PAGE_SIZE, ge=1, le=PAGE_SIZE)


def make_client(settings: ConnectionSettings, **options: Any) -> CommerceLayerClient:
    limits = None
    if settings.requests_per_minute or settings.burst_per_10s:
        per_minute = settings.requests_per_minute or 100
        burst = settings.burst_per_10s or max(1, per_minute // 4)
        rule = ((per_minute, 60.0), (burst, 10.0))
        limits = {"read": rule, "write": rule}
    kinds: dict[Kind, Any] | None = limits  # type: ignore[assignment]
    return CommerceLayerClient(
        base_url=base_url_for(settings.organization, settings.base_url),
        auth_url=settings.auth_url,
        client_id=settings.client_id,
        client_secret=settings.client_secret,
        scope=settings.scope,
        mode=settings.mode,
        timeout=settings.timeout,
        max_retry_time=settings.max_retry_time,
        limits=kinds,
        **options,
    )


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


class CommerceLayerSource:
    """Reads customers from the API. See the module docstring for how."""

    def __init__(
        self,
        settings: CommerceLayerSettings,
        *,
        base_dir: Path | None = None,
        client: CommerceLayerClient | None = None,
    ) -> None:
        self.settings = settings
        self.client = client or make_client(settings)
        self._fields: list[str] | None = None
        self._include: list[str] = []
        self._group_fields: list[str] | None = None

    def __repr__(self) -> str:
        return f"CommerceLayerSource({self.client.base_url})"

    def project(self, paths: Collection[str]) -> None:
        """Ask only for the attributes the mapping reads (plus what validation and the
        incremental read need), and include customer_group when a path reaches into it."""
        attributes = {"email", "updated_at"}
        group_fields: set[str] = set()
        for path in paths:
            root, _, rest = path.partition(".")
            if root in ATTRIBUTES and root != "password":
                attributes.add(root)
            elif root in RELATIONSHIPS:
                if root not in INCLUDABLE:
                    raise ConfigError(
                        f"the commercelayer source includes {', '.join(INCLUDABLE)} only; "
                        f"{root!r} cannot be read",
                        key="mapping",
                    )
                attributes.add(root)
                if root not in self._include:
                    self._include.append(root)
                field = rest.split(".", 1)[0]
                if field and field not in ("id", "type"):
                    group_fields.add(field)
            elif root not in ("id", "type", "links", "meta"):
                return  # something the source cannot narrow: ask for everything
        self._fields = sorted(attributes)
        self._group_fields = sorted(group_fields) or None

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"sort": "id", "page[size]": self.settings.page_size}
        if self._fields is not None:
            params["fields[customers]"] = ",".join(self._fields)
        if self._include:
            params["include"] = ",".join(self._include)
            if self._group_fields is not None:
                params["fields[customer_groups]"] = ",".join(self._group_fields)
        return params

    def check(self) -> list[str]:
        document = self.client.get("/customers", {"page[size]": 1, "fields[customers]": "id"})
        count = (document.get("meta") or {}).get("record_count")
        data = document.get("data") or [{}]
        self.client.learn_mode((data[0].get("meta") or {}).get("mode"))
        mode = self.client.mode or "unknown"
        return [f"reached {self.client.base_url}: {count} customers ({mode} mode)"]

    def read(
        self,
        *,
        since: datetime | None,
        cursor: Mapping[str, Any] | None,
        batch_size: int,
    ) -> Iterator[SourceBatch]:
        if cursor and cursor.get("mode") == "export":
            end = _parse(cursor["window"][1])
            after = cursor.get("last_boundary")
            if end is not None:
                log.info("resuming the export backfill up to %s after id %s", _iso(end), after)
                return self._backfill(end, after, batch_size)
        if cursor and cursor.get("window"):
            start, end = cursor["window"]
            window = (_parse(start), _parse(end))
            last_id = cursor.get("last_id")
            log.info("resuming the read of window %s .. %s after id %s", start, end, last_id)
        else:
            window = (since, None)
            last_id = None
        return self._walk(window, last_id, batch_size)

    def _walk(
        self,
        window: tuple[datetime | None, datetime | None],
        last_id: str | None,
        batch_size: int,
    ) -> Iterator[SourceBatch]:
        start, end = window
        if end is None:
            # The window's end is the server's clock now, taken from the same answer that
            # says how many records the window holds.
            probe = self.client.get(
                "/customers",
                {
                    "page[size]": 1,
                    "fields[customers]": "id",
                    **({"filter[q][updated_at_gteq]": _iso(start)} if start else {}),
                },
            )
            end = self.client.server_time or datetime.now(UTC)
            total = (probe.get("meta") or {}).get("record_count")
            first = (probe.get("data") or [{}])[0]
            self.client.learn_mode(
                (first.get("meta") or {}).get("mode")
            )  # pace the first page right
            log.info(
                "reading customers updated %s .. %s (about %s)",
                _iso(start) if start else "ever",
                _iso(end),
                total,
            )
            threshold = self.settings.export_threshold
            if start is None and threshold and isinstance(total, int) and total > threshold:
                yield from self._backfill(end, None, batch_size)
                return
        base = self._params()
        if start is not None:
            base["filter[q][updated_at_gteq]"] = _iso(start)
        base["filter[q][updated_at_lteq]"] = _iso(end)
        window_cursor = [_iso(start) if start else None, _iso(end)]
        records: list[RawRecord] = []
        page_no = 0
        while True:
            params = dict(base)
            if last_id is not None:
                params["filter[q][id_gt]"] = last_id
            document = self.client.get("/customers", params)
            data = document.get("data") or []
            page_no += 1
            for index, record in enumerate(iter_records(document)):
                records.append(
                    RawRecord(
                        record, f"{self.client.base_url}/customers#{record.get('id') or index}"
                    )
                )
            if data:
                # The cursor is the last id the server returned, never a local max():
                # ids are ordered by the server's collation.
                last_id = str(data[-1]["id"])
                if self.client.mode is None:
                    self.client.learn_mode((data[-1].get("meta") or {}).get("mode"))
            done = len(data) < self.settings.page_size or not (document.get("links") or {}).get(
                "next"
            )
            if len(records) >= batch_size or (done and records):
                yield SourceBatch(
                    records,
                    Checkpoint(None, {"window": window_cursor, "last_id": last_id}),
                )
                records = []
            if done:
                break
        # The whole window is read: the watermark moves to its end and the cursor clears.
        yield SourceBatch([], Checkpoint(end, None))

    def _backfill(self, end: datetime, after: str | None, batch_size: int) -> Iterator[SourceBatch]:
        """A full read of more than ``export_threshold`` records: through exports."""
        backfill = ExportBackfill(
            self.client,
            end=end,
            size=self.settings.export_size,
            in_flight=self.settings.exports_in_flight,
            fields=self._fields,
            includes=self._include,
        )
        return backfill.read(after, batch_size=batch_size)

    def ids(self) -> Iterator[str]:
        return customer_ids(self)

    def close(self) -> None:
        self.client.close()


def customer_ids(source: CommerceLayerSource) -> Iterator[str]:
    """Every customer id the credentials can see, by keyset (``fields[customers]=id``),
    for ``custsync reconcile``: deletions are invisible to an updated_at scan."""
    last_id: str | None = None
    while True:
        params: dict[str, Any] = {
            "sort": "id",
            "page[size]": PAGE_SIZE,
            "fields[customers]": "id",
        }
        if last_id is not None:
            params["filter[q][id_gt]"] = last_id
        document = source.client.get("/customers", params)
        data = document.get("data") or []
        for item in data:
            yield str(item["id"])
        if len(data) < PAGE_SIZE or not (document.get("links") or {}).get("next"):
            return
        last_id = str(data[-1]["id"])
