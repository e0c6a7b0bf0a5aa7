"""A full read of a large window through the Exports API: the window split by id range
into export jobs of at most ``export_size`` records, a few in flight, read in id order.

How a range is bounded without knowing the ids: one list request per range asks for the
single record at position ``export_size`` after the previous boundary
(``page[size]=1&page[number]=<export_size>&sort=id``, filtered by ``id_gt`` and the
window's ``updated_at_lteq``); its id closes the range, and ``meta.record_count`` says
when what is left fits in one last, open-ended range. Paging by number is safe here
because it only picks where a range ends: the ranges are contiguous (``id_gt`` the
previous boundary, ``id_lteq`` this one, both compared by the server's collation), so
together they cover every id whatever the boundaries are. The window is frozen at its
end (the server's clock) and no record can enter it afterwards (an edit moves
``updated_at`` past the end), so a range can only shrink between its probe and its
export, never grow past ``export_size``; a record edited meanwhile leaves the window
and is read by the next incremental run, which starts below the window's end.
"""

from __future__ import annotations

import gzip
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from custsync.commercelayer.client import ApiError, CommerceLayerClient
from custsync.errors import SourceError
from custsync.model import RELATIONSHIPS, from_flat
from custsync.sources.base import Checkpoint, RawRecord, SourceBatch

log = logging.getLogger("custsync.commercelayer")

MAX_ATTEMPTS = 2  # a failed or interrupted export is created once more, then the read fails
MAX_LINK_REFRESHES = 3  # an attachment link refused this often in a row is not a stale link
TERMINAL_FAILURES = ("failed", "interrupted")


class ExportError(SourceError):
    """An export could not be completed or read; the read stops at the last committed
    range and the next run resumes there."""


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def export_fields(fields: Sequence[str] | None) -> list[str] | None:
    """The list API's sparse fieldset as an export's ``fields``: an export names a
    relationship by its foreign key (``customer_group_id``)."""
    if fields is None:
        return None
    out = ["id"]
    for name in fields:
        out.append(f"{name}_id" if name in RELATIONSHIPS else name)
    return out


@dataclass
class _Range:
    """Records with ``after`` < id <= ``upto`` (no bound where None), and the export
    that reads them."""

    after: str | None
    upto: str | None
    export_id: str | None = None
    attempts: int = 0
    done: bool = False  # seen completed (or empty): it no longer holds a slot
    empty: bool = False  # nothing left to export in it
    payload: bytes | None = None  # the attachment, downloaded as soon as it was ready

    def __str__(self) -> str:
        return f"ids ({self.after or '-'} .. {self.upto or '-'}]"


class ExportBackfill:
    """Reads the window ``updated_at <= end`` through exports, resuming after ``after``."""

    def __init__(
        self,
        client: CommerceLayerClient,
        *,
        end: datetime,
        size: int,
        in_flight: int,
        fields: Sequence[str] | None,
        includes: Sequence[str],
        poll_initial: float = 0.25,
        poll_max: float = 10.0,
        max_wait: float = 3600.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.end = end
        self.size = size
        self.in_flight = in_flight
        self.fields = export_fields(fields)
        self.includes = list(includes)
        self.poll_initial, self.poll_max, self.max_wait = poll_initial, poll_max, max_wait
        self._sleep, self._clock = sleep, clock
        self._meta: dict[str, Any] | None = None

    def read(self, after: str | None, *, batch_size: int) -> Iterator[SourceBatch]:
        """Batches in id order; the last batch of each range checkpoints its upper
        boundary, and the read ends with the window's end as the watermark."""
        window = [None, _iso(self.end)]
        queue: deque[_Range] = deque()
        next_after, exhausted = after, False
        while True:
            # Keep the slots full before waiting: the server works on them meanwhile.
            while not exhausted and sum(not r.done for r in queue) < self.in_flight:
                span = self._next_range(next_after)
                if span is None:
                    exhausted = True
                    break
                self._create(span)
                queue.append(span)
                if span.upto is None:
                    exhausted = True
                else:
                    next_after = span.upto
            if not queue:
                break
            head = queue[0]
            if head.payload is None:
                head.payload = self._wait_and_download(head)
                head.done = True
                continue  # its slot is free: start the next export before yielding
            queue.popleft()
            records = self._records(head, head.payload)
            cursor = {"window": window, "mode": "export", "last_boundary": head.upto}
            last = head.upto is None
            log.info("export %s: %d customers in %s", head.export_id, len(records), head)
            for start in range(0, max(len(records), 1), batch_size):
                chunk = records[start : start + batch_size]
                final_chunk = start + batch_size >= len(records)
                checkpoint = Checkpoint(None, cursor) if final_chunk and not last else None
                if chunk or checkpoint is not None:
                    yield SourceBatch(chunk, checkpoint)
        # The whole window is read: the next run continues incrementally from its end.
        yield SourceBatch([], Checkpoint(self.end, None))

    # --- ranges -------------------------------------------------------------------------

    def _window_filters(self, after: str | None) -> dict[str, Any]:
        params: dict[str, Any] = {"filter[q][updated_at_lteq]": _iso(self.end)}
        if after is not None:
            params["filter[q][id_gt]"] = after
        return params

    def _next_range(self, after: str | None) -> _Range | None:
        """The range that starts after ``after``: one request for its upper boundary."""
        document = self.client.get(
            "/customers",
            {
                "sort": "id",
                "fields[customers]": "id",
                "page[size]": 1,
                "page[number]": self.size,
                **self._window_filters(after),
            },
        )
        remaining = (document.get("meta") or {}).get("record_count")
        data = document.get("data") or []
        if data and self.client.mode is None:
            self.client.learn_mode((data[0].get("meta") or {}).get("mode"))
        if remaining == 0:
            return None
        if not data or (isinstance(remaining, int) and remaining <= self.size):
            return _Range(after, None)
        return _Range(after, str(data[0]["id"]))

    def _filters(self, span: _Range) -> dict[str, Any]:
        filters: dict[str, Any] = {"updated_at_lteq": _iso(self.end)}
        if span.after is not None:
            filters["id_gt"] = span.after
        if span.upto is not None:
            filters["id_lteq"] = span.upto
        return filters

    def _create(self, span: _Range) -> None:
        attributes: dict[str, Any] = {
            "resource_type": "customers",
            "format": "json",
            "filters": self._filters(span),
        }
        if self.fields is not None:
            attributes["fields"] = self.fields
        if self.includes:
            attributes["includes"] = self.includes
        span.attempts += 1
        try:
            response = self.client.request(
                "POST", "/exports", json={"data": {"type": "exports", "attributes": attributes}}
            )
        except ApiError as exc:
            if exc.status == 422 and self._is_empty(span):
                # Every record of the range left the window since its probe: the API
                # refuses an export that matches nothing.
                span.empty = span.done = True
                span.export_id = None
                return
            raise ExportError(f"the export of customers {span} was refused: {exc}") from exc
        data = response.json()["data"]
        span.export_id = str(data["id"])
        span.done = False
        log.debug("export %s created for %s", span.export_id, span)

    def _is_empty(self, span: _Range) -> bool:
        params = {"page[size]": 1, "fields[customers]": "id", **self._window_filters(span.after)}
        if span.upto is not None:
            params["filter[q][id_lteq]"] = span.upto
        document = self.client.get("/customers", params)
        return (document.get("meta") or {}).get("record_count") == 0

    # --- one export ---------------------------------------------------------------------

    def _wait_and_download(self, span: _Range) -> bytes:
        """Poll the range's export until it completes, then download its attachment at
        once; a stale link is renewed by retrieving the export again."""
        if span.empty:
            return b""
        delay, refreshes = self.poll_initial, 0
        deadline = self._clock() + self.max_wait
        while True:
            try:
                document = self.client.get(f"/exports/{span.export_id}")
            except ApiError as exc:
                if exc.status != 404:
                    raise ExportError(f"export {span.export_id} could not be read: {exc}") from exc
                document = {"data": {"attributes": {"status": "interrupted"}}}
            data = document.get("data") or {}
            attributes = data.get("attributes") or {}
            status = attributes.get("status")
            if status == "completed":
                if self._meta is None and isinstance(data.get("meta"), dict):
                    self._meta = data["meta"]
                    if self.client.mode is None:
                        self.client.learn_mode(self._meta.get("mode"))
                url = attributes.get("attachment_url")
                if not url:
                    raise ExportError(f"export {span.export_id} completed without an attachment")
                try:
                    return self.client.download(str(url))
                except ApiError as exc:
                    # A presigned link lives a few minutes: retrieve the export for a new one.
                    refreshes += 1
                    if refreshes > MAX_LINK_REFRESHES:
                        raise ExportError(
                            f"the attachment of export {span.export_id} was refused "
                            f"{refreshes} times ({exc.status})"
                        ) from exc
                    log.info("attachment link of export %s refused; renewing it", span.export_id)
                    continue
            if status in TERMINAL_FAILURES:
                failed = span.export_id
                if span.attempts >= MAX_ATTEMPTS:
                    raise ExportError(
                        f"export {failed} of customers {span} {status}, "
                        f"also after {span.attempts} attempts"
                    )
                log.warning("export %s of customers %s %s; creating it again", failed, span, status)
                self._create(span)
                if span.empty:
                    return b""
                delay, deadline = self.poll_initial, self._clock() + self.max_wait
                continue
            if self._clock() >= deadline:
                raise ExportError(
                    f"export {span.export_id} still {status} after {self.max_wait:.0f}s"
                )
            self._sleep(delay)
            delay = min(delay * 2, self.poll_max)

    def _records(self, span: _Range, payload: bytes) -> list[RawRecord]:
        if not payload:
            return []
        # The attachment is gzipped JSON, unless the HTTP client decoded it already
        # (served with Content-Encoding: gzip).
        if payload[:2] == b"\x1f\x8b":
            try:
                payload = gzip.decompress(payload)
            except (OSError, EOFError) as exc:
                raise ExportError(f"export {span.export_id}: a corrupt attachment") from exc
        try:
            flat = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise ExportError(f"export {span.export_id}: the attachment is not JSON") from exc
        if not isinstance(flat, list):
            raise ExportError(f"export {span.export_id}: the attachment is not a JSON array")
        origin = f"{self.client.base_url}/exports/{span.export_id}"
        records = []
        for index, item in enumerate(flat):
            if not isinstance(item, dict):
                records.append(
                    RawRecord(
                        {"_raw": orjson.dumps(item).decode()}, f"{origin}#{index}", "not an object"
                    )
                )
                continue
            records.append(RawRecord(self._customer(item), f"{origin}#{item.get('id') or index}"))
        return records

    def _customer(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        """A flat export record in the shape the list API gives: what the flat form leaves
        out (``type``, ``links.self``, ``meta``) is what the API would say for it."""
        record = from_flat(flat)
        record.setdefault("type", "customers")
        ident = record.get("id")
        if ident is not None and "links" not in record:
            record["links"] = {"self": f"{self.client.base_url}/customers/{ident}"}
        if "meta" not in record:
            # The export belongs to the same organisation and mode as its records.
            meta = {k: v for k, v in (self._meta or {}).items() if k in ("mode", "organization_id")}
            if not meta.get("mode") and self.client.mode:
                meta["mode"] = self.client.mode
            if meta:
                record["meta"] = meta
        for name in self.includes:
            related = record.get(name)
            if isinstance(related, dict):
                related.setdefault("type", name if name.endswith("s") else name + "s")
        return record
