"""The Commerce Layer API client: client-credentials auth, pacing to the documented rate
limits, and bounded retries. Every request of the connectors goes through ``request``.

Facts it is built to (see commercelayer-api.md): tokens live ``expires_in`` seconds and an
expired one answers 401 ``INVALID_TOKEN``; the token endpoint allows 30 requests a minute;
customer reads allow 200 a minute and 50 in 10 s live (100 and 25 test), writes the same;
a throttled request answers 429 with ``X-Ratelimit-Interval`` and no promise of Retry-After.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx
import orjson
from pydantic import SecretStr
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    wait_exponential,
    wait_random,
)

from custsync import __version__
from custsync.errors import ConfigError, CustsyncError, FatalError, RetriableError

log = logging.getLogger("custsync.commercelayer")

JSONAPI = "application/vnd.api+json"
Mode = Literal["test", "live"]
Kind = Literal["read", "write"]
# (limit, window in seconds): the per-minute average and the 10-second burst.
LIMITS: dict[Mode, dict[Kind, tuple[tuple[int, float], ...]]] = {
    "live": {"read": ((200, 60.0), (50, 10.0)), "write": ((200, 60.0), (50, 10.0))},
    "test": {"read": ((100, 60.0), (25, 10.0)), "write": ((100, 60.0), (25, 10.0))},
}
TOKEN_LIMIT = ((30, 60.0),)
TOKEN_MARGIN_S = 60.0  # renew this long before expires_in runs out


class ApiError(CustsyncError):
    """The API refused a request (4xx other than throttling): not worth retrying."""

    def __init__(self, status: int, code: str | None, detail: str, *, pointer: str | None = None):
        self.status = status
        self.code = code
        self.detail = detail
        self.pointer = pointer
        super().__init__(f"Commerce Layer answered {status} {code or ''}: {detail}".strip())


class AuthError(ApiError, FatalError):
    """The credentials were refused: nothing will work until the job's settings change."""


class Throttled(RetriableError):
    def __init__(self, wait: float | None):
        self.wait = wait
        super().__init__("Commerce Layer throttled the request (429)")


class TokenExpired(RetriableError):
    """401 INVALID_TOKEN: the token was dropped; the retry fetches a new one at once."""

    def __init__(self) -> None:
        super().__init__("Commerce Layer refused the access token (401 INVALID_TOKEN)")


class ServerError(RetriableError):
    def __init__(self, status: int):
        self.status = status
        super().__init__(f"Commerce Layer answered {status}")


class Unreachable(RetriableError, FatalError):
    """Retries ran out: the API could not be reached (the run fails, exit 1, and the next
    run resumes from the last checkpoint)."""


class Pacer:
    """Keeps requests under sliding-window limits, spacing them evenly at the sustained
    rate so a steady run never meets a 429. ``margin`` leaves room for clocks that differ;
    ``even=False`` keeps to the windows only (bursts allowed), for rare calls such as
    token requests, where spacing would only delay each one."""

    def __init__(
        self,
        limits: Sequence[tuple[int, float]],
        *,
        margin: float = 0.95,
        even: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._margin = margin
        self._even = even
        self._sent: deque[float] = deque()
        self._not_before = float("-inf")
        self.set_limits(limits)

    def set_limits(self, limits: Sequence[tuple[int, float]]) -> None:
        with self._lock:
            self._limits = [(max(1, int(n * self._margin)), window) for n, window in limits]
            longest = max(window for _, window in self._limits)
            # Even spacing at the strictest sustained rate keeps every window under its limit.
            self._spacing = max(window / n for n, window in self._limits) if self._even else 0.0
            self._keep = longest

    def wait(self) -> float:
        """Block until a request may go, record it, and return how long it waited."""
        waited = 0.0
        with self._lock:
            while True:
                now = self._clock()
                while self._sent and now - self._sent[0] >= self._keep:
                    self._sent.popleft()
                delay = self._not_before - now
                if self._sent:
                    delay = max(delay, self._sent[-1] + self._spacing - now)
                for limit, window in self._limits:
                    inside = [t for t in self._sent if now - t < window]
                    if len(inside) >= limit:
                        delay = max(delay, inside[-limit] + window - now)
                if delay <= 0:
                    self._sent.append(now)
                    return waited
                self._sleep(delay)
                waited += delay

    def back_off(self, seconds: float) -> None:
        """After a 429: send nothing for ``seconds`` (the sent log keeps only real requests,
        so the even spacing from the last one still holds afterwards)."""
        with self._lock:
            self._not_before = max(self._not_before, self._clock() + seconds)


def _token_mode(token: str) -> Mode | None:
    """Commerce Layer tokens are JWTs; their claims say whether they are test or live."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return None
    if not isinstance(claims, dict):
        return None
    test = claims.get("test")
    if isinstance(test, bool):
        return "test" if test else "live"
    mode = claims.get("mode")
    return mode if mode in ("test", "live") else None


def _errors(response: httpx.Response) -> tuple[str | None, str, str | None]:
    try:
        body = response.json()
        first = body["errors"][0]
        pointer = (first.get("source") or {}).get("pointer")
        return first.get("code"), str(first.get("detail") or first.get("title") or ""), pointer
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None, response.reason_phrase or "error", None


class CommerceLayerClient:
    """One organisation's API, for one run. Thread-safe enough for a few export pollers."""

    def __init__(
        self,
        *,
        base_url: str,
        auth_url: str,
        client_id: str,
        client_secret: SecretStr,
        scope: str | None = None,
        mode: Mode | None = None,
        timeout: float = 30.0,
        max_retry_time: float = 120.0,
        limits: Mapping[Kind, Sequence[tuple[int, float]]] | None = None,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth_url = auth_url
        self._client_id = client_id
        self._secret = client_secret
        self._scope = scope
        self.mode: Mode | None = mode
        self._fixed_limits = limits
        self._clock, self._sleep = clock, sleep
        self._max_retry_time = max_retry_time
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            headers={"User-Agent": f"custsync/{__version__}"},
        )
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = threading.Lock()
        self._token_pacer = Pacer(TOKEN_LIMIT, margin=1.0, even=False, clock=clock, sleep=sleep)
        # Until the mode is known, the stricter test limits apply.
        first = self._limits_for(mode or "test")
        self._pacers: dict[Kind, Pacer] = {
            kind: Pacer(first[kind], clock=clock, sleep=sleep) for kind in ("read", "write")
        }
        self.server_time: datetime | None = None
        self.requests = 0
        self.throttled = 0
        self.retries = 0

    def __repr__(self) -> str:
        return f"CommerceLayerClient({self.base_url}, mode={self.mode or 'unknown'})"

    def _limits_for(self, mode: Mode) -> Mapping[Kind, Sequence[tuple[int, float]]]:
        return self._fixed_limits or LIMITS[mode]

    def learn_mode(self, mode: str | None) -> None:
        """Switch to the limits of ``mode`` once a token or a record tells it."""
        if mode not in ("test", "live") or mode == self.mode:
            return
        known: Mode = "live" if mode == "live" else "test"
        self.mode = known
        for kind, limits in self._limits_for(known).items():
            self._pacers[kind].set_limits(limits)
        log.debug("Commerce Layer %s mode: pacing to its limits", mode)

    def close(self) -> None:
        self._http.close()

    # --- auth -------------------------------------------------------------------------

    def _bearer(self) -> str:
        with self._token_lock:
            if self._token is None or self._clock() >= self._token_expires:
                self._fetch_token()
            assert self._token is not None
            return self._token

    def _fetch_token(self) -> None:
        self._token_pacer.wait()
        body: dict[str, Any] = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._secret.get_secret_value(),
        }
        if self._scope:
            body["scope"] = self._scope
        # The lifetime counts from before the request: the server's clock started first.
        asked_at = self._clock()
        response = self._http.post(
            self.auth_url,
            content=orjson.dumps(body),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        if response.status_code in (400, 401, 403):
            code, detail, _ = _errors(response)
            raise AuthError(response.status_code, code, f"the token request was refused: {detail}")
        if response.status_code == 429:
            raise Throttled(self._interval(response))
        if response.status_code >= 500:
            raise ServerError(response.status_code)
        if response.status_code != 200:
            code, detail, _ = _errors(response)
            raise ApiError(response.status_code, code, detail)
        answer = response.json()
        token = answer.get("access_token")
        if not isinstance(token, str):
            raise ApiError(response.status_code, None, "the token answer holds no access_token")
        lifetime = float(answer.get("expires_in") or 7200)
        self._token = token
        self._token_expires = asked_at + max(lifetime - TOKEN_MARGIN_S, lifetime / 2)
        if self.mode is None:
            self.learn_mode(_token_mode(token))

    def invalidate_token(self, token: str | None = None) -> None:
        """Drop the cached token (only if it is still ``token``, when given: another thread
        may have renewed it already)."""
        with self._token_lock:
            if token is None or token == self._token:
                self._token = None

    # --- requests ---------------------------------------------------------------------

    @staticmethod
    def _interval(response: httpx.Response) -> float | None:
        try:
            return float(response.headers["X-Ratelimit-Interval"])
        except (KeyError, ValueError):
            return None

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        kind: Kind | None = None,
    ) -> httpx.Response:
        """Send one API request, paced, authorised and retried; a 4xx other than 429 and
        an expired token raises ApiError at once."""
        kind = kind or ("read" if method == "GET" else "write")

        def wait(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            if isinstance(error, Throttled) and error.wait is not None:
                return error.wait
            if isinstance(error, TokenExpired):
                return 0.0  # the next attempt fetches a new token (paced by its own limit)
            return float(self._backoff(state))

        retrying = self._retrying(
            lambda e: isinstance(e, RetriableError | httpx.TransportError), wait
        )
        try:
            return retrying(self._once, method, path, params, json, kind)
        except httpx.TransportError as exc:
            raise Unreachable(
                f"Commerce Layer could not be reached for {self._max_retry_time:g}s: "
                f"{type(exc).__name__}"
            ) from exc
        except (Throttled, ServerError) as exc:
            raise Unreachable(f"{exc}, still after {self._max_retry_time:g}s of retries") from exc
        except TokenExpired as exc:
            raise AuthError(401, "INVALID_TOKEN", "new access tokens were refused too") from exc

    # Exponential from 0.5 s with up to 1 s of jitter (wait_exponential_jitter's form,
    # spelt so that tenacity 8.2, where its parameter is named differently, reads it too).
    _backoff = wait_exponential(multiplier=0.5, max=20.0) + wait_random(0.0, 1.0)

    def _retrying(
        self,
        retriable: Callable[[BaseException], bool],
        wait: Callable[[RetryCallState], float],
    ) -> Retrying:
        """Retries bounded by ``max_retry_time`` on the injected clock (tenacity's own
        stop_after_delay reads time.monotonic, which an injected sleep never moves): the
        last wait is cut to the deadline, so a call gives up about max_retry_time after
        its first attempt, never a whole backoff later."""
        deadline = self._clock() + self._max_retry_time

        def bounded(state: RetryCallState) -> float:
            return max(0.0, min(wait(state), deadline - self._clock()))

        def stop(state: RetryCallState) -> bool:
            return self._clock() >= deadline

        return Retrying(
            retry=retry_if_exception(retriable),
            wait=bounded,
            stop=stop,
            sleep=self._sleep,
            reraise=True,
            before_sleep=self._note_retry,
        )

    def _note_retry(self, state: RetryCallState) -> None:
        self.retries += 1
        error = state.outcome.exception() if state.outcome else None
        log.warning("Commerce Layer request failed (%s); retrying", type(error).__name__)

    def _once(
        self, method: str, path: str, params: Mapping[str, Any] | None, json: Any, kind: Kind
    ) -> httpx.Response:
        url = path if path.startswith("http") else f"{self.base_url}{path}"
        token = self._bearer()
        headers = {"Accept": JSONAPI, "Authorization": f"Bearer {token}"}
        content = None
        if json is not None:
            headers["Content-Type"] = JSONAPI
            content = orjson.dumps(json)
        self._pacers[kind].wait()
        self.requests += 1
        response = self._http.request(method, url, params=params, headers=headers, content=content)
        date = response.headers.get("Date")
        if date:
            with contextlib.suppress(TypeError, ValueError):
                self.server_time = parsedate_to_datetime(date).astimezone(UTC)
        status = response.status_code
        if status < 400:
            return response
        if status == 429:
            self.throttled += 1
            interval = self._interval(response)
            self._pacers[kind].back_off(interval or 1.0)
            raise Throttled(interval)
        if status >= 500:
            raise ServerError(status)
        code, detail, pointer = _errors(response)
        if status == 401 and code == "INVALID_TOKEN":
            self.invalidate_token(token)
            raise TokenExpired()
        if status in (401, 403):
            raise AuthError(status, code, detail, pointer=pointer)
        raise ApiError(status, code, detail, pointer=pointer)

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self.request("GET", path, params=params).json()

    def download(self, url: str) -> bytes:
        """A file the API points at (an export's attachment): no API headers, retried."""
        retrying = self._retrying(
            lambda e: isinstance(e, ServerError | httpx.TransportError),
            lambda state: float(self._backoff(state)),
        )

        def once() -> bytes:
            # A presigned link: the API's own headers (the bearer token) must not go with it.
            response = self._http.get(url)
            if response.status_code >= 500:
                raise ServerError(response.status_code)
            if response.status_code != 200:
                raise ApiError(response.status_code, None, "the attachment could not be read")
            return response.content

        try:
            return retrying(once)
        except (httpx.TransportError, ServerError) as exc:
            raise Unreachable(
                f"an export attachment could not be downloaded in {self._max_retry_time:g}s: "
                f"{type(exc).__name__}"
            ) from exc


def base_url_for(organization: str | None, base_url: str | None) -> str:
    if base_url:
        return base_url.rstrip("/")
    if organization:
        return f"https://{organization}.commercelayer.io/api"
    raise ConfigError("set organization (or base_url)", key="source.organization")
