"""The fake Commerce Layer API holds to the documented contract, driven by a bare stdlib client."""

from __future__ import annotations

import gzip
import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message
from typing import Any
from urllib.parse import urlencode

import pytest

from fakes.commercelayer import FakeCommerceLayer, Request

JSONAPI = "application/vnd.api+json"
CONNECTION_ERRORS = (urllib.error.URLError, ConnectionError, http.client.HTTPException)


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        errors = self.json()["errors"]
        assert len(errors) >= 1
        first: dict[str, Any] = errors[0]
        assert set(first) >= {"title", "detail", "code", "status", "source"}
        assert first["status"] == str(self.status)
        return first


def call(
    method: str, url: str, *, body: Any = None, headers: dict[str, str] | None = None
) -> Reply:
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return Reply(exc.code, exc.headers, exc.read())


class Api:
    """Just enough of a client: a token, the JSON:API headers, bracketed query strings."""

    def __init__(self, fake: FakeCommerceLayer) -> None:
        self.fake = fake
        self.access_token = ""

    def token(self, **overrides: Any) -> Reply:
        payload = {
            "grant_type": "client_credentials",
            "client_id": "cid",
            "client_secret": "csecret",
            **overrides,
        }
        return call(
            "POST",
            self.fake.auth_url,
            body=payload,
            headers={"Content-Type": "application/json"},
        )

    def login(self) -> Api:
        reply = self.token()
        assert reply.status == 200, reply.body
        self.access_token = reply.json()["access_token"]
        return self

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}", "Accept": JSONAPI, **extra}

    def get(
        self, path: str, params: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> Reply:
        url = self.fake.base_url + path + (f"?{urlencode(params)}" if params else "")
        return call("GET", url, headers=headers if headers is not None else self.headers())

    def send(
        self, method: str, path: str, document: Any, headers: dict[str, str] | None = None
    ) -> Reply:
        return call(
            method,
            self.fake.base_url + path,
            body=document,
            headers=headers if headers is not None else self.headers(**{"Content-Type": JSONAPI}),
        )

    def ids(self, params: dict[str, Any]) -> list[str]:
        reply = self.get("/customers", {"page[size]": 25, **params})
        assert reply.status == 200, reply.body
        return [resource["id"] for resource in reply.json()["data"]]


@pytest.fixture
def fake() -> Iterator[FakeCommerceLayer]:
    with FakeCommerceLayer(rate_limits=False) as server:
        server.seed_customers(60, seed=3)
        yield server


@pytest.fixture
def api(fake: FakeCommerceLayer) -> Api:
    return Api(fake).login()


def customer_document(**attributes: Any) -> dict[str, Any]:
    return {"data": {"type": "customers", "attributes": attributes}}


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --- auth ------------------------------------------------------------------------------


def test_token_answers_bearer_with_expires_in_and_the_scope_asked_for() -> None:
    with FakeCommerceLayer(token_ttl=1234) as fake:
        reply = Api(fake).token(scope="market:code:europe")
    assert reply.status == 200
    document = reply.json()
    assert set(document) == {"access_token", "token_type", "expires_in", "scope", "created_at"}
    assert document["token_type"] == "bearer"
    assert document["expires_in"] == 1234
    assert document["scope"] == "market:code:europe"


def test_bad_credentials_answer_401_unauthorized() -> None:
    with FakeCommerceLayer() as fake:
        reply = Api(fake).token(client_secret="wrong")
    assert reply.status == 401
    assert reply.error["code"] == "UNAUTHORIZED"


def test_token_endpoint_allows_30_requests_a_minute() -> None:
    with FakeCommerceLayer(rate_limit_scale=0.5) as fake:
        statuses = [Api(fake).token().status for _ in range(31)]
        assert statuses == [200] * 30 + [429]
        assert fake.throttled == 1


def test_token_expires_after_its_ttl_on_the_fakes_clock() -> None:
    now = [datetime(2026, 1, 2, 10, 0, tzinfo=UTC)]
    with FakeCommerceLayer(token_ttl=600, clock=lambda: now[0]) as fake:
        fake.seed_customers(3)
        api = Api(fake).login()
        now[0] += timedelta(seconds=599)
        assert api.get("/customers").status == 200
        now[0] += timedelta(seconds=1)
        reply = api.get("/customers")
    assert reply.status == 401
    assert reply.error["code"] == "INVALID_TOKEN"


def test_expire_tokens_makes_every_issued_token_invalid(fake: FakeCommerceLayer, api: Api) -> None:
    fake.expire_tokens()
    assert api.get("/customers").error["code"] == "INVALID_TOKEN"
    assert api.login().get("/customers").status == 200


def test_api_requests_without_a_token_answer_401(api: Api) -> None:
    reply = api.get("/customers", headers={"Accept": JSONAPI})
    assert reply.status == 401
    assert reply.error["code"] == "UNAUTHORIZED"


def test_api_requests_need_the_jsonapi_accept_header(api: Api) -> None:
    reply = api.get("/customers", headers=api.headers(Accept="application/json"))
    assert reply.status == 406


def test_writes_need_the_jsonapi_content_type(api: Api) -> None:
    headers = api.headers(**{"Content-Type": "application/json"})
    reply = api.send("POST", "/customers", customer_document(email="a@b.example"), headers)
    assert reply.status == 415
    assert reply.error["code"] == "UNSUPPORTED_MEDIA_TYPE"


# --- listing ---------------------------------------------------------------------------


def test_page_size_above_25_is_refused_with_400(api: Api) -> None:
    reply = api.get("/customers", {"page[size]": 26})
    assert reply.status == 400
    assert reply.error["source"] == {"parameter": "page[size]"}
    assert len(api.get("/customers", {"page[size]": 25}).json()["data"]) == 25


def test_default_page_is_the_first_ten_records(api: Api) -> None:
    document = api.get("/customers").json()
    assert len(document["data"]) == 10
    assert document["meta"] == {"record_count": 60, "page_count": 6}


def test_paging_links_prev_absent_on_first_next_absent_on_last(api: Api) -> None:
    params = {"page[size]": 25, "filter[q][total_orders_count_gteq]": 0}
    first = api.get("/customers", {**params, "page[number]": 1}).json()
    middle = api.get("/customers", {**params, "page[number]": 2}).json()
    last = api.get("/customers", {**params, "page[number]": 3}).json()
    assert set(first["links"]) == {"first", "last", "next"}
    assert set(middle["links"]) == {"first", "last", "prev", "next"}
    assert set(last["links"]) == {"first", "last", "prev"}
    assert len(last["data"]) == 10
    assert first["meta"] == {"record_count": 60, "page_count": 3}
    # Links are absolute, keep the query, and percent-encode brackets.
    assert first["links"]["next"].startswith(api.fake.base_url + "/customers?")
    assert "filter%5Bq%5D%5Btotal_orders_count_gteq%5D=0" in first["links"]["next"]
    assert "page%5Bnumber%5D=2" in first["links"]["next"]


def _sorted_ids(fake: FakeCommerceLayer, *keys: tuple[str, bool]) -> list[str]:
    records = list(fake.customers.values())
    for name, descending in reversed(keys):
        records.sort(
            key=lambda c, name=name: c["id"] if name == "id" else c["attributes"][name],
            reverse=descending,
        )
    return [c["id"] for c in records]


def test_sort_ascending_descending_and_on_several_fields(fake: FakeCommerceLayer, api: Api) -> None:
    def walk(sort: str) -> list[str]:
        return [i for n in (1, 2, 3) for i in api.ids({"sort": sort, "page[number]": n})]

    assert walk("updated_at,id") == _sorted_ids(fake, ("updated_at", False), ("id", False))
    assert walk("-total_orders_count,id") == _sorted_ids(
        fake, ("total_orders_count", True), ("id", False)
    )
    assert walk("-id") == _sorted_ids(fake, ("id", True))


def test_unknown_sort_field_is_refused(api: Api) -> None:
    reply = api.get("/customers", {"sort": "name"})
    assert reply.status == 400
    assert reply.error["code"] == "INVALID_SORT_CRITERIA"


def _attr(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda c: c["attributes"].get(name)


def _orders(c: dict[str, Any]) -> int:
    return int(c["attributes"]["total_orders_count"])


def _email(c: dict[str, Any]) -> str:
    return str(c["attributes"]["email"]).lower()


def _at(name: str) -> Callable[[dict[str, Any]], datetime]:
    return lambda c: datetime.fromisoformat(c["attributes"][name])


def _meta(c: dict[str, Any]) -> dict[str, Any]:
    return dict(c["attributes"]["metadata"])


_MIDDLE_ID = "M"  # ids are letters: "M" splits them in code-point order
# The 60 seeded customers are updated between 08:00 and about 08:15 on 2026-01-05.
_T = "2026-01-05T08:07:00.000Z"
_T_AT = datetime.fromisoformat(_T)

FILTER_CASES: list[tuple[str, str, Callable[[dict[str, Any]], bool]]] = [
    ("status_eq", "repeat", lambda c: _attr("status")(c) == "repeat"),
    ("status_not_eq", "repeat", lambda c: _attr("status")(c) != "repeat"),
    ("id_gt", _MIDDLE_ID, lambda c: c["id"] > _MIDDLE_ID),
    ("id_lteq", _MIDDLE_ID, lambda c: c["id"] <= _MIDDLE_ID),
    ("total_orders_count_gt", "1", lambda c: _orders(c) > 1),
    ("total_orders_count_gteq", "1", lambda c: _orders(c) >= 1),
    ("total_orders_count_lt", "1", lambda c: _orders(c) < 1),
    ("total_orders_count_lteq", "1", lambda c: _orders(c) <= 1),
    ("status_in", "prospect,repeat", lambda c: _attr("status")(c) != "acquired"),
    ("status_not_in", "prospect,repeat", lambda c: _attr("status")(c) == "acquired"),
    ("reference_null", "true", lambda c: _attr("reference")(c) is None),
    ("reference_null", "false", lambda c: _attr("reference")(c) is not None),
    ("reference_not_null", "true", lambda c: _attr("reference")(c) is not None),
    ("reference_present", "true", lambda c: bool(_attr("reference")(c))),
    ("reference_blank", "true", lambda c: not _attr("reference")(c)),
    # cont / start / end match case-insensitively, as ILIKE does.
    ("email_cont", "EXAMPLE.ORG", lambda c: "example.org" in _email(c)),
    ("email_start", "M", lambda c: _email(c).startswith("m")),
    ("email_end", ".NET", lambda c: _email(c).endswith(".net")),
    ("metadata_jcont", '{"tier":"gold"}', lambda c: _meta(c).get("tier") == "gold"),
    ("metadata_jcont", '{"tags":["b2b"]}', lambda c: "b2b" in (_meta(c).get("tags") or [])),
    ("updated_at_gteq", _T, lambda c: _at("updated_at")(c) >= _T_AT),
    ("updated_at_lt", "2026-01-05T08:07:00Z", lambda c: _at("updated_at")(c) < _T_AT),
    ("created_at_lteq", _T, lambda c: _at("created_at")(c) <= _T_AT),
    ("reference_origin_eq", "erp", lambda c: _attr("reference_origin")(c) == "erp"),
]


@pytest.mark.parametrize(("key", "value", "expected"), FILTER_CASES)
def test_filter_predicate_selects_what_it_documents(
    fake: FakeCommerceLayer,
    api: Api,
    key: str,
    value: str,
    expected: Callable[[dict[str, Any]], bool],
) -> None:
    fake.update_customer(next(iter(fake.customers)), reference="")  # present vs not null
    wanted = sorted(c["id"] for c in fake.customers.values() if expected(c))
    got = [
        i
        for n in (1, 2, 3)
        for i in api.ids({f"filter[q][{key}]": value, "sort": "id", "page[number]": n})
    ]
    assert got == wanted
    assert 0 < len(got) < len(fake.customers)  # the case discriminates


def test_customer_group_id_filter(fake: FakeCommerceLayer, api: Api) -> None:
    group = next(iter(fake.groups))
    wanted = {
        i
        for i, c in fake.customers.items()
        if (c["relationships"]["customer_group"]["data"] or {}).get("id") == group
    }
    params = {"filter[q][customer_group_id_eq]": group}
    got = {i for n in (1, 2, 3) for i in api.ids({**params, "page[number]": n})}
    assert got == wanted
    assert got


def test_filters_are_anded(fake: FakeCommerceLayer, api: Api) -> None:
    params = {"filter[q][status_eq]": "repeat", "filter[q][reference_origin_null]": "true"}
    wanted = {
        i
        for i, c in fake.customers.items()
        if c["attributes"]["status"] == "repeat" and c["attributes"]["reference_origin"] is None
    }
    assert set(api.ids(params)) == wanted


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("filter[q][name_eq]", "x"),  # unknown attribute
        ("filter[q][email_like]", "x"),  # unknown predicate
        ("filter[q][total_orders_count_cont]", "1"),  # predicate not for integers
        ("filter[q][updated_at_gt]", "yesterday"),  # not an instant
        ("filter[q][metadata_jcont]", "{not json"),
        ("filter[email]", "x"),  # not a ransack filter
    ],
)
def test_bad_filters_are_refused_with_400(api: Api, key: str, value: str) -> None:
    reply = api.get("/customers", {key: value})
    assert reply.status == 400
    assert reply.error["source"] == {"parameter": key}


def test_id_gt_keyset_walk_sees_each_record_exactly_once_while_data_changes() -> None:
    with FakeCommerceLayer(rate_limits=False) as fake:
        fake.seed_customers(230, seed=8)
        api = Api(fake).login()
        edited = iter(sorted(fake.customers, reverse=True))

        def edit_between_pages(request: Request) -> None:
            fake.update_customer(next(edited), metadata={"touched": True})

        fake.on_request(edit_between_pages)
        seen: list[str] = []
        last = ""
        while True:
            params: dict[str, Any] = {"sort": "id", "page[size]": 25}
            if last:
                params["filter[q][id_gt]"] = last
            page = api.get("/customers", params).json()["data"]
            if not page:
                break
            seen.extend(resource["id"] for resource in page)
            last = page[-1]["id"]
        assert len(seen) == len(set(seen)) == 230
        assert set(seen) == set(fake.customers)


def test_sparse_fieldsets_return_only_the_fields_asked_for(api: Api) -> None:
    resource = api.get("/customers", {"fields[customers]": "email,status"}).json()["data"][0]
    assert set(resource["attributes"]) == {"email", "status"}
    assert "relationships" not in resource
    ids_only = api.get("/customers", {"fields[customers]": "id"}).json()["data"][0]
    assert ids_only["attributes"] == {}
    assert api.get("/customers", {"fields[customers]": "email,nickname"}).status == 400


def test_include_customer_group_fills_included_and_linkage(
    fake: FakeCommerceLayer, api: Api
) -> None:
    document = api.get("/customers", {"include": "customer_group", "page[size]": 25}).json()
    linked = {
        r["relationships"]["customer_group"]["data"]["id"]
        for r in document["data"]
        if r["relationships"]["customer_group"]["data"]
    }
    assert linked
    assert {g["id"] for g in document["included"]} == linked
    assert all(g["type"] == "customer_groups" for g in document["included"])
    assert all(g["attributes"]["name"] for g in document["included"])
    # Without include there is no linkage, only links.
    plain = api.get("/customers").json()
    assert "included" not in plain
    assert "data" not in plain["data"][0]["relationships"]["customer_group"]


def test_included_groups_honour_their_own_fieldset_and_the_customers_one(api: Api) -> None:
    params = {
        "include": "customer_group",
        "fields[customers]": "email,customer_group",
        "fields[customer_groups]": "name",
        "page[size]": 25,
    }
    document = api.get("/customers", params).json()
    assert document["included"]
    assert all(set(g["attributes"]) == {"name"} for g in document["included"])
    # A restricted fieldset without the relationship drops it, included objects too.
    params["fields[customers]"] = "email"
    assert api.get("/customers", params).json()["included"] == []


def test_include_of_anything_but_customer_group_is_refused(api: Api) -> None:
    reply = api.get("/customers", {"include": "customer_addresses"})
    assert reply.status == 400
    assert reply.error["code"] == "INVALID_INCLUDE"


def test_date_header_comes_from_the_fakes_clock() -> None:
    frozen = datetime(2026, 1, 2, 10, 30, tzinfo=UTC)
    with FakeCommerceLayer(clock=lambda: frozen) as fake:
        api = Api(fake).login()
        assert api.get("/customers").headers["Date"] == "Fri, 02 Jan 2026 10:30:00 GMT"
        assert api.get("/customers/nope").headers["Date"] == "Fri, 02 Jan 2026 10:30:00 GMT"


def test_retrieve_a_customer_or_404_record_not_found(fake: FakeCommerceLayer, api: Api) -> None:
    ident = next(iter(fake.customers))
    document = api.get(f"/customers/{ident}", {"include": "customer_group"}).json()
    assert document["data"]["id"] == ident
    assert document["data"]["attributes"] == fake.customers[ident]["attributes"]
    reply = api.get("/customers/AAAAAAAAAA")
    assert reply.status == 404
    assert reply.error["code"] == "RECORD_NOT_FOUND"


# --- rate limits and faults ------------------------------------------------------------


def test_read_burst_answers_429_with_rate_limit_headers() -> None:
    with FakeCommerceLayer(mode="test", rate_limit_scale=0.1) as fake:
        fake.seed_customers(5)
        api = Api(fake).login()
        statuses = [api.get("/customers").status for _ in range(25)]
        throttled = api.get("/customers")
        # The burst window is per endpoint: another read endpoint still answers.
        other = api.get(f"/customers/{next(iter(fake.customers))}")
        assert statuses == [200] * 25
        assert throttled.status == 429
        assert throttled.error["code"] == "TOO_MANY_REQUESTS"
        assert throttled.headers["X-Ratelimit-Limit"] == "25"
        assert throttled.headers["X-Ratelimit-Interval"] == "1"
        assert throttled.headers["X-Ratelimit-Remaining"] == "0"
        assert "Retry-After" not in throttled.headers
        assert other.status == 200
        assert fake.throttled == 1
        time.sleep(1.0)  # the window slides past the burst
        assert api.get("/customers").status == 200


def test_reads_of_all_endpoints_share_the_per_minute_limit() -> None:
    # Scale 0.05: the minute is 3 s and each endpoint's burst 25 per 0.5 s.
    with FakeCommerceLayer(mode="test", rate_limit_scale=0.05) as fake:
        fake.seed_customers(3)
        api = Api(fake).login()
        ident = next(iter(fake.customers))
        paths = ["/customers", f"/customers/{ident}", "/exports/AAAAAAAAAA", "/imports/AAAAAAAAAA"]
        statuses = {api.get(path).status for path in paths for _ in range(25)}
        time.sleep(0.55)  # every burst window has emptied, the minute has not
        throttled = api.get("/customers")
        assert statuses == {200, 404}
        assert throttled.status == 429
        assert throttled.headers["X-Ratelimit-Limit"] == "100"
        assert throttled.headers["X-Ratelimit-Interval"] == "3"


def test_write_burst_is_50_in_live_mode() -> None:
    with FakeCommerceLayer(mode="live", rate_limit_scale=0.1) as fake:
        api = Api(fake).login()
        statuses = [api.send("DELETE", "/customers/AAAAAAAAAA", None).status for _ in range(51)]
        assert statuses == [404] * 50 + [429]


def test_fail_next_answers_the_status_then_recovers(api: Api) -> None:
    api.fake.fail_next(2, status=503)
    first, second = api.get("/customers"), api.get("/customers")
    assert (first.status, second.status) == (503, 503)
    assert first.error["code"] == "SERVICE_UNAVAILABLE"
    assert api.get("/customers").status == 200


def test_fail_next_only_hits_its_path_prefix(api: Api) -> None:
    api.fake.fail_next(1, status=500, path_prefix="/api/exports")
    assert api.get("/customers").status == 200
    assert api.get("/exports/AAAAAAAAAA").status == 500


def test_fail_next_drop_cuts_the_connection_without_an_answer(api: Api) -> None:
    api.fake.fail_next(1, drop=True)
    with pytest.raises(CONNECTION_ERRORS):
        api.get("/customers")
    assert api.fake.requests[-1].status == 0
    assert api.get("/customers").status == 200


def test_outage_refuses_connections_for_its_duration(api: Api) -> None:
    api.fake.outage(0.3)
    with pytest.raises(urllib.error.URLError) as caught:
        api.get("/customers")
    assert isinstance(caught.value.reason, ConnectionRefusedError)

    def back() -> bool:
        try:
            return api.get("/customers").status == 200
        except urllib.error.URLError:
            return False

    wait_for(back)


def test_one_keep_alive_connection_serves_several_requests(api: Api) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", api.fake.port, timeout=5)
    try:
        for _ in range(3):
            connection.request("GET", "/api/customers", headers=api.headers())
            response = connection.getresponse()
            assert response.status == 200
            assert json.loads(response.read())["data"]
    finally:
        connection.close()


def test_on_request_hook_sees_each_api_request_before_it_is_served(
    fake: FakeCommerceLayer, api: Api
) -> None:
    seen: list[Request] = []
    ident = next(iter(fake.customers))
    fake.on_request(seen.append)
    fake.on_request(lambda request: fake.update_customer(ident, reference="changed"))
    reply = api.get(f"/customers/{ident}", {"fields[customers]": "reference"})
    assert reply.json()["data"]["attributes"]["reference"] == "changed"
    assert [r.path for r in seen] == [f"/api/customers/{ident}"]
    assert seen[0].query == {"fields[customers]": "reference"}
    assert fake.requests[-1].status == 200


# --- writes ----------------------------------------------------------------------------


def test_create_customer_answers_201_and_never_returns_the_password(
    fake: FakeCommerceLayer, api: Api
) -> None:
    reply = api.send(
        "POST",
        "/customers",
        customer_document(email="new@shop.example", password="s3cret!", metadata={"erp_id": "E1"}),
    )
    assert reply.status == 201
    resource = reply.json()["data"]
    assert resource["attributes"]["email"] == "new@shop.example"
    assert resource["attributes"]["has_password"] is True
    assert resource["attributes"]["status"] == "prospect"
    assert "password" not in resource["attributes"]
    assert b"s3cret" not in reply.body
    assert "password" not in fake.customers[resource["id"]]["attributes"]
    assert api.get(f"/customers/{resource['id']}").json()["data"]["attributes"]["metadata"] == {
        "erp_id": "E1"
    }


@pytest.mark.parametrize(
    ("attributes", "detail"),
    [
        ({"reference": "R1"}, "can't be blank"),
        ({"email": "  "}, "can't be blank"),
        ({"email": "not-an-address"}, "is invalid"),
    ],
)
def test_create_without_a_valid_email_is_422(
    api: Api, attributes: dict[str, Any], detail: str
) -> None:
    reply = api.send("POST", "/customers", customer_document(**attributes))
    assert reply.status == 422
    assert reply.error["code"] == "VALIDATION_ERROR"
    assert reply.error["source"] == {"pointer": "/data/attributes/email"}
    assert reply.error["detail"] == detail


def test_a_duplicate_email_in_another_case_is_422_taken(fake: FakeCommerceLayer, api: Api) -> None:
    taken = next(iter(fake.customers.values()))["attributes"]["email"].strip().upper()
    reply = api.send("POST", "/customers", customer_document(email=taken))
    assert reply.status == 422
    assert reply.error["detail"] == "has already been taken"
    assert reply.error["source"]["pointer"] == "/data/attributes/email"


@pytest.mark.parametrize("name", ["status", "total_orders_count", "nickname"])
def test_read_only_or_unknown_attributes_are_refused(api: Api, name: str) -> None:
    reply = api.send("POST", "/customers", customer_document(email="x@y.example", **{name: 1}))
    assert reply.status == 400
    assert reply.error["source"] == {"pointer": f"/data/attributes/{name}"}


def test_patch_replaces_metadata_and_bumps_updated_at_only_on_change() -> None:
    now = [datetime(2026, 3, 1, 12, 0, tzinfo=UTC)]
    with FakeCommerceLayer(rate_limits=False, clock=lambda: now[0]) as fake:
        fake.seed_customers(3)
        api = Api(fake).login()
        ident = next(iter(fake.customers))
        before = fake.customers[ident]["attributes"]["updated_at"]
        patch = {"data": {"type": "customers", "id": ident, "attributes": {"metadata": {"a": 1}}}}
        reply = api.send("PATCH", f"/customers/{ident}", patch)
        assert reply.status == 200
        assert reply.json()["data"]["attributes"]["metadata"] == {"a": 1}
        assert reply.json()["data"]["attributes"]["updated_at"] == "2026-03-01T12:00:00.000Z"
        assert before != "2026-03-01T12:00:00.000Z"
        now[0] += timedelta(minutes=1)
        again = api.send("PATCH", f"/customers/{ident}", patch)
        assert again.json()["data"]["attributes"]["updated_at"] == "2026-03-01T12:00:00.000Z"


def test_patch_needs_the_body_id_to_match_the_url(fake: FakeCommerceLayer, api: Api) -> None:
    ident = next(iter(fake.customers))
    patch = {"data": {"type": "customers", "id": "other", "attributes": {"reference": "R"}}}
    reply = api.send("PATCH", f"/customers/{ident}", patch)
    assert reply.status == 400
    assert reply.error["code"] == "KEY_NOT_INCLUDED_IN_URL"


def test_patch_of_an_unknown_customer_is_404(api: Api) -> None:
    patch = {"data": {"type": "customers", "id": "AAAAAAAAAA", "attributes": {"reference": "R"}}}
    assert api.send("PATCH", "/customers/AAAAAAAAAA", patch).status == 404


def test_patch_to_an_email_another_customer_has_is_422(fake: FakeCommerceLayer, api: Api) -> None:
    first, second = list(fake.customers.values())[:2]
    patch = {
        "data": {
            "type": "customers",
            "id": first["id"],
            "attributes": {"email": second["attributes"]["email"]},
        }
    }
    assert api.send("PATCH", f"/customers/{first['id']}", patch).status == 422


def test_delete_answers_204_then_the_customer_is_gone(fake: FakeCommerceLayer, api: Api) -> None:
    ident = next(iter(fake.customers))
    reply = api.send("DELETE", f"/customers/{ident}", None, api.headers())
    assert reply.status == 204
    assert reply.body == b""
    assert api.get(f"/customers/{ident}").status == 404


def test_update_customer_bumps_updated_at_to_the_fakes_clock() -> None:
    at = datetime(2026, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
    with FakeCommerceLayer(clock=lambda: at) as fake:
        fake.seed_customers(2)
        ident = next(iter(fake.customers))
        fake.update_customer(ident, total_orders_count=2)
        attributes = fake.customers[ident]["attributes"]
        assert attributes["updated_at"] == "2026-02-03T04:05:06.789Z"
        assert attributes["status"] == "repeat"


# --- exports ---------------------------------------------------------------------------


def export_document(**attributes: Any) -> dict[str, Any]:
    return {"data": {"type": "exports", "attributes": {"resource_type": "customers", **attributes}}}


def wait_export(api: Api, ident: str) -> dict[str, Any]:
    states: list[str] = []

    def done() -> bool:
        attributes: dict[str, Any] = api.get(f"/exports/{ident}").json()["data"]["attributes"]
        states.append(attributes["status"])
        return attributes["status"] in ("completed", "failed")

    wait_for(done)
    return dict(api.get(f"/exports/{ident}").json()["data"]["attributes"])


def test_export_lifecycle_gives_a_gzipped_json_array_of_flat_records(
    fake: FakeCommerceLayer, api: Api
) -> None:
    since = sorted(c["attributes"]["updated_at"] for c in fake.customers.values())[30]
    filters = {"updated_at_gteq": since}
    created = api.send(
        "POST",
        "/exports",
        export_document(format="json", filters=filters, includes=["customer_group"]),
    )
    assert created.status == 201
    assert created.json()["data"]["attributes"]["status"] == "pending"
    attributes = wait_export(api, created.json()["data"]["id"])
    assert attributes["status"] == "completed"
    # The download takes no bearer token: it is a presigned storage URL.
    download = call("GET", attributes["attachment_url"])
    records = json.loads(gzip.decompress(download.body))
    wanted = {i for i, c in fake.customers.items() if c["attributes"]["updated_at"] >= since}
    assert {r["id"] for r in records} == wanted
    assert attributes["records_count"] == len(wanted)
    record = next(r for r in records if r["customer_group_id"])
    source = fake.customers[record["id"]]
    assert record["email"] == source["attributes"]["email"]
    assert record["metadata"] == source["attributes"]["metadata"]
    assert record["customer_group"]["id"] == record["customer_group_id"]
    assert record["customer_group"]["name"]


def test_export_csv_has_a_header_row_and_metadata_as_json(api: Api) -> None:
    created = api.send(
        "POST", "/exports", export_document(format="csv", fields=["email", "metadata"])
    )
    attributes = wait_export(api, created.json()["data"]["id"])
    text = gzip.decompress(call("GET", attributes["attachment_url"]).body).decode()
    lines = text.splitlines()
    assert lines[0] == "id,email,metadata"
    assert len(lines) == 61
    assert '"{""' in lines[1]


def test_attachment_url_expires_and_a_fresh_get_issues_a_new_one(api: Api) -> None:
    created = api.send("POST", "/exports", export_document())
    ident = created.json()["data"]["id"]
    old_url = wait_export(api, ident)["attachment_url"]
    api.fake.expire_attachments()
    expired = call("GET", old_url)
    assert expired.status == 403
    assert b"<Code>AccessDenied</Code>" in expired.body
    new_url = api.get(f"/exports/{ident}").json()["data"]["attributes"]["attachment_url"]
    assert new_url != old_url
    assert call("GET", new_url).status == 200


def test_attachment_url_lives_attachment_ttl_seconds(api: Api) -> None:
    api.fake.attachment_ttl = 0.5
    created = api.send("POST", "/exports", export_document())
    url = wait_export(api, created.json()["data"]["id"])["attachment_url"]
    assert call("GET", url).status == 200
    time.sleep(0.55)
    assert call("GET", url).status == 403


def test_attachment_refuses_a_bearer_token_as_presigned_storage_does(api: Api) -> None:
    created = api.send("POST", "/exports", export_document())
    url = wait_export(api, created.json()["data"]["id"])["attachment_url"]
    assert call("GET", url, headers=api.headers()).status == 400


def test_attachment_can_be_served_with_content_encoding_gzip(api: Api) -> None:
    api.fake.attachment_content_encoding = "gzip"
    created = api.send("POST", "/exports", export_document())
    download = call("GET", wait_export(api, created.json()["data"]["id"])["attachment_url"])
    assert download.headers["Content-Encoding"] == "gzip"
    assert download.headers["Content-Type"] == "application/json"
    assert len(json.loads(gzip.decompress(download.body))) == 60


def test_at_most_10_exports_pending_or_running(api: Api) -> None:
    api.fake.export_delay = 30.0
    ids = []
    for _ in range(10):
        reply = api.send("POST", "/exports", export_document())
        assert reply.status == 201
        ids.append(reply.json()["data"]["id"])
    refused = api.send("POST", "/exports", export_document())
    assert refused.status == 422
    assert refused.error["code"] == "VALIDATION_ERROR"
    api.fake.fail_export(ids[0])
    assert api.get(f"/exports/{ids[0]}").json()["data"]["attributes"]["status"] == "failed"
    assert api.send("POST", "/exports", export_document()).status == 201


def test_export_that_matches_nothing_is_422(api: Api) -> None:
    reply = api.send("POST", "/exports", export_document(filters={"email_eq": "nobody@x.example"}))
    assert reply.status == 422


def test_export_above_10000_records_is_422() -> None:
    with FakeCommerceLayer(rate_limits=False) as fake:
        fake.seed_customers(10_001, groups=0)
        api = Api(fake).login()
        assert api.send("POST", "/exports", export_document()).status == 422
        first_10000 = {"id_lteq": sorted(fake.customers)[9_999]}
        assert api.send("POST", "/exports", export_document(filters=first_10000)).status == 201


def test_export_with_a_bad_filter_is_422(api: Api) -> None:
    reply = api.send("POST", "/exports", export_document(filters={"name_eq": "x"}))
    assert reply.status == 422
    assert reply.error["source"] == {"pointer": "/data/attributes/filters/name_eq"}


# --- imports ---------------------------------------------------------------------------


def import_document(inputs: list[Any], **attributes: Any) -> dict[str, Any]:
    return {
        "data": {
            "type": "imports",
            "attributes": {
                "resource_type": "customers",
                "format": "json",
                "inputs": inputs,
                **attributes,
            },
        }
    }


def wait_import(api: Api, ident: str) -> dict[str, Any]:
    def done() -> bool:
        status = api.get(f"/imports/{ident}").json()["data"]["attributes"]["status"]
        return status in ("completed", "interrupted")

    wait_for(done)
    return dict(api.get(f"/imports/{ident}").json()["data"]["attributes"])


def test_import_matches_by_id_or_email_creates_the_rest_and_logs_errors(
    fake: FakeCommerceLayer, api: Api
) -> None:
    first, second, third = list(fake.customers.values())[:3]
    inputs = [
        {"email": first["attributes"]["email"].upper(), "reference": "BY-EMAIL"},
        {"id": second["id"], "metadata": {"erp_id": "E-BY-ID"}},
        {"email": "brand.new@shop.example", "reference": "NEW"},
        {"email": "broken"},
        {"reference": "no email"},
        {"id": first["id"], "email": third["attributes"]["email"]},
    ]
    created = api.send("POST", "/imports", import_document(inputs, skip_errors=True))
    assert created.status == 201
    assert created.json()["data"]["attributes"]["status"] == "pending"
    attributes = wait_import(api, created.json()["data"]["id"])
    assert attributes["status"] == "completed"
    assert attributes["processed_count"] == 3
    assert attributes["errors_count"] == 3
    assert attributes["errors_log"] == {
        "3": {"email": ["is invalid"]},
        "4": {"email": ["can't be blank"]},
        "5": {"email": ["has already been taken"]},
    }
    assert fake.customers[first["id"]]["attributes"]["reference"] == "BY-EMAIL"
    assert fake.customers[second["id"]]["attributes"]["metadata"] == {"erp_id": "E-BY-ID"}
    created_ids = [i for i, c in fake.customers.items() if c["attributes"]["reference"] == "NEW"]
    assert len(created_ids) == 1
    # One instant for the whole import.
    stamps = {fake.customers[i]["attributes"]["updated_at"] for i in (first["id"], second["id"])}
    assert len(stamps) == 1


def test_import_without_skip_errors_stops_past_10_percent_errors(
    fake: FakeCommerceLayer, api: Api
) -> None:
    inputs = [{"email": f"ok{n}@shop.example"} for n in range(8)]
    inputs[2] = {"email": "bad-1"}
    inputs[4] = {"email": "bad-2"}
    created = api.send("POST", "/imports", import_document(inputs))
    attributes = wait_import(api, created.json()["data"]["id"])
    assert attributes["status"] == "interrupted"
    assert attributes["errors_count"] == 1  # one error in 8 inputs is already past 10 %
    assert set(attributes["errors_log"]) == {"2"}
    emails = {c["attributes"]["email"] for c in fake.customers.values()}
    assert {"ok0@shop.example", "ok1@shop.example"} <= emails
    assert "ok3@shop.example" not in emails


def test_import_of_more_than_10000_inputs_is_422(api: Api) -> None:
    inputs = [{"email": f"c{n}@shop.example"} for n in range(10_001)]
    reply = api.send("POST", "/imports", import_document(inputs))
    assert reply.status == 422
    assert reply.error["source"] == {"pointer": "/data/attributes/inputs"}


# --- the record ------------------------------------------------------------------------


def test_requests_are_recorded_with_decoded_bracket_keys_and_statuses(api: Api) -> None:
    api.get("/customers", {"filter[q][id_gt]": "abc", "page[size]": 26})
    request = api.fake.requests[-1]
    assert (request.method, request.path, request.status) == ("GET", "/api/customers", 400)
    assert request.query == {"filter[q][id_gt]": "abc", "page[size]": "26"}
    assert request.headers["accept"] == JSONAPI
