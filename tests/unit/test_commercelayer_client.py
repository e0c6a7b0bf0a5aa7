"""The Commerce Layer API client: pacing, the token's life, throttling, bounded retries and
secrecy, on httpx.MockTransport and an injected clock that moves only when the client sleeps."""

from __future__ import annotations

import base64
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from custsync.commercelayer.client import (
    LIMITS,
    ApiError,
    AuthError,
    CommerceLayerClient,
    Pacer,
    Unreachable,
)
from custsync.errors import FatalError, RetriableError

SECRET = "cl-secret-7f3a9c1e-never-print-me"
BASE_URL = "https://acme.commercelayer.io/api"
AUTH_URL = "https://auth.commercelayer.io/oauth/token"
FAST = ((6000, 60.0), (1000, 10.0))  # limits that make the pacer all but invisible
FAST_LIMITS = {"read": FAST, "write": FAST}


class FakeTime:
    """A monotonic clock that moves only when the code under test sleeps."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(seconds, 0.0)


@dataclass
class Seen:
    method: str
    path: str
    at: float
    authorization: str | None


Reply = Callable[[httpx.Request], httpx.Response]


def jsonapi(status: int, document: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status,
        content=orjson.dumps(document),
        headers={"Content-Type": "application/vnd.api+json", **(headers or {})},
    )


def error(status: int, code: str, detail: str, pointer: str | None = None) -> httpx.Response:
    item: dict[str, Any] = {"title": code, "detail": detail, "code": code, "status": str(status)}
    if pointer is not None:
        item["source"] = {"pointer": pointer}
    return jsonapi(status, {"errors": [item]})


def jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()

    return f"{part({'alg': 'RS512', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


@dataclass
class Api:
    """Commerce Layer's auth and API behind a MockTransport: tokens it issued are valid
    until revoked; ``script`` queues answers (or exceptions) for the next API requests."""

    time: FakeTime
    expires_in: int = 7200
    token_claims: dict[str, Any] | None = None
    seen: list[Seen] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)
    script: deque[Reply | BaseException] = field(default_factory=deque)
    refuse_tokens: bool = False
    accept_tokens: bool = True

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            return self._token(request)
        self.seen.append(
            Seen(
                request.method,
                request.url.path,
                self.time.now,
                request.headers.get("authorization"),
            )
        )
        if self.script:
            step = self.script.popleft()
            if isinstance(step, BaseException):
                raise step
            return step(request)
        bearer = (request.headers.get("authorization") or "").removeprefix("Bearer ")
        if not self.accept_tokens or bearer not in self.valid:
            return error(
                401, "INVALID_TOKEN", "The access token you provided is invalid or expired."
            )
        return jsonapi(200, {"data": [], "meta": {"record_count": 0, "page_count": 0}})

    def _token(self, request: httpx.Request) -> httpx.Response:
        self.token_times.append(self.time.now)
        body = orjson.loads(request.content)
        if self.refuse_tokens or body.get("client_secret") != SECRET:
            return httpx.Response(
                401,
                json={
                    "errors": [{"code": "UNAUTHORIZED", "detail": "Client authentication failed"}]
                },
            )
        if self.token_claims is not None:
            token = jwt({**self.token_claims, "rand": len(self.tokens)})
        else:
            token = f"tok-{len(self.tokens)}-a8Fq2LmZx0"
        self.tokens.append(token)
        self.valid.add(token)
        return httpx.Response(
            200,
            json={
                "access_token": token,
                "token_type": "bearer",
                "expires_in": self.expires_in,
                "scope": "market:all",
                "created_at": 1_700_000_000,
            },
        )

    def revoke_all(self) -> None:
        self.valid.clear()


@pytest.fixture
def time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def api(time: FakeTime) -> Api:
    return Api(time)


def make_client(api: Api, time: FakeTime, **options: Any) -> CommerceLayerClient:
    options.setdefault("limits", FAST_LIMITS)
    return CommerceLayerClient(
        base_url=BASE_URL,
        auth_url=AUTH_URL,
        client_id="cid",
        client_secret=SecretStr(SECRET),
        transport=httpx.MockTransport(api.handler),
        clock=time.clock,
        sleep=time.sleep,
        **options,
    )


def intervals(times: Sequence[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def most_in_any_window(times: Sequence[float], window: float) -> int:
    """The largest number of instants inside any half-open window of ``window`` seconds,
    as a sliding-window limiter on the server counts them."""
    ordered = sorted(times)
    most, start = 0, 0
    for end, moment in enumerate(ordered):
        while moment - ordered[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most


# --- pacing ------------------------------------------------------------------------------


def test_pacer_spaces_back_to_back_requests_at_the_sustained_rate(time: FakeTime) -> None:
    limits = LIMITS["test"]["read"]  # 100 a minute, 25 in 10 s
    pacer = Pacer(limits, clock=time.clock, sleep=time.sleep)
    sent = []
    for _ in range(40):
        pacer.wait()
        sent.append(time.now)
    gaps = intervals(sent)
    # The per-minute average (less the 5% margin) sets the pace, not the 10-second burst.
    assert gaps == pytest.approx([60.0 / 95] * len(gaps))
    assert 60.0 / min(gaps) <= 100


@st.composite
def request_plans(draw: st.DrawFn) -> tuple[str, list[tuple[float, float | None]]]:
    """A mode, then requests as (seconds after the previous one wants to go, a 429 back-off
    the answer brings or None)."""
    mode = draw(st.sampled_from(["test", "live"]))
    steps = draw(
        st.lists(
            st.tuples(
                st.one_of(
                    st.just(0.0),
                    st.floats(min_value=0.0, max_value=2.0),
                    st.floats(min_value=0.0, max_value=90.0),
                ),
                st.one_of(st.none(), st.none(), st.floats(min_value=0.05, max_value=12.0)),
            ),
            min_size=1,
            max_size=260,
        )
    )
    return mode, steps


@settings(max_examples=150, deadline=None)
@given(request_plans())
def test_pacer_never_exceeds_any_window_whatever_the_request_times(
    plan: tuple[str, list[tuple[float, float | None]]],
) -> None:
    mode, steps = plan
    time = FakeTime(0.0)
    limits = LIMITS["live" if mode == "live" else "test"]["read"]
    pacer = Pacer(limits, clock=time.clock, sleep=time.sleep)
    spacing = max(window / int(n * 0.95) for n, window in limits)
    sent: list[float] = []
    wanted = 0.0
    not_before = float("-inf")
    for gap, back_off in steps:
        wanted += gap
        time.now = max(time.now, wanted)
        pacer.wait()
        assert time.now >= wanted
        assert time.now >= not_before - 1e-9  # a 429's interval is honoured
        if sent:
            assert time.now - sent[-1] >= spacing - 1e-9  # evenly spaced, after a 429 too
        sent.append(time.now)
        if back_off is not None:
            pacer.back_off(back_off)
            not_before = time.now + back_off
    for limit, window in limits:
        assert most_in_any_window(sent, window) <= limit


# --- the token ---------------------------------------------------------------------------


def test_token_is_fetched_once_and_reused_until_expires_in_less_the_margin(
    time: FakeTime,
) -> None:
    api = Api(time, expires_in=600)
    client = make_client(api, time)
    start = time.now
    client.get("/customers")
    time.now = start + 300
    client.get("/customers")
    time.now = start + 539.9  # 600 s less the 60 s margin, not yet reached
    client.get("/customers")
    assert len(api.tokens) == 1
    assert {s.authorization for s in api.seen} == {f"Bearer {api.tokens[0]}"}

    time.now = start + 540.0
    client.get("/customers")
    assert len(api.tokens) == 2
    assert api.seen[-1].authorization == f"Bearer {api.tokens[1]}"


def test_401_invalid_token_renews_the_token_and_the_request_succeeds(
    api: Api, time: FakeTime
) -> None:
    client = make_client(api, time)
    client.get("/customers")
    api.revoke_all()  # as a token revoked or expired early on the server's side

    document = client.get("/customers")

    assert document["data"] == []
    assert len(api.tokens) == 2
    assert [s.authorization for s in api.seen] == [
        f"Bearer {api.tokens[0]}",
        f"Bearer {api.tokens[0]}",
        f"Bearer {api.tokens[1]}",
    ]


def test_token_requests_stay_within_30_a_minute(api: Api, time: FakeTime) -> None:
    client = make_client(api, time)
    for _ in range(100):
        client.invalidate_token()
        client.get("/customers")
    assert len(api.token_times) == 100
    assert most_in_any_window(api.token_times, 60.0) <= 30


def test_tokens_refused_again_and_again_end_in_an_auth_error_within_max_retry_time(
    time: FakeTime,
) -> None:
    api = Api(time, accept_tokens=False)
    client = make_client(api, time, max_retry_time=120.0)
    start = time.now
    with pytest.raises(AuthError) as caught:
        client.get("/customers")
    assert caught.value.code == "INVALID_TOKEN"
    assert isinstance(caught.value, FatalError)
    assert time.now - start <= 120.0 + 2.0
    assert most_in_any_window(api.token_times, 60.0) <= 30


def test_refused_credentials_raise_auth_error_without_retrying(time: FakeTime) -> None:
    api = Api(time, refuse_tokens=True)
    client = make_client(api, time)
    with pytest.raises(AuthError) as caught:
        client.get("/customers")
    assert caught.value.status == 401
    assert len(api.token_times) == 1
    assert api.seen == []


# --- throttling and faults ----------------------------------------------------------------


def test_429_waits_x_ratelimit_interval_before_retrying(api: Api, time: FakeTime) -> None:
    api.script.append(
        lambda request: jsonapi(
            429,
            {"errors": [{"code": "TOO_MANY_REQUESTS", "detail": "slow down", "status": "429"}]},
            {
                "X-Ratelimit-Limit": "25",
                "X-Ratelimit-Interval": "0.6",
                "X-Ratelimit-Remaining": "0",
            },
        )
    )
    client = make_client(api, time)

    client.get("/customers")

    assert client.throttled == 1
    assert len(api.seen) == 2
    assert api.seen[1].at - api.seen[0].at == pytest.approx(0.6, abs=0.02)
    assert 0.6 in time.sleeps


def _connect_error(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def _dropped(request: httpx.Request) -> httpx.Response:
    raise httpx.RemoteProtocolError("Server disconnected without sending a response.")


def test_5xx_and_transport_errors_are_retried_with_backoff_and_the_request_succeeds(
    api: Api, time: FakeTime
) -> None:
    api.script.extend(
        [
            lambda r: error(503, "SERVICE_UNAVAILABLE", "down"),
            _connect_error,
            lambda r: error(502, "BAD_GATEWAY", "proxy"),
            _dropped,
            lambda r: error(500, "INTERNAL_SERVER_ERROR", "oops"),
        ]
    )
    client = make_client(api, time)

    document = client.get("/customers")

    assert document["data"] == []
    assert client.retries == 5
    assert len(api.seen) == 6
    gaps = intervals([s.at for s in api.seen])
    # Exponential from 0.5 s, plus up to 1 s of jitter.
    for attempt, gap in enumerate(gaps):
        assert 0.5 * 2**attempt <= gap <= 0.5 * 2**attempt + 1.0 + 0.02


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(lambda r: error(503, "SERVICE_UNAVAILABLE", "down"), id="503"),
        pytest.param(_connect_error, id="connection-refused"),
        pytest.param(_dropped, id="dropped-connection"),
    ],
)
def test_retries_give_up_after_max_retry_time_with_unreachable(
    api: Api, time: FakeTime, fault: Reply
) -> None:
    api.script.extend([fault] * 1000)
    client = make_client(api, time, max_retry_time=60.0)
    start = time.now

    with pytest.raises(Unreachable) as caught:
        client.get("/customers")

    assert isinstance(caught.value, RetriableError)
    assert isinstance(caught.value, FatalError)
    # The last wait is cut to the deadline: it gives up at max_retry_time, not a backoff later.
    assert time.now - start == pytest.approx(60.0, abs=0.05)
    assert api.seen[-1].at == pytest.approx(start + 60.0, abs=0.05)
    assert 5 <= len(api.seen) <= 12  # backed off exponentially, not hammered


def test_a_422_raises_api_error_at_once_with_code_and_pointer(api: Api, time: FakeTime) -> None:
    api.script.append(
        lambda r: error(422, "VALIDATION_ERROR", "has already been taken", "/data/attributes/email")
    )
    client = make_client(api, time)

    with pytest.raises(ApiError) as caught:
        client.request(
            "POST",
            "/customers",
            json={"data": {"type": "customers", "attributes": {"email": "a@example.com"}}},
        )

    assert caught.value.status == 422
    assert caught.value.code == "VALIDATION_ERROR"
    assert caught.value.pointer == "/data/attributes/email"
    assert not isinstance(caught.value, RetriableError)
    assert [(s.method, s.path) for s in api.seen] == [("POST", "/api/customers")]
    assert client.retries == 0


# --- secrecy -----------------------------------------------------------------------------


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record of custsync's, httpx's and httpcore's loggers at DEBUG, whatever their
    propagation was set to."""
    loggers = [logging.getLogger(name) for name in ("custsync", "httpx", "httpcore")]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    caplog.set_level(logging.DEBUG)
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.propagate = True
    yield caplog
    for lg, level, propagate in saved:
        lg.setLevel(level)
        lg.propagate = propagate


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def test_the_secret_and_the_token_never_appear_in_exceptions_or_logs(
    time: FakeTime, all_logs: pytest.LogCaptureFixture
) -> None:
    api = Api(time, token_claims={"test": True, "organization": {"slug": "acme"}})
    client = make_client(api, time, max_retry_time=5.0)
    failures: list[BaseException] = []

    client.get("/customers")
    api.revoke_all()  # a renewal
    api.script.extend(
        [
            lambda r: error(503, "SERVICE_UNAVAILABLE", "down"),
            lambda r: jsonapi(429, {"errors": []}, {"X-Ratelimit-Interval": "0.6"}),
        ]
    )
    client.get("/customers")
    api.script.append(
        lambda r: error(422, "VALIDATION_ERROR", "is invalid", "/data/attributes/email")
    )
    api.script.extend([_connect_error] * 100)
    for expected in (ApiError, Unreachable):  # a refusal, then retries that run out
        with pytest.raises(expected) as caught:
            client.request("PATCH", "/customers/abc", json={"data": {"id": "abc"}})
        failures.append(caught.value)
    api.refuse_tokens = True
    client.invalidate_token()
    with pytest.raises(AuthError) as refused:
        client.get("/customers")
    failures.append(refused.value)

    secrets = [SECRET, *api.tokens]
    assert len(api.tokens) >= 2
    texts = [repr(client)]
    for failure in failures:
        texts += [f"{e}" for e in _chain(failure)] + [repr(e) for e in _chain(failure)]
    for record in all_logs.records:
        texts.append(record.getMessage())
        texts.append(repr(record.args))
        if record.exc_info and record.exc_info[1] is not None:
            texts += [repr(e) for e in _chain(record.exc_info[1])]
    assert any("httpx" in r.name for r in all_logs.records)  # its loggers were listening
    for text in texts:
        for secret in secrets:
            assert secret not in text


# --- mode --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "mode", "per_minute"),
    [
        ({"test": False, "organization": {"slug": "acme"}}, "live", 200),
        ({"test": True, "organization": {"slug": "acme"}}, "test", 100),
    ],
)
def test_the_mode_in_a_jwt_tokens_claims_sets_the_pacing_limits(
    time: FakeTime, claims: dict[str, Any], mode: str, per_minute: int
) -> None:
    api = Api(time, token_claims=claims)
    client = make_client(api, time, limits=None)
    assert client.mode is None
    for _ in range(12):
        client.get("/customers")
    assert client.mode == mode
    gaps = intervals([s.at for s in api.seen])
    assert gaps == pytest.approx([60.0 / int(per_minute * 0.95)] * len(gaps))


def test_an_opaque_token_leaves_the_stricter_test_limits(api: Api, time: FakeTime) -> None:
    client = make_client(api, time, limits=None)
    for _ in range(5):
        client.get("/customers")
    assert client.mode is None
    gaps = intervals([s.at for s in api.seen])
    assert gaps == pytest.approx([60.0 / 95] * len(gaps))
