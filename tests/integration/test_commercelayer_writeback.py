"""Writeback against the fake Commerce Layer API: the target's ids go into ``reference`` or
a ``metadata`` key, only where it is empty, and a refusal is a failed item."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import SecretStr

from custsync.commercelayer.client import CommerceLayerClient
from custsync.commercelayer.source import ConnectionSettings, make_client
from custsync.commercelayer.writeback import (
    Writeback,
    WritebackItem,
    WritebackResult,
    WritebackStatus,
)
from custsync.errors import ConfigError
from fakes.commercelayer import FakeCommerceLayer, Request

STAMP = "2025-06-01T10:00:00.000Z"


@dataclass(frozen=True)
class Settings:
    """The job's [writeback] table, as custsync.config.WritebackSettings holds it."""

    field: str
    origin: str | None = None


@pytest.fixture
def fake() -> Iterator[FakeCommerceLayer]:
    with FakeCommerceLayer(rate_limits=False) as server:
        yield server


@pytest.fixture
def client(fake: FakeCommerceLayer) -> Iterator[CommerceLayerClient]:
    settings = ConnectionSettings(
        base_url=fake.base_url,
        auth_url=fake.auth_url,
        client_id=fake.client_id,
        client_secret=SecretStr(fake.client_secret),
        requests_per_minute=60_000,
        burst_per_10s=10_000,
        max_retry_time=5.0,
    )
    made = make_client(settings)
    yield made
    made.close()


def seed(fake: FakeCommerceLayer, ident: str, **attributes: Any) -> None:
    fake.add_customers(
        [
            {
                "id": ident,
                "type": "customers",
                "attributes": {
                    "email": f"{ident.lower()}@example.com",
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


def item(fake: FakeCommerceLayer, ident: str, target_id: str) -> WritebackItem:
    """What the run read of a customer: its reference and metadata as the fake holds them."""
    attributes = fake.customers[ident]["attributes"]
    return WritebackItem(ident, target_id, attributes.get("reference"), attributes.get("metadata"))


def statuses(results: list[WritebackResult]) -> dict[str, WritebackStatus]:
    return {r.customer_id: r.status for r in results}


def patches(fake: FakeCommerceLayer) -> list[Request]:
    return [r for r in fake.requests if r.method == "PATCH"]


def test_reference_and_its_origin_are_filled_only_where_empty(
    fake: FakeCommerceLayer, client: CommerceLayerClient
) -> None:
    seed(fake, "EMPTYREFAA")
    seed(fake, "BLANKREFAA", reference="  ")
    seed(fake, "HELDREFAAA", reference="CRM-0001", reference_origin="crm")
    writeback = Writeback(client, Settings("reference", origin="erp"))
    results = writeback.write(
        [
            item(fake, "EMPTYREFAA", "100"),
            item(fake, "BLANKREFAA", "101"),
            item(fake, "HELDREFAAA", "102"),
        ]
    )
    assert statuses(results) == {
        "EMPTYREFAA": WritebackStatus.WRITTEN,
        "BLANKREFAA": WritebackStatus.WRITTEN,
        "HELDREFAAA": WritebackStatus.SKIPPED,
    }
    empty = fake.customers["EMPTYREFAA"]["attributes"]
    assert (empty["reference"], empty["reference_origin"]) == ("100", "erp")
    held = fake.customers["HELDREFAAA"]["attributes"]
    assert (held["reference"], held["reference_origin"]) == ("CRM-0001", "crm")
    assert sorted(r.path for r in patches(fake)) == [
        "/api/customers/BLANKREFAA",
        "/api/customers/EMPTYREFAA",
    ]


def test_a_metadata_key_is_filled_and_the_rest_of_metadata_kept(
    fake: FakeCommerceLayer, client: CommerceLayerClient
) -> None:
    seed(fake, "CUSTOMERAA", metadata={"tier": "gold", "tags": ["a"], "erp_id": ""})
    writeback = Writeback(client, Settings("metadata.erp_id"))
    (result,) = writeback.write([item(fake, "CUSTOMERAA", "E-1")])
    assert result == WritebackResult("CUSTOMERAA", WritebackStatus.WRITTEN)
    whole = {"tier": "gold", "tags": ["a"], "erp_id": "E-1"}
    assert fake.customers["CUSTOMERAA"]["attributes"]["metadata"] == whole
    (patch,) = patches(fake)
    assert patch.json()["data"]["attributes"] == {"metadata": whole}


def test_a_field_already_set_is_skipped_without_a_write(
    fake: FakeCommerceLayer, client: CommerceLayerClient
) -> None:
    seed(fake, "SAMEVALUEA", metadata={"erp_id": "E-1"})
    seed(fake, "OTHERVALUE", metadata={"erp_id": "E-9"})
    writeback = Writeback(client, Settings("metadata.erp_id"))
    results = writeback.write([item(fake, "SAMEVALUEA", "E-1"), item(fake, "OTHERVALUE", "E-2")])
    assert statuses(results) == {
        "SAMEVALUEA": WritebackStatus.SKIPPED,
        "OTHERVALUE": WritebackStatus.SKIPPED,
    }
    assert "another value" in str(results[1].message)
    assert fake.customers["OTHERVALUE"]["attributes"]["metadata"] == {"erp_id": "E-9"}
    assert fake.requests == []  # what the run read was enough: not even a lookup


def test_a_value_set_since_the_run_read_the_customer_is_not_overwritten(
    fake: FakeCommerceLayer, client: CommerceLayerClient
) -> None:
    seed(fake, "CUSTOMERAA", metadata={"tier": "gold"})
    read = item(fake, "CUSTOMERAA", "E-1")
    fake.update_customer("CUSTOMERAA", metadata={"tier": "gold", "erp_id": "E-0"})
    (result,) = Writeback(client, Settings("metadata.erp_id")).write([read])
    assert result.status is WritebackStatus.SKIPPED
    assert fake.customers["CUSTOMERAA"]["attributes"]["metadata"]["erp_id"] == "E-0"
    assert patches(fake) == []


def test_metadata_the_run_did_not_read_is_looked_up_and_merged(
    fake: FakeCommerceLayer, client: CommerceLayerClient
) -> None:
    seed(fake, "CUSTOMERAA", metadata={"tier": "gold"})
    (result,) = Writeback(client, Settings("metadata.erp_id")).write(
        [WritebackItem("CUSTOMERAA", "E-1", reference=None, metadata=None)]
    )
    assert result.status is WritebackStatus.WRITTEN
    assert fake.customers["CUSTOMERAA"]["attributes"]["metadata"] == {
        "tier": "gold",
        "erp_id": "E-1",
    }


def test_a_vanished_customer_is_a_failed_item_not_an_exception(
    fake: FakeCommerceLayer, client: CommerceLayerClient
) -> None:
    seed(fake, "GONEBEFORE")
    seed(fake, "GONEDURING")
    seed(fake, "STILLHEREA")
    items = [
        item(fake, "GONEBEFORE", "1"),
        item(fake, "GONEDURING", "2"),
        item(fake, "STILLHEREA", "3"),
    ]
    fake.delete_customer("GONEBEFORE")

    def vanish(request: Request) -> None:
        # Deleted between the lookup and its PATCH: the API answers 404.
        if request.method == "PATCH" and request.path.endswith("GONEDURING"):
            fake.delete_customer("GONEDURING")

    fake.on_request(vanish)
    results = Writeback(client, Settings("reference")).write(items)
    assert statuses(results) == {
        "GONEBEFORE": WritebackStatus.FAILED,
        "GONEDURING": WritebackStatus.FAILED,
        "STILLHEREA": WritebackStatus.WRITTEN,
    }
    assert "not found" in str(results[0].message)
    assert "RECORD_NOT_FOUND" in str(results[1].message)
    assert [r.status for r in patches(fake)] == [404, 200]


def test_results_follow_the_items_and_a_repeated_customer_is_written_once(
    fake: FakeCommerceLayer, client: CommerceLayerClient
) -> None:
    for i in range(30):  # more than a page: the lookup walks on by id
        seed(fake, f"CUSTOMER{i:02d}")
    items = [item(fake, f"CUSTOMER{i:02d}", f"T-{i}") for i in reversed(range(30))]
    results = Writeback(client, Settings("reference")).write([*items, items[0]])
    assert [r.customer_id for r in results] == [i.customer_id for i in [*items, items[0]]]
    assert {r.status for r in results} == {WritebackStatus.WRITTEN}
    assert len(patches(fake)) == 30
    assert fake.customers["CUSTOMER07"]["attributes"]["reference"] == "T-7"
    lookups = [r for r in fake.requests if r.method == "GET"]
    assert all(int(r.query["page[size]"]) <= 25 for r in lookups)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        (Settings("email"), "writeback.field"),
        (Settings("metadata."), "writeback.field"),
        (Settings("metadata.erp_id", origin="erp"), "writeback.origin"),
    ],
)
def test_a_field_writeback_cannot_fill_is_a_config_error(
    client: CommerceLayerClient, settings: Settings, key: str
) -> None:
    with pytest.raises(ConfigError) as error:
        Writeback(client, settings)
    assert error.value.key == key
