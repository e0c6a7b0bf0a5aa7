"""A strict fake of the Commerce Layer API: a real HTTP server on 127.0.0.1 for connector tests.

It serves the contract in the team's commercelayer-api.md notes and refuses what they do
not allow (oversized pages, unknown filters, missing headers); faults and throttling on demand.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import hashlib
import io
import random
import re
import secrets
import socket
import socketserver
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

import orjson

from custsync._fake import customer_groups, make_customers

__all__ = ["Export", "FakeCommerceLayer", "Import", "Request"]

JSONAPI: Final = "application/vnd.api+json"
DEFAULT_PAGE_SIZE: Final = 10
MAX_PAGE_SIZE: Final = 25
MAX_EXPORT_RECORDS: Final = 10_000
MAX_ACTIVE_EXPORTS: Final = 10
MAX_IMPORT_INPUTS: Final = 10_000
IMPORT_ERROR_RATIO: Final = 0.10
ORGANIZATION_ID: Final = "WnqRzhBlae"

# (limit, window in seconds), per the rate-limit table; windows shrink by rate_limit_scale.
TOKEN_LIMIT: Final = (30, 60.0)
RATE_LIMITS: Final[Mapping[str, Mapping[str, tuple[int, float]]]] = {
    "live": {
        "reads": (200, 60.0),
        "read_burst": (50, 10.0),
        "writes": (200, 60.0),
        "write_burst": (50, 10.0),
    },
    "test": {
        "reads": (100, 60.0),
        "read_burst": (25, 10.0),
        "writes": (100, 60.0),
        "write_burst": (25, 10.0),
    },
}

CUSTOMER_ATTRIBUTES: Final = (
    "email",
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
CUSTOMER_RELATIONSHIPS: Final = (
    "customer_group",
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
GROUP_ATTRIBUTES: Final = (
    "name",
    "code",
    "created_at",
    "updated_at",
    "reference",
    "reference_origin",
    "metadata",
)
GROUP_RELATIONSHIPS: Final = ("customers", "markets")
WRITABLE: Final = (
    "email",
    "password",
    "shopper_reference",
    "profile_id",
    "tax_exemption_code",
    "reference",
    "reference_origin",
    "metadata",
)
_TEXT_ATTRIBUTES: Final = (
    "password",
    "shopper_reference",
    "profile_id",
    "tax_exemption_code",
    "reference",
    "reference_origin",
)
# Update-only triggers: accepted on PATCH and ignored.
TRIGGERS: Final = ("_add_tags", "_remove_tags", "_request_anonymization", "_cancel_anonymization")
SORTABLE: Final = (
    "id",
    "email",
    "status",
    "total_orders_count",
    "reference",
    "reference_origin",
    "created_at",
    "updated_at",
)
FILTERABLE: Final[Mapping[str, str]] = {
    "id": "string",
    "email": "string",
    "status": "string",
    "total_orders_count": "integer",
    "created_at": "timestamp",
    "updated_at": "timestamp",
    "reference": "string",
    "reference_origin": "string",
    "metadata": "json",
    "customer_group_id": "string",
}
PREDICATES: Final = (
    "eq",
    "not_eq",
    "gt",
    "gteq",
    "lt",
    "lteq",
    "in",
    "not_in",
    "null",
    "not_null",
    "present",
    "blank",
    "cont",
    "start",
    "end",
    "jcont",
)
_PRESENCE = ("null", "not_null", "present", "blank")
_ORDERED = ("eq", "not_eq", "gt", "gteq", "lt", "lteq", "in", "not_in")
_ALLOWED_PREDICATES: Final[Mapping[str, frozenset[str]]] = {
    "string": frozenset((*_ORDERED, *_PRESENCE, "cont", "start", "end")),
    "integer": frozenset((*_ORDERED, *_PRESENCE)),
    "timestamp": frozenset((*_ORDERED, *_PRESENCE)),
    "json": frozenset((*_PRESENCE, "jcont")),
}
# Filter keys sorted longest first, so reference_origin_eq is not read as reference + origin_eq.
_FILTER_ATTRIBUTES = sorted(FILTERABLE, key=len, reverse=True)
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_ID_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TRUE = frozenset(("true", "t", "1", "yes"))
_FALSE = frozenset(("false", "f", "0", "no"))
_ROUTES: Final = (
    (re.compile(r"/api/customers"), "/api/customers"),
    (re.compile(r"/api/customers/([^/]+)"), "/api/customers/:id"),
    (re.compile(r"/api/exports"), "/api/exports"),
    (re.compile(r"/api/exports/([^/]+)"), "/api/exports/:id"),
    (re.compile(r"/api/imports"), "/api/imports"),
    (re.compile(r"/api/imports/([^/]+)"), "/api/imports/:id"),
)
_METHODS: Final[Mapping[str, tuple[str, ...]]] = {
    "/api/customers": ("GET", "POST"),
    "/api/customers/:id": ("GET", "PATCH", "DELETE"),
    "/api/exports": ("POST",),
    "/api/exports/:id": ("GET",),
    "/api/imports": ("POST",),
    "/api/imports/:id": ("GET",),
}
_ATTACHMENT = re.compile(r"/attachments/([A-Za-z0-9_-]+)\.(json|csv)\.gz")
_MISSING: Final = object()


# --- public records --------------------------------------------------------------------


@dataclass
class Request:
    """One request as the fake received it; ``status`` is 0 until answered and for drops."""

    method: str
    path: str
    query: dict[str, str]  # decoded, raw bracket keys: {"filter[q][id_gt]": "abc"}
    headers: dict[str, str]  # lower-cased names
    body: bytes
    time: float  # time.monotonic() on arrival
    at: datetime  # the fake's clock on arrival
    status: int = 0

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None


@dataclass
class Export:
    """An export job; ``status`` moves on lazily, when the fake next looks at it."""

    id: str
    format: str
    filters: dict[str, Any]
    fields: list[str] | None
    includes: list[str]
    records_count: int
    created_at: str
    starts: float  # monotonic instants of the two transitions
    completes: float
    status: str = "pending"
    started_at: str | None = None
    completed_at: str | None = None
    updated_at: str = ""
    payload: bytes = b""  # the gzipped attachment, once completed
    failed: bool = False


@dataclass
class Import:
    """An import job; its inputs are applied all at once when it completes."""

    id: str
    inputs: list[Any]
    skip_errors: bool
    created_at: str
    starts: float
    completes: float
    status: str = "pending"
    started_at: str | None = None
    completed_at: str | None = None
    interrupted_at: str | None = None
    updated_at: str = ""
    processed_count: int = 0
    errors_count: int = 0
    warnings_count: int = 0
    errors_log: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    warnings_log: dict[str, dict[str, list[str]]] = field(default_factory=dict)


# --- internals -------------------------------------------------------------------------


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


class _Failure(Exception):
    """Any answer but success, raised below the router and turned into an error document."""

    def __init__(
        self, status: int, errors: list[dict[str, Any]], headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(status)
        self.status = status
        self.errors = errors
        self.headers = dict(headers or {})


class _FilterError(Exception):
    def __init__(self, key: str, detail: str, code: str = "FILTER_NOT_ALLOWED") -> None:
        super().__init__(detail)
        self.key = key
        self.detail = detail
        self.code = code


@dataclass
class _Fault:
    remaining: int
    status: int
    path_prefix: str
    drop: bool


@dataclass
class _Token:
    expires_at: datetime
    scope: str
    revoked: bool = False


@dataclass
class _Grant:
    export_id: str
    signature: str
    expires: float


class _Window:
    """A sliding-window log: at most ``limit`` admitted requests in any ``interval`` seconds."""

    def __init__(self, limit: int, interval: float) -> None:
        self.limit = limit
        self.interval = interval
        self._times: deque[float] = deque()

    def full(self, now: float) -> bool:
        while self._times and self._times[0] <= now - self.interval:
            self._times.popleft()
        return len(self._times) >= self.limit

    def add(self, now: float) -> None:
        self._times.append(now)


def _error(
    status: int,
    code: str,
    detail: str,
    *,
    title: str | None = None,
    pointer: str | None = None,
    parameter: str | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    source: dict[str, str] = {}
    if pointer is not None:
        source["pointer"] = pointer
    if parameter is not None:
        source["parameter"] = parameter
    item: dict[str, Any] = {
        "title": title or HTTPStatus(status).phrase,
        "detail": detail,
        "code": code,
        "status": str(status),
        "source": source,
    }
    if meta:
        item["meta"] = meta
    return item


def _fail(status: int, code: str, detail: str, **kwargs: Any) -> _Failure:
    return _Failure(status, [_error(status, code, detail, **kwargs)])


_MESSAGE_KEYS = {
    "can't be blank": "blank",
    "is invalid": "invalid",
    "has already been taken": "taken",
}


def _validation_failure(problems: list[tuple[str, str]], prefix: str) -> _Failure:
    return _Failure(
        422,
        [
            _error(
                422,
                "VALIDATION_ERROR",
                message,
                title=f"{name} {message}",
                pointer=f"{prefix}/{name}",
                meta={"error": _MESSAGE_KEYS.get(message, "invalid")},
            )
            for name, message in problems
        ],
    )


def _iso(moment: datetime) -> str:
    """Commerce Layer's form: UTC, milliseconds, ``Z``."""
    moment = moment.astimezone(UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def _instant(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _status_for(orders: int) -> str:
    return "prospect" if orders == 0 else "acquired" if orders == 1 else "repeat"


def _group_id(customer: Mapping[str, Any]) -> str | None:
    relationship = (customer.get("relationships") or {}).get("customer_group") or {}
    linkage = relationship.get("data")
    return str(linkage["id"]) if isinstance(linkage, dict) and linkage.get("id") else None


def _email_key(email: Any) -> str | None:
    return email.strip().lower() if isinstance(email, str) and email.strip() else None


def _copy(value: Any) -> Any:
    return orjson.loads(orjson.dumps(value))


def _interval_text(seconds: float) -> str:
    return f"{seconds:g}"


# --- filters ---------------------------------------------------------------------------

_Predicate = Callable[[Mapping[str, Any]], bool]


def _raw_value(customer: Mapping[str, Any], attribute: str) -> Any:
    if attribute == "id":
        return customer["id"]
    if attribute == "customer_group_id":
        return _group_id(customer)
    return (customer.get("attributes") or {}).get(attribute)


def _typed_value(customer: Mapping[str, Any], attribute: str) -> Any:
    value = _raw_value(customer, attribute)
    if value is not None and FILTERABLE.get(attribute) == "timestamp":
        return _instant(value)
    return value


def _split_filter(key: str) -> tuple[str, str] | None:
    for attribute in _FILTER_ATTRIBUTES:
        if key.startswith(attribute + "_") and key[len(attribute) + 1 :] in PREDICATES:
            return attribute, key[len(attribute) + 1 :]
    return None


def _as_bool(key: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _FilterError(key, f"{raw!r} is not a valid value for {key}", "INVALID_FILTER_VALUE")


def _converter(key: str, kind: str) -> Callable[[Any], Any]:
    def convert(raw: Any) -> Any:
        try:
            if kind == "integer":
                if isinstance(raw, bool):
                    raise ValueError(raw)
                return int(raw)
            if kind == "timestamp":
                return _instant(str(raw))
            if isinstance(raw, dict | list):
                raise ValueError(raw)
            return str(raw)
        except ValueError:
            raise _FilterError(
                key, f"{raw!r} is not a valid value for {key}", "INVALID_FILTER_VALUE"
            ) from None

    return convert


def _contains(haystack: Any, needle: Any) -> bool:
    """PostgreSQL's jsonb ``@>``: objects by subset of keys, arrays by subset of elements."""
    if isinstance(needle, dict):
        return isinstance(haystack, dict) and all(
            key in haystack and _contains(haystack[key], value) for key, value in needle.items()
        )
    if isinstance(needle, list):
        return isinstance(haystack, list) and all(
            any(_contains(item, wanted) for item in haystack) for wanted in needle
        )
    if isinstance(haystack, list):
        # A top-level array contains a primitive it holds, as in PostgreSQL.
        return any(not isinstance(item, dict | list) and item == needle for item in haystack)
    if isinstance(haystack, bool) or isinstance(needle, bool):
        return haystack is needle
    return bool(haystack == needle)


def _is_blank(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, dict | list) and not value)


def _compile_filter(key: str, raw: Any) -> _Predicate:
    split = _split_filter(key)
    if split is None:
        raise _FilterError(key, f"{key} is not a valid filter for customers")
    attribute, predicate = split
    kind = FILTERABLE[attribute]
    if predicate not in _ALLOWED_PREDICATES[kind]:
        raise _FilterError(key, f"{predicate} is not a valid predicate for {attribute}")

    if predicate in _PRESENCE:
        wanted = _as_bool(key, raw)
        tests: dict[str, Callable[[Any], bool]] = {
            "null": lambda value: value is None,
            "not_null": lambda value: value is not None,
            "present": lambda value: not _is_blank(value),
            "blank": _is_blank,
        }
        test = tests[predicate]
        return lambda customer: test(_raw_value(customer, attribute)) == wanted

    if predicate == "jcont":
        try:
            needle = orjson.loads(raw) if isinstance(raw, str | bytes) else raw
        except orjson.JSONDecodeError:
            raise _FilterError(key, f"{key} needs a JSON value", "INVALID_FILTER_VALUE") from None
        return lambda customer: _contains(_raw_value(customer, attribute), needle)

    convert = _converter(key, kind)
    if predicate in ("in", "not_in"):
        items = raw if isinstance(raw, list) else str(raw).split(",") if str(raw) else []
        values = {convert(item) for item in items}
        inside = predicate == "in"

        # SQL semantics: NULL is neither IN nor NOT IN anything.
        def member(customer: Mapping[str, Any]) -> bool:
            value = _typed_value(customer, attribute)
            return value is not None and (value in values) == inside

        return member

    if predicate in ("cont", "start", "end"):
        # ILIKE, as ransack's matchers are on PostgreSQL: case-insensitive.
        fragment = convert(raw).lower()
        matchers: dict[str, Callable[[str], bool]] = {
            "cont": lambda text: fragment in text,
            "start": lambda text: text.startswith(fragment),
            "end": lambda text: text.endswith(fragment),
        }
        match = matchers[predicate]
        return lambda customer: (
            isinstance(value := _raw_value(customer, attribute), str) and match(value.lower())
        )

    operand = convert(raw)
    # Strings compare by code point, i.e. the server's "C" collation: that is how id_gt
    # orders the opaque ids, and how sort=id orders them too.
    compare: Callable[[Any], bool] = {
        "eq": lambda value: value == operand,
        "not_eq": lambda value: value != operand,
        "gt": lambda value: value > operand,
        "gteq": lambda value: value >= operand,
        "lt": lambda value: value < operand,
        "lteq": lambda value: value <= operand,
    }[predicate]
    # SQL semantics again: a comparison with NULL is never true (not_eq included).
    return lambda customer: (
        (value := _typed_value(customer, attribute)) is not None and compare(value)
    )


def _sort_key(customer: Mapping[str, Any], attribute: str) -> tuple[int, Any]:
    value = _typed_value(customer, attribute)
    # PostgreSQL puts NULLs last ascending and first descending; (1, 0) does both under reverse.
    return (1, 0) if value is None else (0, value)


# --- the server ------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, fake: FakeCommerceLayer) -> None:
        self.fake = fake
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name, which can stall; loopback needs none.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "127.0.0.1"
        self.server_port = self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that vanish mid-request are part of the game; anything else is a bug.
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, OSError):
            self.fake.server_errors.append(error)

    def drop_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already gone
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real API: clients reuse connections
    server_version = "FakeCommerceLayer/1.0"
    sys_version = ""
    timeout = 30

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's
        # algorithm holds the second for ~40 ms and every request looks slow.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _fake(self) -> FakeCommerceLayer:
        return cast(_Server, self.server).fake

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read fake.requests, not stderr

    def date_time_string(self, timestamp: float | None = None) -> str:
        # The Date header comes from the fake's clock: clients take it as the server's time.
        return format_datetime(self._fake().now(), usegmt=True)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        response = self._fake()._answer(self.command, self.path, headers, body)
        if response is None:
            self._drop()
            return
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            if response.content_type:
                self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            self.wfile.write(response.body)
        except OSError:
            self.close_connection = True  # the client went away

    def _drop(self) -> None:
        # An abrupt reset (RST, no response), as a crashed proxy or a cut link gives.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


# --- the fake --------------------------------------------------------------------------


class FakeCommerceLayer:
    """Commerce Layer's auth, customers, Exports and Imports on an ephemeral loopback port.

    Use it as a context manager. ``customers`` and ``groups`` hold resource objects as
    ``custsync._fake`` makes them; change them through the methods, which keep the
    timestamps honest. ``requests`` records every request with the status it got.
    """

    def __init__(
        self,
        *,
        mode: str = "test",
        latency: float = 0.0,
        client_id: str = "cid",
        client_secret: str = "csecret",
        token_ttl: int = 7200,
        clock: Callable[[], datetime] | None = None,
        rate_limits: bool = True,
        rate_limit_scale: float = 1.0,
        record_requests: bool = True,
        export_delay: float = 0.05,
        import_delay: float = 0.05,
        attachment_ttl: float = 300.0,
        attachment_content_encoding: str | None = None,
        seed: int = 0,
    ) -> None:
        if mode not in RATE_LIMITS:
            raise ValueError("mode must be 'test' or 'live'")
        if rate_limit_scale <= 0:
            raise ValueError("rate_limit_scale must be > 0")
        self.mode = mode
        self.latency = latency
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_ttl = token_ttl
        self._clock = clock or (lambda: datetime.now(UTC))
        self.rate_limits = rate_limits
        self.rate_limit_scale = rate_limit_scale
        self.record_requests = record_requests
        self.export_delay = export_delay
        self.import_delay = import_delay
        self.attachment_ttl = attachment_ttl
        # None: the attachment is served as gzip bytes (application/gzip). "gzip": served as
        # JSON/CSV with Content-Encoding: gzip, which HTTP clients may decompress for you.
        self.attachment_content_encoding = attachment_content_encoding
        self.organization_id = ORGANIZATION_ID

        self.customers: dict[str, dict[str, Any]] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.passwords: dict[str, str] = {}  # write-only: stored here, never served
        self.exports: dict[str, Export] = {}
        self.imports: dict[str, Import] = {}
        self.requests: list[Request] = []
        self.throttled = 0
        self.server_errors: list[BaseException] = []

        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._tokens: dict[str, _Token] = {}
        self._faults: list[_Fault] = []
        self._hooks: list[Callable[[Request], None]] = []
        self._windows: dict[str, _Window] = {}
        self._grants: dict[str, _Grant] = {}
        self._outage_until = 0.0
        self._outage_timer: threading.Timer | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._running = False

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> FakeCommerceLayer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is None and self.server_errors:
            raise RuntimeError(
                f"the fake failed internally {len(self.server_errors)} time(s)"
            ) from self.server_errors[0]

    def start(self) -> None:
        with self._lock:
            self._running = True
            self._listen()

    def stop(self) -> None:
        with self._lock:
            self._running = False
            if self._outage_timer is not None:
                self._outage_timer.cancel()
                self._outage_timer = None
        self._close_listener()

    def _listen(self) -> None:
        last_error: OSError | None = None
        for _ in range(50):
            try:
                server = _Server(self._port, self)
                break
            except OSError as exc:  # the old socket may linger for a moment after an outage
                last_error = exc
                time.sleep(0.02)
        else:
            raise RuntimeError(f"cannot listen on 127.0.0.1:{self._port}") from last_error
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"fake-commercelayer-{self._port}",
            daemon=True,
        )
        self._thread.start()

    def _close_listener(self) -> None:
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def port(self) -> int:
        return self._port

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/api"

    @property
    def auth_url(self) -> str:
        return f"{self.root_url}/oauth/token"

    def now(self) -> datetime:
        moment = self._clock()
        if moment.tzinfo is None:
            raise ValueError("the clock must return timezone-aware datetimes")
        return moment.astimezone(UTC)

    # --- data -----------------------------------------------------------------------------

    def add_groups(self, resources: Iterable[Mapping[str, Any]]) -> None:
        """customer_groups resources (``custsync._fake.customer_groups``) for ``include``."""
        with self._lock:
            for resource in resources:
                self.groups[str(resource["id"])] = _copy(resource)

    def add_customers(self, resources: Iterable[Mapping[str, Any]]) -> None:
        """Store customer resource objects as they are (``custsync._fake.make_customers``).

        A group they link to that is not in ``groups`` gets a placeholder, so ``include``
        never leaves a dangling linkage; ``add_groups`` first for the real group records.
        """
        with self._lock:
            for resource in resources:
                customer: dict[str, Any] = _copy(resource)
                if customer.get("type") != "customers" or not customer.get("id"):
                    raise ValueError("customers need an id and type 'customers'")
                attributes = customer.setdefault("attributes", {})
                for name in ("email", "created_at", "updated_at"):
                    if not attributes.get(name):
                        raise ValueError(f"customer {customer['id']} has no {name}")
                password = attributes.pop("password", None)
                if password:
                    self.passwords[customer["id"]] = str(password)
                if not self.customers and (customer.get("meta") or {}).get("organization_id"):
                    # One organization: what the fake creates belongs to the seeded one.
                    self.organization_id = str(customer["meta"]["organization_id"])
                group_id = _group_id(customer)
                if group_id is not None and group_id not in self.groups:
                    self.groups[group_id] = self._placeholder_group(group_id)
                self.customers[customer["id"]] = customer

    def seed_customers(self, n: int, *, seed: int = 0, groups: int = 4, **options: Any) -> None:
        """``n`` customers from ``make_customers`` in this fake's mode, with their groups."""
        with self._lock:
            self.add_groups(customer_groups(groups, seed=seed, mode=self.mode))
            self.add_customers(
                make_customers(n, seed=seed, mode=self.mode, groups=groups, **options)
            )

    def update_customer(self, id: str, *, at: datetime | None = None, **attributes: Any) -> None:
        """Edit a customer as another system would; ``updated_at`` becomes ``at`` (default:
        the fake's clock). ``customer_group_id=`` moves it to another group (or none)."""
        if at is not None and at.tzinfo is None:
            raise ValueError("at must be timezone-aware")
        with self._lock:
            customer = self.customers[id]
            current = customer.setdefault("attributes", {})
            for name, value in attributes.items():
                if name == "customer_group_id":
                    self._set_group(customer, value)
                elif name == "password":
                    self.passwords[id] = str(value)
                    current["has_password"] = True
                else:
                    current[name] = _copy(value)
            if "total_orders_count" in attributes and "status" not in attributes:
                current["status"] = _status_for(int(attributes["total_orders_count"]))
            current["updated_at"] = _iso(at or self.now())

    def delete_customer(self, id: str) -> None:
        with self._lock:
            del self.customers[id]
            self.passwords.pop(id, None)

    # --- faults and control ---------------------------------------------------------------

    def fail_next(
        self, n: int, *, status: int = 503, path_prefix: str = "/api/customers", drop: bool = False
    ) -> None:
        """The next ``n`` requests whose path starts with ``path_prefix`` answer ``status``
        with an error document, or lose their connection without an answer (``drop``)."""
        with self._lock:
            self._faults.append(_Fault(n, status, path_prefix, drop))

    def expire_tokens(self) -> None:
        """Every token issued so far now answers 401 INVALID_TOKEN."""
        with self._lock:
            for token in self._tokens.values():
                token.revoked = True

    def expire_attachments(self) -> None:
        """Every attachment URL issued so far now answers 403, as an expired S3 link does."""
        with self._lock:
            for grant in self._grants.values():
                grant.expires = 0.0

    def fail_export(self, id: str) -> None:
        with self._lock:
            self.exports[id].failed = True

    def reset_rate_limits(self) -> None:
        with self._lock:
            self._windows.clear()

    def on_request(self, hook: Callable[[Request], None]) -> None:
        """Call ``hook`` before each ``/api/`` request is served (outside the fake's lock,
        so it may change data, start an outage or queue a fault for this very request)."""
        with self._lock:
            self._hooks.append(hook)

    def outage(self, seconds: float) -> None:
        """For ``seconds``, refuse connections (the port is closed) and drop open ones."""
        with self._lock:
            self._outage_until = max(self._outage_until, time.monotonic() + seconds)
            if self._outage_timer is not None:
                self._outage_timer.cancel()
            self._outage_timer = threading.Timer(
                max(self._outage_until - time.monotonic(), 0.0), self._end_outage
            )
            self._outage_timer.daemon = True
            self._outage_timer.start()
        # Hooks run on connection threads, never on the accepting one, so this cannot
        # wait for itself.
        self._close_listener()

    def _end_outage(self) -> None:
        with self._lock:
            if not self._running or self._server is not None:
                return
            remaining = self._outage_until - time.monotonic()
            if remaining > 0:
                self._outage_timer = threading.Timer(remaining, self._end_outage)
                self._outage_timer.daemon = True
                self._outage_timer.start()
                return
            self._outage_timer = None
            self._listen()

    def _in_outage(self) -> bool:
        return time.monotonic() < self._outage_until

    # --- request handling -----------------------------------------------------------------

    def _answer(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> _Response | None:
        """The response to one request, or None to drop the connection."""
        split = urlsplit(target)
        path = split.path
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        request = Request(method, path, query, headers, body, time.monotonic(), self.now())
        if self.record_requests:
            with self._lock:
                self.requests.append(request)
        if self._in_outage():
            return None
        try:
            if path.startswith("/api/"):
                for hook in list(self._hooks):
                    hook(request)
                if self._in_outage():
                    return None
            fault = self._take_fault(path)
            if fault is not None and fault.drop:
                return None
            if fault is not None:
                response = self._fault_response(fault.status, path)
            else:
                if self.latency:
                    time.sleep(self.latency)
                with self._lock:
                    response = self._route(method, path, query, headers, body)
        except _Failure as failure:
            response = self._failure_response(failure, path)
        except Exception as exc:  # noqa: BLE001 - a bug in the fake or a hook: 500, and __exit__ raises
            self.server_errors.append(exc)
            response = self._failure_response(
                _fail(500, "INTERNAL_SERVER_ERROR", f"the fake failed: {exc!r}"), path
            )
        request.status = response.status
        return response

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and path.startswith(fault.path_prefix):
                    fault.remaining -= 1
                    self._faults = [f for f in self._faults if f.remaining > 0]
                    return fault
        return None

    def _fault_response(self, status: int, path: str) -> _Response:
        codes = {
            400: "BAD_REQUEST",
            401: "INVALID_TOKEN",
            403: "FORBIDDEN",
            404: "RECORD_NOT_FOUND",
            409: "CONFLICT",
            422: "VALIDATION_ERROR",
            429: "TOO_MANY_REQUESTS",
            500: "INTERNAL_SERVER_ERROR",
            502: "BAD_GATEWAY",
            503: "SERVICE_UNAVAILABLE",
            504: "GATEWAY_TIMEOUT",
        }
        headers: dict[str, str] = {}
        if status == 429:
            limit, interval = RATE_LIMITS[self.mode]["read_burst"]
            headers = self._rate_headers(limit, interval * self.rate_limit_scale)
        failure = _fail(status, codes.get(status, "ERROR"), "injected by fail_next")
        failure.headers.update(headers)
        return self._failure_response(failure, path)

    def _failure_response(self, failure: _Failure, path: str) -> _Response:
        content_type = JSONAPI if path.startswith("/api/") else "application/json"
        return _Response(
            failure.status,
            orjson.dumps({"errors": failure.errors}),
            content_type,
            failure.headers,
        )

    def _route(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> _Response:
        if path == "/oauth/token":
            if method != "POST":
                raise _fail(405, "METHOD_NOT_ALLOWED", f"{method} is not allowed on {path}")
            return self._token(headers, body)
        if path.startswith("/attachments/"):
            return self._attachment(method, path, query, headers)
        for pattern, route in _ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if method not in _METHODS[route]:
                raise _fail(405, "METHOD_NOT_ALLOWED", f"{method} is not allowed on {path}")
            self._throttle(method, route)
            self._authenticate(headers)
            accept = headers.get("accept", "")
            if JSONAPI not in accept:
                raise _fail(
                    406,
                    "NOT_ACCEPTABLE",
                    f"All requests must use the '{JSONAPI}' Accept header. "
                    f"This request specified '{accept}'.",
                )
            if method in ("POST", "PATCH"):
                content_type = headers.get("content-type", "").split(";")[0].strip()
                if content_type != JSONAPI:
                    raise _fail(
                        415,
                        "UNSUPPORTED_MEDIA_TYPE",
                        f"All requests that create or update must use the '{JSONAPI}' "
                        f"Content-Type. This request specified '{content_type}'.",
                    )
            ident = match.group(1) if match.groups() else None
            return self._dispatch(method, route, ident, query, body)
        raise _fail(404, "NOT_FOUND", f"{path} is not a route of this API")

    def _dispatch(
        self, method: str, route: str, ident: str | None, query: dict[str, str], body: bytes
    ) -> _Response:
        if route == "/api/customers":
            if method == "GET":
                return self._list_customers(query)
            return self._create_customer(query, body)
        if route == "/api/customers/:id":
            assert ident is not None
            if method == "GET":
                return self._retrieve_customer(ident, query)
            if method == "PATCH":
                return self._update_customer(ident, query, body)
            return self._delete_customer(ident)
        if route == "/api/exports":
            return self._create_export(body)
        if route == "/api/exports/:id":
            assert ident is not None
            return self._retrieve_export(ident)
        if route == "/api/imports":
            return self._create_import(body)
        assert ident is not None
        return self._retrieve_import(ident)

    def _ok(self, status: int, document: Any, headers: dict[str, str] | None = None) -> _Response:
        return _Response(status, orjson.dumps(document), JSONAPI, headers or {})

    # --- rate limits ----------------------------------------------------------------------

    def _window(self, name: str, limit: int, interval: float) -> _Window:
        window = self._windows.get(name)
        if window is None:
            window = self._windows[name] = _Window(limit, interval * self.rate_limit_scale)
        return window

    def _admit(self, windows: list[_Window]) -> None:
        now = time.monotonic()
        for window in windows:
            if window.full(now):
                # Throttled requests do not count against the window.
                self.throttled += 1
                raise _Failure(
                    429,
                    [
                        _error(
                            429,
                            "TOO_MANY_REQUESTS",
                            f"You have exceeded the limit of {window.limit} requests "
                            f"in {_interval_text(window.interval)} seconds.",
                            title="Too many requests",
                        )
                    ],
                    self._rate_headers(window.limit, window.interval),
                )
        for window in windows:
            window.add(now)

    @staticmethod
    def _rate_headers(limit: int, interval: float) -> dict[str, str]:
        # The interval is the scaled one, so it may be fractional ("0.6") in fast tests.
        return {
            "X-Ratelimit-Limit": str(limit),
            "X-Ratelimit-Interval": _interval_text(interval),
            "X-Ratelimit-Remaining": "0",
        }

    def _throttle(self, method: str, route: str) -> None:
        if not self.rate_limits:
            return
        limits = RATE_LIMITS[self.mode]
        if method == "GET":
            # Every GET under /api/ is a read of the "uncacheable" class the customers
            # endpoints belong to; the burst window is per endpoint (method + route).
            self._admit(
                [
                    self._window(f"burst {method} {route}", *limits["read_burst"]),
                    self._window("reads", *limits["reads"]),
                ]
            )
        else:
            self._admit(
                [
                    self._window("write_burst", *limits["write_burst"]),
                    self._window("writes", *limits["writes"]),
                ]
            )

    # --- auth -----------------------------------------------------------------------------

    def _token(self, headers: Mapping[str, str], body: bytes) -> _Response:
        if self.rate_limits:
            self._admit([self._window("token", *TOKEN_LIMIT)])
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        if "json" not in headers.get("content-type", "") or not isinstance(payload, dict):
            raise _fail(400, "BAD_REQUEST", "The request body must be a JSON object.")
        if payload.get("grant_type") != "client_credentials":
            raise _fail(
                400,
                "UNSUPPORTED_GRANT_TYPE",
                "The authorization grant type is not supported by the authorization server.",
                parameter="grant_type",
            )
        if (
            payload.get("client_id") != self.client_id
            or payload.get("client_secret") != self.client_secret
        ):
            raise _fail(
                401,
                "UNAUTHORIZED",
                "Client authentication failed due to unknown client, no client "
                "authentication included, or unsupported authentication method.",
                title="Unauthorized",
            )
        scope = payload.get("scope")
        if scope is None or scope == "":
            scope = "market:all"
        elif not isinstance(scope, str) or not all(
            re.fullmatch(r"(market|stock_location):(id|code):[\w.-]+|market:all", part)
            for part in scope.split()
        ):
            raise _fail(
                400,
                "INVALID_SCOPE",
                f"The requested scope {scope!r} is invalid.",
                parameter="scope",
            )
        now = self.now()
        access_token = secrets.token_urlsafe(32)
        expires = now.timestamp() + self.token_ttl
        self._tokens[access_token] = _Token(datetime.fromtimestamp(expires, UTC), scope)
        document = {
            "access_token": access_token,
            "token_type": "bearer",
            "expires_in": self.token_ttl,
            "scope": scope,
            "created_at": int(now.timestamp()),
        }
        return _Response(200, orjson.dumps(document), "application/json")

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        authorization = headers.get("authorization", "")
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise _fail(
                401,
                "UNAUTHORIZED",
                "You are not authorized to perform this action: no access token.",
                title="Unauthorized",
            )
        token = self._tokens.get(credential.strip())
        if token is None or token.revoked or self.now() >= token.expires_at:
            raise _fail(
                401,
                "INVALID_TOKEN",
                "The access token you provided is invalid or expired.",
                title="Invalid token",
            )

    # --- customers: reads -----------------------------------------------------------------

    @staticmethod
    def _check_query(query: Mapping[str, str], *, listing: bool) -> None:
        fixed = {"include", "fields[customers]", "fields[customer_groups]"}
        if listing:
            fixed |= {"page[size]", "page[number]", "sort"}
        for key in query:
            if key in fixed or (listing and key.startswith("filter[q][") and key.endswith("]")):
                continue
            if key.startswith("fields["):
                raise _fail(
                    400,
                    "INVALID_RESOURCE",
                    f"{key[7:-1]} is not a valid resource.",
                    parameter=key,
                )
            raise _fail(400, "PARAM_NOT_ALLOWED", f"{key} is not allowed.", parameter=key)

    @staticmethod
    def _page_parameter(query: Mapping[str, str], name: str, default: int) -> int:
        key = f"page[{name}]"
        raw = query.get(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise _fail(
                400,
                "INVALID_PAGE_VALUE",
                f"{raw} is not a valid value for {name} page parameter.",
                parameter=key,
            )
        if name == "size" and value > MAX_PAGE_SIZE:
            # The real API's answer is unknown (clamp or 400): refusing catches the client.
            raise _fail(
                400,
                "INVALID_PAGE_VALUE",
                f"size exceeds maximum page size of {MAX_PAGE_SIZE}.",
                parameter=key,
            )
        return value

    @staticmethod
    def _parse_sort(raw: str | None) -> list[tuple[str, bool]]:
        if raw is None:
            return []
        keys = []
        for part in raw.split(","):
            descending = part.startswith("-")
            name = part[1:] if descending else part
            if name not in SORTABLE:
                raise _fail(
                    400,
                    "INVALID_SORT_CRITERIA",
                    f"{name} is not a valid sort criteria for customers",
                    parameter="sort",
                )
            keys.append((name, descending))
        return keys

    @staticmethod
    def _parse_include(raw: str | None) -> bool:
        if raw is None:
            return False
        for part in raw.split(","):
            if part != "customer_group":
                raise _fail(
                    400,
                    "INVALID_INCLUDE",
                    f"{part} is not a valid includable relationship of customers",
                    parameter="include",
                )
        return True

    @staticmethod
    def _parse_fields(
        query: Mapping[str, str], kind: str, allowed: Iterable[str]
    ) -> set[str] | None:
        key = f"fields[{kind}]"
        raw = query.get(key)
        if raw is None:
            return None
        names = {part for part in raw.split(",") if part}
        valid = {"id", *allowed}
        for name in sorted(names - valid):
            raise _fail(
                400, "INVALID_FIELD", f"{name} is not a valid field for {kind}.", parameter=key
            )
        return names

    @staticmethod
    def _compile_query_filters(query: Mapping[str, str]) -> list[_Predicate]:
        predicates = []
        for key, raw in query.items():
            if not key.startswith("filter[q]["):
                continue
            name = key[len("filter[q][") : -1]
            try:
                predicates.append(_compile_filter(name, raw))
            except _FilterError as exc:
                raise _fail(400, exc.code, exc.detail, parameter=key) from None
        return predicates

    def _render_customer(
        self, customer: Mapping[str, Any], fields: set[str] | None, include_group: bool
    ) -> dict[str, Any]:
        ident = customer["id"]
        self_url = f"{self.base_url}/customers/{ident}"
        attributes = {
            name: _copy(value)
            for name, value in (customer.get("attributes") or {}).items()
            if name != "password" and (fields is None or name in fields)
        }
        relationships: dict[str, Any] = {}
        for name in CUSTOMER_RELATIONSHIPS:
            if fields is not None and name not in fields:
                continue
            relationship: dict[str, Any] = {
                "links": {
                    "self": f"{self_url}/relationships/{name}",
                    "related": f"{self_url}/{name}",
                }
            }
            # Linkage only when included, as the API does; links always.
            if name == "customer_group" and include_group:
                group_id = _group_id(customer)
                relationship["data"] = (
                    None if group_id is None else {"type": "customer_groups", "id": group_id}
                )
            relationships[name] = relationship
        resource: dict[str, Any] = {
            "id": ident,
            "type": "customers",
            "links": {"self": self_url},
            "attributes": attributes,
        }
        if relationships:
            resource["relationships"] = relationships
        resource["meta"] = _copy(customer.get("meta") or {"mode": self.mode})
        return resource

    def _render_group(self, group: Mapping[str, Any], fields: set[str] | None) -> dict[str, Any]:
        ident = group["id"]
        self_url = f"{self.base_url}/customer_groups/{ident}"
        return {
            "id": ident,
            "type": "customer_groups",
            "links": {"self": self_url},
            "attributes": {
                name: _copy(value)
                for name, value in (group.get("attributes") or {}).items()
                if fields is None or name in fields
            },
            "relationships": {
                name: {
                    "links": {
                        "self": f"{self_url}/relationships/{name}",
                        "related": f"{self_url}/{name}",
                    }
                }
                for name in GROUP_RELATIONSHIPS
                if fields is None or name in fields
            },
            "meta": _copy(group.get("meta") or {"mode": self.mode}),
        }

    def _document(
        self, customers: list[dict[str, Any]], query: Mapping[str, str]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        include = self._parse_include(query.get("include"))
        fields = self._parse_fields(
            query, "customers", (*CUSTOMER_ATTRIBUTES, *CUSTOMER_RELATIONSHIPS)
        )
        group_fields = self._parse_fields(
            query, "customer_groups", (*GROUP_ATTRIBUTES, *GROUP_RELATIONSHIPS)
        )
        # With restricted fields, a relationship not listed is neither linked nor included.
        linked = include and (fields is None or "customer_group" in fields)
        data = [self._render_customer(customer, fields, linked) for customer in customers]
        if not include:
            return data, None
        included: dict[str, dict[str, Any]] = {}
        if linked:
            for customer in customers:
                group_id = _group_id(customer)
                if group_id is not None and group_id not in included:
                    included[group_id] = self._render_group(self.groups[group_id], group_fields)
        return data, list(included.values())

    def _page_link(self, query: Mapping[str, str], number: int, size: int) -> str:
        params = {k: v for k, v in query.items() if k not in ("page[number]", "page[size]")}
        params["page[number]"] = str(number)
        params["page[size]"] = str(size)
        return f"{self.base_url}/customers?{urlencode(params)}"

    def _list_customers(self, query: dict[str, str]) -> _Response:
        self._check_query(query, listing=True)
        size = self._page_parameter(query, "size", DEFAULT_PAGE_SIZE)
        number = self._page_parameter(query, "number", 1)
        sort = self._parse_sort(query.get("sort"))
        predicates = self._compile_query_filters(query)
        records = [c for c in self.customers.values() if all(p(c) for p in predicates)]
        # Without sort= the order is insertion order; ties keep it too (a stable sort), as
        # good a stand-in as any for "unspecified".
        for name, descending in reversed(sort):
            records.sort(key=functools.partial(_sort_key, attribute=name), reverse=descending)
        record_count = len(records)
        page_count = -(-record_count // size)
        page = records[(number - 1) * size : number * size]
        data, included = self._document(page, query)
        links = {
            "first": self._page_link(query, 1, size),
            "last": self._page_link(query, max(page_count, 1), size),
        }
        if number > 1:
            links["prev"] = self._page_link(query, number - 1, size)
        if number < page_count:
            links["next"] = self._page_link(query, number + 1, size)
        document: dict[str, Any] = {
            "data": data,
            "meta": {"record_count": record_count, "page_count": page_count},
            "links": links,
        }
        if included is not None:
            document["included"] = included
        return self._ok(200, document)

    def _single(self, customer: dict[str, Any], query: Mapping[str, str]) -> dict[str, Any]:
        data, included = self._document([customer], query)
        document: dict[str, Any] = {"data": data[0]}
        if included is not None:
            document["included"] = included
        return document

    def _find(self, ident: str) -> dict[str, Any]:
        customer = self.customers.get(ident)
        if customer is None:
            raise _fail(
                404,
                "RECORD_NOT_FOUND",
                f"The requested resource was not found: customers {ident}.",
                title="Record not found",
            )
        return customer

    def _retrieve_customer(self, ident: str, query: dict[str, str]) -> _Response:
        self._check_query(query, listing=False)
        return self._ok(200, self._single(self._find(ident), query))

    # --- customers: writes ----------------------------------------------------------------

    @staticmethod
    def _resource_body(body: bytes, kind: str) -> dict[str, Any]:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _fail(400, "BAD_REQUEST", "The request body is not valid JSON.") from None
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, dict):
            raise _fail(
                400, "BAD_REQUEST", "The request must carry a data object.", pointer="/data"
            )
        if data.get("type") != kind:
            raise _fail(
                400,
                "INVALID_RESOURCE",
                f"{data.get('type')} is not a valid resource.",
                pointer="/data/type",
            )
        attributes = data.get("attributes", {})
        if not isinstance(attributes, dict):
            raise _fail(
                400,
                "BAD_REQUEST",
                "attributes must be an object.",
                pointer="/data/attributes",
            )
        return data

    @staticmethod
    def _refuse_unknown(names: Iterable[str], allowed: Iterable[str], prefix: str) -> None:
        permitted = set(allowed)
        for name in names:
            if name not in permitted:
                raise _fail(
                    400,
                    "PARAM_NOT_ALLOWED",
                    f"{name} is not allowed.",
                    pointer=f"{prefix}/{name}",
                )

    def _email_index(self) -> dict[str, str]:
        index = {}
        for ident, customer in self.customers.items():
            key = _email_key((customer.get("attributes") or {}).get("email"))
            if key is not None:
                index[key] = ident
        return index

    @staticmethod
    def _check_attributes(
        attributes: Mapping[str, Any],
        *,
        creating: bool,
        own_id: str | None,
        emails: Mapping[str, str],
    ) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        email = attributes.get("email", _MISSING)
        if email is _MISSING:
            if creating:
                problems.append(("email", "can't be blank"))
        elif not isinstance(email, str) or not email.strip():
            problems.append(("email", "can't be blank"))
        elif not _EMAIL.match(email.strip()):
            problems.append(("email", "is invalid"))
        elif emails.get(email.strip().lower(), own_id) != own_id:
            # Unique regardless of case and surrounding blanks.
            problems.append(("email", "has already been taken"))
        metadata = attributes.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            problems.append(("metadata", "must be an object"))
        for name in _TEXT_ATTRIBUTES:
            value = attributes.get(name)
            if value is not None and not isinstance(value, str):
                problems.append((name, "must be a string"))
        return problems

    def _group_linkage(self, data: Mapping[str, Any]) -> Any:
        relationships = data.get("relationships")
        if relationships is None:
            return _MISSING
        if not isinstance(relationships, dict):
            raise _fail(400, "BAD_REQUEST", "relationships must be an object.")
        self._refuse_unknown(relationships, ("customer_group",), "/data/relationships")
        if "customer_group" not in relationships:
            return _MISSING
        linkage = (relationships["customer_group"] or {}).get("data", _MISSING)
        if linkage is None:
            return None
        if (
            not isinstance(linkage, dict)
            or linkage.get("type") != "customer_groups"
            or not linkage.get("id")
        ):
            raise _fail(
                400,
                "INVALID_LINKS_OBJECT",
                "The relationship needs data with type customer_groups and an id.",
                pointer="/data/relationships/customer_group",
            )
        group_id = str(linkage["id"])
        if group_id not in self.groups:
            raise _fail(
                404,
                "RECORD_NOT_FOUND",
                f"The requested resource was not found: customer_groups {group_id}.",
                pointer="/data/relationships/customer_group",
            )
        return group_id

    def _set_group(self, customer: dict[str, Any], group_id: str | None) -> None:
        relationships = customer.setdefault("relationships", {})
        relationship = relationships.setdefault("customer_group", {})
        relationship["data"] = (
            None if group_id is None else {"type": "customer_groups", "id": group_id}
        )

    def _new_id(self, taken: Mapping[str, Any]) -> str:
        while True:
            ident = "".join(self._rng.choice(_ID_LETTERS) for _ in range(10))
            if ident not in taken:
                return ident

    def _create(self, attributes: Mapping[str, Any], group_id: Any, at: str) -> dict[str, Any]:
        ident = self._new_id(self.customers)
        password = attributes.get("password")
        metadata = attributes.get("metadata")
        customer: dict[str, Any] = {
            "id": ident,
            "type": "customers",
            "links": {"self": f"{self.base_url}/customers/{ident}"},
            "attributes": {
                "email": attributes["email"],
                "status": "prospect",
                "has_password": bool(password),
                "total_orders_count": 0,
                "shopper_reference": attributes.get("shopper_reference"),
                "profile_id": attributes.get("profile_id"),
                "tax_exemption_code": attributes.get("tax_exemption_code"),
                "anonymization_status": None,
                "anonymization_info": None,
                "created_at": at,
                "updated_at": at,
                "reference": attributes.get("reference"),
                "reference_origin": attributes.get("reference_origin"),
                "metadata": _copy(metadata) if metadata is not None else {},
            },
            "relationships": {},
            "meta": {"mode": self.mode, "organization_id": self.organization_id},
        }
        self._set_group(customer, None if group_id is _MISSING else group_id)
        if password:
            self.passwords[ident] = password
        self.customers[ident] = customer
        return customer

    def _change(
        self, customer: dict[str, Any], attributes: Mapping[str, Any], group_id: Any, at: str
    ) -> None:
        """Apply a write; ``updated_at`` moves only when something changed, as in Rails."""
        current = customer["attributes"]
        changed = False
        for name, value in attributes.items():
            if name in TRIGGERS:
                continue
            if name == "password":
                self.passwords[customer["id"]] = value
                current["has_password"] = True
                changed = True
                continue
            if name == "metadata" and value is None:
                value = {}
            if current.get(name, _MISSING) != value:
                # metadata is replaced, not merged: whether the API merges is unknown, and
                # replacing punishes the client that sends a partial object.
                current[name] = _copy(value)
                changed = True
        if group_id is not _MISSING and _group_id(customer) != group_id:
            self._set_group(customer, group_id)
            changed = True
        if changed:
            current["updated_at"] = at

    def _create_customer(self, query: dict[str, str], body: bytes) -> _Response:
        self._check_query(query, listing=False)
        data = self._resource_body(body, "customers")
        attributes = data.get("attributes", {})
        self._refuse_unknown(attributes, WRITABLE, "/data/attributes")
        group_id = self._group_linkage(data)
        problems = self._check_attributes(
            attributes, creating=True, own_id=None, emails=self._email_index()
        )
        if problems:
            raise _validation_failure(problems, "/data/attributes")
        customer = self._create(attributes, group_id, _iso(self.now()))
        return self._ok(
            201,
            self._single(customer, query),
            {"Location": f"{self.base_url}/customers/{customer['id']}"},
        )

    def _update_customer(self, ident: str, query: dict[str, str], body: bytes) -> _Response:
        self._check_query(query, listing=False)
        data = self._resource_body(body, "customers")
        if data.get("id") != ident:
            raise _fail(
                400,
                "KEY_NOT_INCLUDED_IN_URL",
                f"The URL does not support the key {data.get('id')}",
                pointer="/data/id",
            )
        customer = self._find(ident)
        attributes = data.get("attributes", {})
        self._refuse_unknown(attributes, (*WRITABLE, *TRIGGERS), "/data/attributes")
        group_id = self._group_linkage(data)
        problems = self._check_attributes(
            attributes, creating=False, own_id=ident, emails=self._email_index()
        )
        if problems:
            raise _validation_failure(problems, "/data/attributes")
        self._change(customer, attributes, group_id, _iso(self.now()))
        return self._ok(200, self._single(customer, query))

    def _delete_customer(self, ident: str) -> _Response:
        self._find(ident)
        del self.customers[ident]
        self.passwords.pop(ident, None)
        return _Response(204)

    # --- exports --------------------------------------------------------------------------

    def _job_attributes(self, data: Mapping[str, Any], allowed: Iterable[str]) -> dict[str, Any]:
        attributes = dict(data.get("attributes") or {})
        self._refuse_unknown(attributes, allowed, "/data/attributes")
        if attributes.get("resource_type") != "customers":
            raise _validation_failure(
                [("resource_type", "is not included in the list")], "/data/attributes"
            )
        return attributes

    def _active_exports(self) -> int:
        for export in self.exports.values():
            self._advance_export(export)
        return sum(e.status in ("pending", "in_progress") for e in self.exports.values())

    def _create_export(self, body: bytes) -> _Response:
        data = self._resource_body(body, "exports")
        attributes = self._job_attributes(
            data,
            (
                "resource_type",
                "format",
                "filters",
                "fields",
                "includes",
                "dry_data",
                "reference",
                "reference_origin",
                "metadata",
            ),
        )
        fmt = attributes.get("format", "json")
        if fmt not in ("json", "csv"):
            raise _validation_failure(
                [("format", "is not included in the list")], "/data/attributes"
            )
        filters = attributes.get("filters") or {}
        if not isinstance(filters, dict):
            raise _validation_failure([("filters", "must be an object")], "/data/attributes")
        try:
            predicates = [_compile_filter(key, value) for key, value in filters.items()]
        except _FilterError as exc:
            raise _fail(
                422,
                "VALIDATION_ERROR",
                exc.detail,
                pointer=f"/data/attributes/filters/{exc.key}",
            ) from None
        fields = attributes.get("fields")
        valid_fields = {"id", "customer_group_id", *CUSTOMER_ATTRIBUTES}
        if fields is not None and (
            not isinstance(fields, list) or not set(fields) <= valid_fields or not fields
        ):
            raise _validation_failure([("fields", "is invalid")], "/data/attributes")
        includes = attributes.get("includes") or []
        if not isinstance(includes, list) or not set(includes) <= {"customer_group"}:
            raise _validation_failure([("includes", "is invalid")], "/data/attributes")
        if self._active_exports() >= MAX_ACTIVE_EXPORTS:
            raise _fail(
                422,
                "VALIDATION_ERROR",
                f"too many exports pending or in progress (at most {MAX_ACTIVE_EXPORTS})",
                pointer="/data",
            )
        count = sum(all(p(c) for p in predicates) for c in self.customers.values())
        if count == 0:
            raise _fail(
                422, "VALIDATION_ERROR", "no records found", pointer="/data/attributes/filters"
            )
        if count > MAX_EXPORT_RECORDS:
            raise _fail(
                422,
                "VALIDATION_ERROR",
                f"{count} records exceed the maximum of {MAX_EXPORT_RECORDS} per export",
                pointer="/data/attributes/filters",
            )
        now = time.monotonic()
        stamp = _iso(self.now())
        export = Export(
            id=self._new_id(self.exports),
            format=fmt,
            filters=_copy(filters),
            fields=list(fields) if fields is not None else None,
            includes=list(includes),
            records_count=count,
            created_at=stamp,
            updated_at=stamp,
            starts=now + self.export_delay,
            completes=now + 2 * self.export_delay,
        )
        self.exports[export.id] = export
        return self._ok(201, self._render_export(export, issue_url=False))

    def _advance_export(self, export: Export) -> None:
        if export.status == "failed":
            return
        stamp = _iso(self.now())
        if export.failed:
            export.status = "failed"
            export.payload = b""
            export.updated_at = stamp
            return
        if export.status == "completed":
            return
        now = time.monotonic()
        if now >= export.starts and export.started_at is None:
            export.status = "in_progress"
            export.started_at = export.updated_at = stamp
        if now >= export.completes:
            # The job reads the data when it runs, not when it was asked for.
            predicates = [_compile_filter(k, v) for k, v in export.filters.items()]
            matching = sorted(
                (c for c in self.customers.values() if all(p(c) for p in predicates)),
                key=lambda c: str(c["id"]),
            )
            records = [
                self._flat_record(c, export.fields, "customer_group" in export.includes)
                for c in matching
            ]
            raw = orjson.dumps(records) if export.format == "json" else self._csv(records)
            export.payload = gzip.compress(raw)
            export.records_count = len(records)
            export.status = "completed"
            export.completed_at = export.updated_at = stamp

    def _flat_record(
        self, customer: Mapping[str, Any], fields: list[str] | None, include_group: bool
    ) -> dict[str, Any]:
        attributes = customer.get("attributes") or {}
        names = fields if fields is not None else [*CUSTOMER_ATTRIBUTES, "customer_group_id"]
        record: dict[str, Any] = {"id": customer["id"]}
        for name in names:
            if name == "customer_group_id":
                record[name] = _group_id(customer)
            elif name != "id":
                record[name] = _copy(attributes.get(name))
        if include_group:
            group_id = _group_id(customer)
            group = self.groups.get(group_id) if group_id else None
            record["customer_group"] = (
                None
                if group is None
                else {"id": group["id"], **_copy(group.get("attributes") or {})}
            )
        return record

    @staticmethod
    def _csv(records: list[dict[str, Any]]) -> bytes:
        columns: list[str] = []
        rows: list[dict[str, Any]] = []
        for record in records:
            row: dict[str, Any] = {}
            for name, value in record.items():
                if name == "customer_group" and (isinstance(value, dict) or value is None):
                    for key, inner in (value or {}).items():
                        row[f"customer_group.{key}"] = inner
                else:
                    row[name] = value
            for name in row:
                if name not in columns:
                    columns.append(name)
            rows.append(row)

        def cell(value: Any) -> str:
            if value is None:
                return ""
            if isinstance(value, bool):
                return "true" if value else "false"
            if isinstance(value, dict | list):
                return orjson.dumps(value).decode()
            return str(value)

        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([cell(row.get(name)) for name in columns])
        return out.getvalue().encode()

    def _render_export(self, export: Export, *, issue_url: bool) -> dict[str, Any]:
        attachment_url = None
        if issue_url and export.status == "completed":
            # Each GET signs a fresh URL, valid attachment_ttl seconds, as S3 presigning does.
            token = secrets.token_urlsafe(18)
            signature = hashlib.sha256(f"{token}:{export.id}".encode()).hexdigest()
            self._grants[token] = _Grant(
                export.id, signature, time.monotonic() + self.attachment_ttl
            )
            attachment_url = f"{self.root_url}/attachments/{token}.{export.format}.gz?" + urlencode(
                {"X-Amz-Expires": _interval_text(self.attachment_ttl), "X-Amz-Signature": signature}
            )
        return {
            "data": {
                "id": export.id,
                "type": "exports",
                "links": {"self": f"{self.base_url}/exports/{export.id}"},
                "attributes": {
                    "resource_type": "customers",
                    "format": export.format,
                    "status": export.status,
                    "started_at": export.started_at,
                    "completed_at": export.completed_at,
                    "interrupted_at": export.updated_at if export.status == "failed" else None,
                    "filters": _copy(export.filters),
                    "fields": list(export.fields) if export.fields is not None else None,
                    "includes": list(export.includes),
                    "dry_data": False,
                    "attachment_url": attachment_url,
                    "records_count": export.records_count,
                    "created_at": export.created_at,
                    "updated_at": export.updated_at,
                    "reference": None,
                    "reference_origin": None,
                    "metadata": {},
                },
                "meta": {"mode": self.mode, "organization_id": self.organization_id},
            }
        }

    def _retrieve_export(self, ident: str) -> _Response:
        export = self.exports.get(ident)
        if export is None:
            raise _fail(
                404,
                "RECORD_NOT_FOUND",
                f"The requested resource was not found: exports {ident}.",
                title="Record not found",
            )
        self._advance_export(export)
        return self._ok(200, self._render_export(export, issue_url=True))

    def _attachment(
        self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str]
    ) -> _Response:
        def s3_error(status: int, code: str, message: str) -> _Response:
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                f"<RequestId>{secrets.token_hex(8).upper()}</RequestId></Error>"
            )
            return _Response(status, body.encode(), "application/xml")

        if method != "GET":
            return s3_error(405, "MethodNotAllowed", "The specified method is not allowed.")
        if "authorization" in headers:
            # A presigned URL already carries its credentials: S3 refuses a second mechanism,
            # so a client must not send its API bearer token here.
            return s3_error(
                400,
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be specified",
            )
        match = _ATTACHMENT.fullmatch(path)
        grant = self._grants.get(match.group(1)) if match else None
        if grant is None or query.get("X-Amz-Signature") != grant.signature:
            return s3_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        if time.monotonic() >= grant.expires:
            return s3_error(403, "AccessDenied", "Request has expired")
        export = self.exports[grant.export_id]
        if export.status != "completed":
            return s3_error(404, "NoSuchKey", "The specified key does not exist.")
        if self.attachment_content_encoding == "gzip":
            content_type = "application/json" if export.format == "json" else "text/csv"
            return _Response(200, export.payload, content_type, {"Content-Encoding": "gzip"})
        return _Response(200, export.payload, "application/gzip")

    # --- imports --------------------------------------------------------------------------

    def _create_import(self, body: bytes) -> _Response:
        data = self._resource_body(body, "imports")
        attributes = self._job_attributes(
            data,
            (
                "resource_type",
                "format",
                "inputs",
                "skip_errors",
                "parent_resource_id",
                "cleanup_records",
                "reference",
                "reference_origin",
                "metadata",
            ),
        )
        if attributes.get("format", "json") != "json":
            raise _validation_failure(
                [("format", "is not included in the list")], "/data/attributes"
            )
        if attributes.get("cleanup_records"):
            raise _validation_failure([("cleanup_records", "is not supported")], "/data/attributes")
        inputs = attributes.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise _validation_failure([("inputs", "can't be blank")], "/data/attributes")
        if len(inputs) > MAX_IMPORT_INPUTS:
            raise _validation_failure(
                [("inputs", f"is too long (maximum is {MAX_IMPORT_INPUTS} inputs)")],
                "/data/attributes",
            )
        skip_errors = attributes.get("skip_errors", False)
        if not isinstance(skip_errors, bool):
            raise _validation_failure([("skip_errors", "is invalid")], "/data/attributes")
        now = time.monotonic()
        stamp = _iso(self.now())
        job = Import(
            id=self._new_id(self.imports),
            inputs=_copy(inputs),
            skip_errors=skip_errors,
            created_at=stamp,
            updated_at=stamp,
            starts=now + self.import_delay,
            completes=now + 2 * self.import_delay,
        )
        self.imports[job.id] = job
        return self._ok(201, self._render_import(job))

    def _advance_import(self, job: Import) -> None:
        if job.status in ("completed", "interrupted"):
            return
        now = time.monotonic()
        stamp = _iso(self.now())
        if now >= job.starts and job.started_at is None:
            job.status = "in_progress"
            job.started_at = job.updated_at = stamp
        if now < job.completes:
            return
        # One instant for the whole import, as a bulk import stamps its records.
        emails = self._email_index()
        limit = len(job.inputs) * IMPORT_ERROR_RATIO
        for index, item in enumerate(job.inputs):
            problems = self._import_one(item, stamp, emails)
            if not problems:
                job.processed_count += 1
                continue
            log = job.errors_log.setdefault(str(index), {})
            for name, message in problems:
                log.setdefault(name, []).append(message)
            job.errors_count += 1
            if not job.skip_errors and job.errors_count > limit:
                job.status = "interrupted"
                job.interrupted_at = job.updated_at = stamp
                return
        job.status = "completed"
        job.completed_at = job.updated_at = stamp

    def _import_one(self, item: Any, stamp: str, emails: dict[str, str]) -> list[tuple[str, str]]:
        if not isinstance(item, dict):
            return [("base", "is not an object")]
        allowed = {"id", "customer_group_id", *WRITABLE}
        unknown = [(name, "is not a valid attribute") for name in item if name not in allowed]
        if unknown:
            return unknown
        attributes = {k: v for k, v in item.items() if k not in ("id", "customer_group_id")}
        group_id: Any = _MISSING
        if "customer_group_id" in item:
            group_id = item["customer_group_id"]
            if group_id is not None and group_id not in self.groups:
                return [("customer_group_id", "not found")]
        customer: dict[str, Any] | None = None
        if item.get("id") is not None:
            customer = self.customers.get(str(item["id"]))
            if customer is None:
                return [("id", "not found")]
        elif (key := _email_key(item.get("email"))) is not None and key in emails:
            customer = self.customers.get(emails[key])
        own_id = customer["id"] if customer is not None else None
        problems = self._check_attributes(
            attributes, creating=customer is None, own_id=own_id, emails=emails
        )
        if problems:
            return problems
        if customer is None:
            customer = self._create(attributes, group_id, stamp)
        else:
            old_key = _email_key(customer["attributes"].get("email"))
            self._change(customer, attributes, group_id, stamp)
            if old_key is not None:
                emails.pop(old_key, None)
        new_key = _email_key(customer["attributes"].get("email"))
        if new_key is not None:
            emails[new_key] = customer["id"]
        return []

    def _render_import(self, job: Import) -> dict[str, Any]:
        return {
            "data": {
                "id": job.id,
                "type": "imports",
                "links": {"self": f"{self.base_url}/imports/{job.id}"},
                "attributes": {
                    "resource_type": "customers",
                    "format": "json",
                    "parent_resource_id": None,
                    "status": job.status,
                    "started_at": job.started_at,
                    "completed_at": job.completed_at,
                    "interrupted_at": job.interrupted_at,
                    "inputs_size": len(job.inputs),
                    "errors_count": job.errors_count,
                    "warnings_count": job.warnings_count,
                    "processed_count": job.processed_count,
                    "destroyed_count": 0,
                    "errors_log": _copy(job.errors_log),
                    "warnings_log": _copy(job.warnings_log),
                    "cleanup_records": False,
                    "attachment_url": None,
                    "created_at": job.created_at,
                    "updated_at": job.updated_at,
                    "reference": None,
                    "reference_origin": None,
                    "metadata": {},
                },
                "meta": {"mode": self.mode, "organization_id": self.organization_id},
            }
        }

    def _retrieve_import(self, ident: str) -> _Response:
        job = self.imports.get(ident)
        if job is None:
            raise _fail(
                404,
                "RECORD_NOT_FOUND",
                f"The requested resource was not found: imports {ident}.",
                title="Record not found",
            )
        self._advance_import(job)
        return self._ok(200, self._render_import(job))

    def _placeholder_group(self, ident: str) -> dict[str, Any]:
        stamp = "2025-03-03T09:00:00.000Z"
        return {
            "id": ident,
            "type": "customer_groups",
            "links": {"self": f"{self.base_url}/customer_groups/{ident}"},
            "attributes": {
                "name": f"Group {ident}",
                "code": f"group-{ident.lower()}",
                "created_at": stamp,
                "updated_at": stamp,
                "reference": None,
                "reference_origin": None,
                "metadata": {},
            },
            "meta": {"mode": self.mode, "organization_id": self.organization_id},
        }
