"""The ``commercelayer`` target against the fake Commerce Layer API on loopback: the target
contract, matching by email and by reference, the Imports API for large batches, and a
Shopify migration driven through the CLI."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from custsync._fake import customer_groups
from custsync.commercelayer.target import CommerceLayerTarget, CommerceLayerTargetSettings
from custsync.errors import ConfigError
from custsync.targets.base import ColumnSpec, Key, Outcome, RowResult, RowSchema
from custsync.testing import T0, T1, TargetContract, TargetFactory
from fakes.commercelayer import FakeCommerceLayer, Request

STAMP = "2025-06-01T10:00:00.000Z"

# --- helpers ---------------------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeCommerceLayer]:
    # Rate limits off: pacing is the client's business (and its tests'); these pin the
    # target's decisions and requests without waiting out the real write limits.
    with FakeCommerceLayer(rate_limits=False, import_delay=0.01) as server:
        yield server


def settings(fake: FakeCommerceLayer, **overrides: Any) -> CommerceLayerTargetSettings:
    values: dict[str, Any] = {
        "base_url": fake.base_url,
        "auth_url": fake.auth_url,
        "client_id": fake.client_id,
        "client_secret": SecretStr(fake.client_secret),
        "requests_per_minute": 60_000,
        "burst_per_10s": 10_000,
        "max_retry_time": 5.0,
        **overrides,
    }
    return CommerceLayerTargetSettings(**values)


def make_target(fake: FakeCommerceLayer, **overrides: Any) -> CommerceLayerTarget:
    return CommerceLayerTarget(settings(fake, **overrides), poll_interval=0.02)


def schema(*columns: str, key: str = "email", policy: Any = "upsert") -> RowSchema:
    types: dict[str, Any] = {"metadata": "json"}
    return RowSchema(
        tuple(ColumnSpec(c, types.get(c, "text"), nullable=c != key) for c in columns),
        key=(key,),
        match_policy=policy,
    )


def prepared(fake: FakeCommerceLayer, row_schema: RowSchema, **overrides: Any) -> Any:
    target = make_target(fake, match_by=row_schema.key[0], **overrides)
    target.prepare(row_schema)
    return target


def seed(fake: FakeCommerceLayer, ident: str, email: str, **attributes: Any) -> None:
    fake.add_customers(
        [
            {
                "id": ident,
                "type": "customers",
                "attributes": {
                    "email": email,
                    "created_at": STAMP,
                    "updated_at": STAMP,
                    "reference": None,
                    "reference_origin": None,
                    "metadata": {},
                    **attributes,
                },
                "meta": {"mode": "test"},
            }
        ]
    )


def attributes_of(fake: FakeCommerceLayer, ident: str) -> dict[str, Any]:
    return dict(fake.customers[ident]["attributes"])


def by_email(fake: FakeCommerceLayer) -> dict[str, dict[str, Any]]:
    return {c["attributes"]["email"]: c for c in fake.customers.values()}


def outcomes(results: list[RowResult]) -> dict[Key, Outcome]:
    return {r.key: r.outcome for r in results}


def writes(fake: FakeCommerceLayer, path: str = "/api/customers") -> list[Request]:
    return [r for r in fake.requests if r.method != "GET" and r.path.startswith(path)]


# --- the contract ----------------------------------------------------------------------

# The contract's rows, as Commerce Layer fields: the key is the reference, ``name`` the
# tax exemption code, and the other values live in metadata (a customer has no integer,
# boolean or timestamp field one can write).
CL_CONTRACT_SCHEMA = RowSchema(
    columns=(
        ColumnSpec("reference", "text", nullable=False, length=255),
        ColumnSpec("email", "text"),
        ColumnSpec("tax_exemption_code", "text"),
        ColumnSpec("metadata", "json"),
    ),
    key=("reference",),
)
CONTRACT_NAMES = ("key", "name", "n", "flag", "data", "updated_at")


class TestCommerceLayerTargetContract(TargetContract):
    supports_refusal = True
    schema = CL_CONTRACT_SCHEMA

    @staticmethod
    def row(key: str, **values: Any) -> dict[str, Any]:
        base = TargetContract.row(key, **{k: v for k, v in values.items() if k in CONTRACT_NAMES})
        stamp = base["updated_at"]
        return {
            "key": key,  # the contract's handle on the row; not a schema field, so not sent
            "reference": key,
            "email": values.get("email", f"{key}@contract.example"),
            "tax_exemption_code": base["name"],
            "metadata": {
                "n": base["n"],
                "flag": base["flag"],
                "data": base["data"],
                "updated_at": None if stamp is None else stamp.astimezone(UTC).isoformat(),
            },
        }

    @pytest.fixture
    def target_factory(self, fake: FakeCommerceLayer) -> TargetFactory:
        self.fake = fake
        return lambda: make_target(fake, match_by="reference")

    @pytest.fixture
    def refused_row(self) -> dict[str, Any]:
        return self.row("refused", email="not an e-mail")  # 422 VALIDATION_ERROR: is invalid

    def read_back(self, target: Any, key: Key) -> dict[str, Any] | None:
        found = [
            c["attributes"]
            for c in self.fake.customers.values()
            if c["attributes"].get("reference") == key[0]
        ]
        assert len(found) <= 1, f"{len(found)} customers hold reference {key[0]!r}"
        if not found:
            return None
        stored = found[0]
        metadata = stored.get("metadata") or {}
        stamp = metadata.get("updated_at")
        return {
            "reference": stored.get("reference"),
            "email": stored.get("email"),
            "tax_exemption_code": stored.get("tax_exemption_code"),
            "metadata": metadata,
            # The contract's names, for the tests that read one value back.
            "name": stored.get("tax_exemption_code"),
            "data": metadata.get("data"),
            "updated_at": None if stamp is None else datetime.fromisoformat(stamp),
        }

    @pytest.mark.skip(
        reason="no guard: Commerce Layer sets updated_at itself, so no customer field can hold "
        "the source's updated_at; an HTTP target relies on the watermark (DESIGN.md)"
    )
    def test_an_older_row_is_stale_and_not_written(self, target_factory: TargetFactory) -> None:
        raise AssertionError("skipped")

    @pytest.mark.skip(
        reason="Commerce Layer has no writable timestamp field (created_at/updated_at are the "
        "server's); a timestamp in metadata is JSON text, which the JSON round trip covers"
    )
    def test_timestamps_round_trip_in_utc_with_microseconds(
        self, target_factory: TargetFactory
    ) -> None:
        raise AssertionError("skipped")

    def test_results_are_correlated_by_key(self, target_factory: TargetFactory) -> None:
        # The contract's test, with the older row UPDATED rather than STALE: no guard here.
        with self.prepared(target_factory) as target:
            self.seed(target, [self.row(k, updated_at=T1) for k in ("upd", "same", "old")])
            batch = [
                *(self.row(f"new-{i}") for i in range(5)),
                self.row("upd", name="changed", updated_at=T1),
                self.row("same", updated_at=T1),
                self.row("old", name="older", updated_at=T0),
            ]
            random.Random(7).shuffle(batch)
            want = {(f"new-{i}",): Outcome.INSERTED for i in range(5)}
            want |= {("upd",): Outcome.UPDATED, ("same",): Outcome.UNCHANGED}
            want |= {("old",): Outcome.UPDATED}
            self.expect(target.write(batch), want)


# --- matching by email -----------------------------------------------------------------


def test_rows_are_inserted_updated_or_unchanged_by_email(fake: FakeCommerceLayer) -> None:
    seed(fake, "AAAAAAAAAA", "ada@example.com", reference="A-1")
    seed(fake, "BBBBBBBBBB", "bob@example.com", reference="B-1")
    target = prepared(fake, schema("email", "reference"))
    rows = [
        {"email": "ada@example.com", "reference": "A-2"},
        {"email": "bob@example.com", "reference": "B-1"},
        {"email": "cy@example.com", "reference": "C-1"},
    ]
    results = target.write(rows)
    assert outcomes(results) == {
        ("ada@example.com",): Outcome.UPDATED,
        ("bob@example.com",): Outcome.UNCHANGED,
        ("cy@example.com",): Outcome.INSERTED,
    }
    ids = {r.key[0]: r.target_id for r in results}
    assert ids["ada@example.com"] == "AAAAAAAAAA"
    assert ids["bob@example.com"] == "BBBBBBBBBB"
    assert fake.customers[str(ids["cy@example.com"])]["attributes"]["reference"] == "C-1"
    assert attributes_of(fake, "AAAAAAAAAA")["reference"] == "A-2"
    # Unchanged rows cost no request; the lookup is one list request for the batch.
    assert [(r.method, r.path) for r in writes(fake)] == [
        ("PATCH", "/api/customers/AAAAAAAAAA"),
        ("POST", "/api/customers"),
    ]
    assert outcomes(target.write(rows)) == dict.fromkeys(outcomes(results), Outcome.UNCHANGED)


def test_an_email_stored_in_another_case_is_the_same_customer(fake: FakeCommerceLayer) -> None:
    seed(fake, "AAAAAAAAAA", "Ada.Lovelace@Example.COM", metadata={"tier": "gold"})
    target = prepared(fake, schema("email", "metadata"))
    results = target.write([{"email": "ada.lovelace@example.com", "metadata": {"vip": True}}])
    assert outcomes(results) == {("ada.lovelace@example.com",): Outcome.UPDATED}
    assert results[0].target_id == "AAAAAAAAAA"
    assert len(fake.customers) == 1
    assert attributes_of(fake, "AAAAAAAAAA")["metadata"] == {"tier": "gold", "vip": True}


def test_update_only_fails_absent_customers_and_create_only_leaves_present_ones(
    fake: FakeCommerceLayer,
) -> None:
    seed(fake, "AAAAAAAAAA", "ada@example.com", reference="A-1")
    update_only = prepared(fake, schema("email", "reference", policy="update_only"))
    results = update_only.write(
        [
            {"email": "ada@example.com", "reference": "A-2"},
            {"email": "new@example.com", "reference": "N-1"},
        ]
    )
    assert outcomes(results) == {
        ("ada@example.com",): Outcome.UPDATED,
        ("new@example.com",): Outcome.FAILED,
    }
    assert "update_only" in str(results[1].message)
    assert "new@example.com" not in by_email(fake)

    create_only = prepared(fake, schema("email", "reference", policy="create_only"))
    results = create_only.write(
        [
            {"email": "ada@example.com", "reference": "A-3"},
            {"email": "new@example.com", "reference": "N-1"},
        ]
    )
    assert outcomes(results) == {
        ("ada@example.com",): Outcome.UNCHANGED,
        ("new@example.com",): Outcome.INSERTED,
    }
    assert attributes_of(fake, "AAAAAAAAAA")["reference"] == "A-2"


def test_metadata_is_merged_with_what_is_stored_and_sent_whole(fake: FakeCommerceLayer) -> None:
    seed(fake, "AAAAAAAAAA", "ada@example.com", metadata={"erp_id": "E-1", "tier": "silver"})
    target = prepared(fake, schema("email", "metadata"))
    results = target.write([{"email": "ada@example.com", "metadata": {"tier": "gold", "n": 2}}])
    assert outcomes(results) == {("ada@example.com",): Outcome.UPDATED}
    whole = {"erp_id": "E-1", "tier": "gold", "n": 2}
    assert attributes_of(fake, "AAAAAAAAAA")["metadata"] == whole
    (patch,) = writes(fake)
    assert patch.json()["data"]["attributes"] == {"metadata": whole}
    again = target.write([{"email": "ada@example.com", "metadata": {"n": 2}}])
    assert outcomes(again) == {("ada@example.com",): Outcome.UNCHANGED}


def test_the_customer_group_is_set_as_a_relationship(fake: FakeCommerceLayer) -> None:
    first, second = (g["id"] for g in customer_groups(2, mode="test"))
    fake.add_groups(customer_groups(2, mode="test"))
    target = prepared(fake, schema("email", "customer_group_id"))
    row = {"email": "ada@example.com", "customer_group_id": first}
    (created,) = target.write([row])
    assert created.outcome is Outcome.INSERTED
    linkage = fake.customers[str(created.target_id)]["relationships"]["customer_group"]["data"]
    assert linkage == {"type": "customer_groups", "id": first}
    assert outcomes(target.write([row])) == {("ada@example.com",): Outcome.UNCHANGED}
    moved = target.write([{**row, "customer_group_id": second}])
    assert outcomes(moved) == {("ada@example.com",): Outcome.UPDATED}
    linkage = fake.customers[str(created.target_id)]["relationships"]["customer_group"]["data"]
    assert linkage == {"type": "customer_groups", "id": second}


def test_a_password_is_set_on_create_and_appears_in_no_message_or_log(
    fake: FakeCommerceLayer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    target = prepared(fake, schema("email", "password"))
    secret = SecretStr("s3cret-Passw0rd")
    (created,) = target.write([{"email": "ada@example.com", "password": secret}])
    assert created.outcome is Outcome.INSERTED
    assert fake.passwords[str(created.target_id)] == "s3cret-Passw0rd"
    # Never read back, so never compared: a second run leaves the customer alone.
    (again,) = target.write([{"email": "ada@example.com", "password": SecretStr("other")}])
    assert again.outcome is Outcome.UNCHANGED
    (refused,) = target.write([{"email": "not an e-mail", "password": secret}])
    assert refused.outcome is Outcome.FAILED
    shown = caplog.text + repr(target) + repr(target.settings) + str(refused.message)
    for secret_text in ("s3cret-Passw0rd", fake.client_secret):
        assert secret_text not in shown


def test_unknown_fields_and_a_key_other_than_match_by_are_config_errors(
    fake: FakeCommerceLayer,
) -> None:
    target = make_target(fake)
    with pytest.raises(ConfigError, match="'first_name'"):
        target.prepare(schema("email", "first_name"))
    with pytest.raises(ConfigError, match="match_by = 'email'") as error:
        target.prepare(schema("email", "reference", key="reference"))
    assert error.value.key == "target.key"
    with pytest.raises(ConfigError, match="needs an email"):
        make_target(fake, match_by="reference").prepare(schema("reference", key="reference"))


def test_a_value_no_customer_field_can_hold_fails_its_row_without_a_request(
    fake: FakeCommerceLayer,
) -> None:
    target = prepared(fake, schema("email", "metadata"))
    results = target.write(
        [
            {"email": "ada@example.com", "metadata": "gold"},
            {"email": "bob@example.com", "metadata": {"tier": "gold"}},
        ]
    )
    assert outcomes(results) == {
        ("ada@example.com",): Outcome.FAILED,
        ("bob@example.com",): Outcome.INSERTED,
    }
    assert results[0].message == "metadata must be an object, not str"
    assert len(writes(fake)) == 1


def test_check_reaches_the_api_and_says_how_customers_are_matched(
    fake: FakeCommerceLayer,
) -> None:
    seed(fake, "AAAAAAAAAA", "ada@example.com")
    (line,) = make_target(fake, match_by="reference").check()
    assert "1 customers (test mode), matched by reference" in line


# --- matching by reference -----------------------------------------------------------------


def test_rows_are_matched_by_reference(fake: FakeCommerceLayer) -> None:
    seed(fake, "AAAAAAAAAA", "old@example.com", reference="R-1")
    target = prepared(fake, schema("reference", "email", key="reference"))
    rows = [
        {"reference": "R-1", "email": "new@example.com"},
        {"reference": "R-2", "email": "two@example.com"},
    ]
    results = target.write(rows)
    assert outcomes(results) == {("R-1",): Outcome.UPDATED, ("R-2",): Outcome.INSERTED}
    assert attributes_of(fake, "AAAAAAAAAA")["email"] == "new@example.com"
    assert outcomes(target.write(rows)) == {
        ("R-1",): Outcome.UNCHANGED,
        ("R-2",): Outcome.UNCHANGED,
    }
    assert len(fake.customers) == 2


def test_a_reference_two_customers_hold_fails_its_row(fake: FakeCommerceLayer) -> None:
    seed(fake, "AAAAAAAAAA", "one@example.com", reference="R-1")
    seed(fake, "BBBBBBBBBB", "two@example.com", reference="R-1")
    target = prepared(fake, schema("reference", "email", key="reference"))
    results = target.write(
        [
            {"reference": "R-1", "email": "one@example.com"},
            {"reference": "R-2", "email": "three@example.com"},
        ]
    )
    assert outcomes(results) == {("R-1",): Outcome.FAILED, ("R-2",): Outcome.INSERTED}
    assert results[0].message == "reference is not unique: 2 customers"


def test_reference_origin_tells_customers_of_other_systems_apart(fake: FakeCommerceLayer) -> None:
    seed(fake, "AAAAAAAAAA", "erp@example.com", reference="7", reference_origin="erp")
    seed(fake, "BBBBBBBBBB", "shop@example.com", reference="7", reference_origin="shopify")
    target = prepared(fake, schema("reference", "reference_origin", "email", key="reference"))
    row = {"reference": "7", "reference_origin": "shopify", "email": "shop2@example.com"}
    (result,) = target.write([row])
    assert (result.outcome, result.target_id) == (Outcome.UPDATED, "BBBBBBBBBB")
    assert attributes_of(fake, "AAAAAAAAAA")["email"] == "erp@example.com"
    # The only customer with the reference belongs to another system: a new customer.
    seed(fake, "CCCCCCCCCC", "erp8@example.com", reference="8", reference_origin="erp")
    (other,) = target.write([{**row, "reference": "8", "email": "shop8@example.com"}])
    assert other.outcome is Outcome.INSERTED
    assert attributes_of(fake, "CCCCCCCCCC")["reference_origin"] == "erp"


def test_a_duplicate_email_fails_alone_and_the_rest_commits(fake: FakeCommerceLayer) -> None:
    seed(fake, "AAAAAAAAAA", "taken@example.com", reference="R-1")
    target = prepared(fake, schema("reference", "email", key="reference"))
    rows = [{"reference": f"N-{i}", "email": f"n{i}@example.com"} for i in range(4)] + [
        {"reference": "N-dup", "email": "TAKEN@example.com"}
    ]
    results = target.write(rows)
    assert outcomes(results) == {
        **{(f"N-{i}",): Outcome.INSERTED for i in range(4)},
        ("N-dup",): Outcome.FAILED,
    }
    message = str(results[-1].message)
    assert "has already been taken" in message
    assert "/data/attributes/email" in message
    assert len(fake.customers) == 5
    assert attributes_of(fake, "AAAAAAAAAA")["reference"] == "R-1"


def test_a_customer_deleted_after_the_lookup_fails_its_row(fake: FakeCommerceLayer) -> None:
    seed(fake, "AAAAAAAAAA", "ada@example.com", reference="A-1")

    def vanish(request: Request) -> None:
        if request.method == "PATCH" and "AAAAAAAAAA" in fake.customers:
            fake.delete_customer("AAAAAAAAAA")

    fake.on_request(vanish)
    target = prepared(fake, schema("email", "reference"))
    results = target.write(
        [
            {"email": "ada@example.com", "reference": "A-2"},
            {"email": "bob@example.com", "reference": "B-1"},
        ]
    )
    assert outcomes(results) == {
        ("ada@example.com",): Outcome.FAILED,
        ("bob@example.com",): Outcome.INSERTED,
    }
    assert "no longer exists" in str(results[0].message)


# --- the Imports API --------------------------------------------------------------------------


def test_a_batch_over_the_threshold_goes_through_one_import(fake: FakeCommerceLayer) -> None:
    for i in range(10):
        seed(fake, f"SEEDED{i:04d}", f"old{i}@example.com", metadata={"keep": i})
    target = prepared(fake, schema("email", "metadata", "reference"), import_threshold=10)
    old = [
        {"email": f"old{i}@example.com", "reference": None, "metadata": {"n": i if i < 5 else None}}
        for i in range(10)
    ]
    new = [
        {"email": f"new{i}@example.com", "reference": f"R-{i}", "metadata": {}} for i in range(18)
    ]
    bad = [{"email": f"bad {i}", "reference": f"X-{i}", "metadata": None} for i in range(2)]
    rows = old + new + bad
    random.Random(3).shuffle(rows)
    results = target.write(rows)

    want = {(f"old{i}@example.com",): Outcome.UPDATED for i in range(10)}
    want |= {(f"new{i}@example.com",): Outcome.INSERTED for i in range(18)}
    want |= {(f"bad {i}",): Outcome.FAILED for i in range(2)}
    assert outcomes(results) == want
    failed = [r for r in results if r.outcome is Outcome.FAILED]
    assert all("email" in str(r.message) and "invalid" in str(r.message) for r in failed)
    # One import, no single writes, and every lookup within the API's page size.
    assert [(r.method, r.path) for r in writes(fake, "/api/")] == [("POST", "/api/imports")]
    assert len(target.imports) == 1
    lookups = [r for r in fake.requests if r.method == "GET" and r.path == "/api/customers"]
    assert len(lookups) >= 2
    assert all(int(r.query["page[size]"]) <= 25 for r in lookups)
    assert all(len(r.query["filter[q][email_in]"].split(",")) <= 25 for r in lookups)
    # Existing customers were matched by id, their metadata merged.
    assert len(fake.customers) == 28
    assert attributes_of(fake, "SEEDED0003")["metadata"] == {"keep": 3, "n": 3}
    assert attributes_of(fake, "SEEDED0007")["metadata"] == {"keep": 7, "n": None}
    assert by_email(fake)["new4@example.com"]["attributes"]["reference"] == "R-4"
    again = target.write([r for r in rows if not str(r["email"]).startswith("bad")])
    assert set(outcomes(again).values()) == {Outcome.UNCHANGED}


def test_an_import_by_reference_never_takes_a_customer_over_by_email(
    fake: FakeCommerceLayer,
) -> None:
    seed(fake, "AAAAAAAAAA", "taken@example.com", reference="R-1")
    target = prepared(fake, schema("reference", "email", key="reference"), import_threshold=1)
    results = target.write(
        [
            {"reference": "N-1", "email": "taken@example.com"},
            {"reference": "N-2", "email": "free@example.com"},
            {"reference": "N-3", "email": "free3@example.com"},
        ]
    )
    assert outcomes(results) == {
        ("N-1",): Outcome.FAILED,
        ("N-2",): Outcome.INSERTED,
        ("N-3",): Outcome.INSERTED,
    }
    assert "has already been taken" in str(results[0].message)
    assert attributes_of(fake, "AAAAAAAAAA")["reference"] == "R-1"


def test_preview_of_a_large_batch_starts_no_import(fake: FakeCommerceLayer) -> None:
    target = prepared(fake, schema("email"), import_threshold=2)
    rows = [{"email": f"p{i}@example.com"} for i in range(5)]
    assert set(outcomes(target.preview(rows)).values()) == {Outcome.INSERTED}
    assert writes(fake, "/api/") == []
    assert fake.customers == {}


# --- a migration through the CLI ----------------------------------------------------------------

SHOPIFY_HEADER = (
    "Customer ID,First Name,Last Name,Email,Accepts Email Marketing,"
    "Default Address Company,Default Address Address1,Default Address Address2,"
    "Default Address City,Default Address Province Code,Default Address Country Code,"
    "Default Address Zip,Default Address Phone,Phone,Accepts SMS Marketing,Total Spent,"
    "Total Orders,Note,Tax Exempt,Tags"
)
SHOPIFY_ROWS = [
    "'8779761975521,Rahim,Uddin, Rahim.Uddin@Example.COM ,yes,Uddin Traders,House 12,,Dhaka,,BD,"
    "'1207,,'+8801712345678,no,120.50,3,,no,vip",
    "'8779761975522,Giulia,Rossi,giulia.rossi@example.it,no,,Via Roma 1,,Milano,MI,IT,'20121,,,"
    "no,0.00,0,,no,",
    "'8779761975523,Jürgen,Müller,juergen@example.de,yes,Müller & Söhne,Bahnhofstraße 1,,"
    'Köln,NW,DE,\'50667,,,yes,99.90,1,"Prefers e-mail, not phone",no,"b2b, eu"',
]


def run_sync(job: Path, env: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "custsync.cli", "sync", str(job), "--json"],
        cwd=job.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


def test_a_shopify_export_migrates_into_commerce_layer_through_the_cli(
    tmp_path: Path,
) -> None:
    # The fake's real test-mode limits, paced by the job's defaults: no 429 on the way.
    with FakeCommerceLayer(import_delay=0.01) as fake:
        # A customer Commerce Layer already holds, with metadata the migration must keep.
        seed(fake, "KEEPERIDAB", "giulia.rossi@example.it", metadata={"erp_id": "E-7"})
        (tmp_path / "customers_export.csv").write_text(
            "\n".join([SHOPIFY_HEADER, *SHOPIFY_ROWS]) + "\n", encoding="utf-8"
        )
        job = tmp_path / "migrate.toml"
        job.write_text(
            textwrap.dedent(
                f"""\
                name = "shopify-to-cl"

                [source]
                connector = "shopify_csv"
                path = "customers_export.csv"

                [target]
                connector = "commercelayer"
                base_url = "{fake.base_url}"
                auth_url = "{fake.auth_url}"
                client_id = "{fake.client_id}"
                client_secret = "${{CL_SECRET}}"
                match_by = "email"

                [mapping.fields]
                email = "email"
                reference = "reference"
                reference_origin = "reference_origin"
                metadata = "metadata"

                [sync]
                compare = "content"
                """
            ),
            encoding="utf-8",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTSYNC_")}
        env["CL_SECRET"] = fake.client_secret

        first = run_sync(job, env)
        assert (first["status"], first["read"]) == ("ok", 3)
        assert (first["inserted"], first["updated"], first["rejected"]) == (2, 1, 0)
        customers = by_email(fake)
        assert set(customers) == {
            "rahim.uddin@example.com",
            "giulia.rossi@example.it",
            "juergen@example.de",
        }
        rahim = customers["rahim.uddin@example.com"]["attributes"]
        assert (rahim["reference"], rahim["reference_origin"]) == ("8779761975521", "shopify")
        assert rahim["metadata"]["first_name"] == "Rahim"
        giulia = customers["giulia.rossi@example.it"]
        assert giulia["id"] == "KEEPERIDAB"
        assert giulia["attributes"]["metadata"]["erp_id"] == "E-7"
        assert giulia["attributes"]["metadata"]["city"] == "Milano"
        assert fake.throttled == 0

        second = run_sync(job, env)
        assert (second["status"], second["inserted"], second["updated"]) == ("ok", 0, 0)
        assert second["unchanged"] == 3
        assert len(fake.customers) == 3
        assert fake.throttled == 0
