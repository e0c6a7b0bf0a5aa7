"""The Customer model and the parsing of every Commerce Layer input form."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from custsync.model import (
    Customer,
    from_flat,
    iter_records,
    normalize,
    parse_timestamp,
    redact,
    validate_batch,
)


def resource(**attributes: Any) -> dict[str, Any]:
    base = {"email": "ann@example.com", "updated_at": "2026-01-02T10:30:00.000Z"}
    return {
        "id": "xYZkjABcde",
        "type": "customers",
        "links": {"self": "https://acme.commercelayer.io/api/customers/xYZkjABcde"},
        "attributes": {**base, **attributes},
        "relationships": {
            "customer_group": {"data": {"type": "customer_groups", "id": "grp1"}},
            "customer_addresses": {"links": {"related": "..."}},
        },
        "meta": {"mode": "live"},
    }


GROUP = {"type": "customer_groups", "id": "grp1", "attributes": {"name": "VIP"}}


def test_list_document_resolves_included_relationships() -> None:
    [record] = list(iter_records({"data": [resource()], "included": [GROUP]}))

    customer = Customer.model_validate(record)

    assert customer.customer_group is not None
    assert customer.customer_group.id == "grp1"
    assert customer.customer_group.model_extra == {"name": "VIP"}


def test_relationship_without_data_stays_unset() -> None:
    [record] = list(iter_records({"data": [resource()]}))

    assert "customer_addresses" not in record


def test_resource_object_keeps_links_and_meta() -> None:
    customer = Customer.model_validate(normalize(resource()))

    assert customer.links is not None
    assert customer.links.self == "https://acme.commercelayer.io/api/customers/xYZkjABcde"
    assert customer.mode == "live"


def test_json_array_of_resources_yields_each() -> None:
    records = list(iter_records([resource(), resource(email="bob@example.com")]))

    assert [r["email"] for r in records] == ["ann@example.com", "bob@example.com"]


def test_flat_export_record_turns_rel_id_into_a_relationship() -> None:
    record = from_flat({"id": "a", "email": "x@y.com", "customer_group_id": "grp1"})

    assert record["customer_group"] == {"id": "grp1", "type": "customer_groups"}


def test_csv_cells_empty_become_null_and_json_metadata_is_parsed() -> None:
    record = from_flat({"email": "x@y.com", "reference": "", "metadata": '{"erp_id": "E1"}'})

    assert record["reference"] is None
    assert record["metadata"] == {"erp_id": "E1"}


def test_dotted_headers_become_nested_values() -> None:
    record = from_flat({"email": "x@y.com", "customer_group.name": "VIP", "metadata.tier": "gold"})

    assert record["customer_group"] == {"name": "VIP"}
    assert record["metadata"] == {"tier": "gold"}


@pytest.mark.parametrize(
    "email", ["ann@example.com", "  ann@example.com  ", "a.b+c@sub.example.co.uk"]
)
def test_plausible_emails_pass_and_are_stripped(email: str) -> None:
    assert Customer.model_validate({"email": email}).email == email.strip()


@pytest.mark.parametrize(
    "email", ["ann", "ann@example", "a@b@example.com", "ann smith@example.com", "@example.com", ""]
)
def test_implausible_emails_are_refused(email: str) -> None:
    [result] = validate_batch([{"email": email}])

    assert isinstance(result, list)
    assert result[0].field == "email"


def test_email_is_required() -> None:
    [result] = validate_batch([{"id": "a"}])

    assert isinstance(result, list)
    assert [e.field for e in result] == ["email"]


def test_status_outside_the_documented_three_is_refused() -> None:
    [result] = validate_batch([{"email": "a@b.co", "status": "vip"}])

    assert isinstance(result, list)
    assert result[0].field == "status"


def test_unknown_attributes_are_kept() -> None:
    customer = Customer.model_validate({"email": "a@b.co", "loyalty_points": 12})

    assert customer.model_extra == {"loyalty_points": 12}


def test_password_never_shows_in_repr_dump_or_json() -> None:
    customer = Customer.model_validate({"email": "a@b.co", "password": "hunter2-secret"})

    assert "hunter2-secret" not in repr(customer)
    assert "hunter2-secret" not in str(customer.model_dump())
    assert "hunter2-secret" not in customer.model_dump_json()
    assert customer.password is not None
    assert customer.password.get_secret_value() == "hunter2-secret"


def test_validation_errors_never_repeat_the_input() -> None:
    [result] = validate_batch([{"email": "hunter2-secret-not-an-email", "password": 5}])

    assert isinstance(result, list)
    assert "hunter2" not in str([e.message for e in result])


def test_a_batch_with_one_bad_record_keeps_the_good_ones_in_place() -> None:
    results = validate_batch([{"email": "a@b.co"}, {"email": "bad"}, {"email": "c@d.co"}])

    assert isinstance(results[0], Customer)
    assert isinstance(results[1], list)
    assert isinstance(results[2], Customer)


def test_timestamps_without_a_zone_are_refused() -> None:
    [result] = validate_batch([{"email": "a@b.co", "updated_at": "2026-01-02T10:30:00"}])

    assert isinstance(result, list)
    assert result[0].field == "updated_at"


def test_timestamps_keep_milliseconds_and_utc() -> None:
    record = {"email": "a@b.co", "updated_at": "2026-01-02T10:30:00.123Z"}

    customer = Customer.model_validate(record)

    assert customer.updated_at == datetime(2026, 1, 2, 10, 30, 0, 123000, tzinfo=UTC)


def test_meta_mode_outside_test_or_live_is_refused() -> None:
    [result] = validate_batch([{"email": "a@b.co", "meta": {"mode": "staging"}}])

    assert isinstance(result, list)
    assert result[0].field == "meta.mode"


def test_every_bad_field_of_a_related_object_is_named() -> None:
    from custsync.model import validate_records

    record = {"email": "a@b.co", "customer_group": {"id": 0, "type": 0}}

    [as_dict] = validate_records([record])

    assert isinstance(as_dict, list)
    assert {e.field for e in as_dict} == {"customer_group.id", "customer_group.type"}


def test_redact_masks_secret_keys_at_any_depth() -> None:
    record = {"email": "a@b.co", "password": "p", "metadata": {"legacy": {"password_hash": "h"}}}

    redacted = redact(record)

    assert redacted["password"] == "**********"
    assert redacted["metadata"]["legacy"]["password_hash"] == "**********"
    assert redacted["email"] == "a@b.co"


def test_parse_timestamp_reads_z_and_offsets_as_utc() -> None:
    assert parse_timestamp("2026-01-02T12:30:00+02:00") == datetime(2026, 1, 2, 10, 30, tzinfo=UTC)
    assert parse_timestamp("not a time") is None
    assert parse_timestamp(None) is None


def test_redact_masks_secrets_inside_unparsed_text() -> None:
    raw = '{"email": "a@b.co", "password": "hunter2-secret", "metadata": {"token": 12345'

    masked = redact({"_raw": raw})["_raw"]

    assert "hunter2-secret" not in masked
    assert "12345" not in masked
    assert '"email": "a@b.co"' in masked


def test_the_record_schema_has_the_models_fields() -> None:
    from custsync.model import CustomerRecord

    assert set(CustomerRecord.__annotations__) == set(Customer.model_fields)


_values = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.integers(-3, 3),
    st.booleans(),
    st.sampled_from(
        [
            "a@b.co",
            " x@y.org ",
            "prospect",
            "repeat",
            "2026-01-02T10:30:00.000Z",
            "2026-01-02T10:30:00",
            "live",
            "test",
        ]
    ),
)
_records = st.dictionaries(
    st.sampled_from(
        [
            "email",
            "status",
            "updated_at",
            "total_orders_count",
            "has_password",
            "reference",
            "metadata",
            "anonymization_info",
            "meta",
            "links",
            "customer_group",
            "orders",
            "extra",
        ]
    ),
    st.one_of(
        _values,
        st.dictionaries(
            # a key that is not text: a Parquet map, a dict from a notebook
            st.one_of(st.sampled_from(["mode", "id", "type", "self", "name"]), st.integers(0, 1)),
            _values,
            max_size=3,
        ),
        st.lists(st.dictionaries(st.sampled_from(["id", "type"]), _values, max_size=2), max_size=2),
    ),
    max_size=6,
)


@settings(max_examples=400, deadline=None)  # what it checks is agreement, not time
@given(_records)
def test_the_record_schema_and_the_model_agree_on_every_record(record: dict[str, Any]) -> None:
    from custsync.model import validate_records

    [as_model] = validate_batch([record])
    [as_dict] = validate_records([record])

    assert isinstance(as_model, list) == isinstance(as_dict, list)
    if isinstance(as_model, list):
        assert {e.field for e in as_model} == {e.field for e in as_dict}  # type: ignore[union-attr]
    else:
        assert isinstance(as_dict, dict)
        assert as_model.model_dump(exclude={"password"}, exclude_unset=True) == {
            k: v for k, v in as_dict.items() if k != "password"
        }


class _TextKey(str):
    """A key that is text but not ``str`` itself (pydantic converts it)."""


_keys_with_unknown = st.one_of(
    st.sampled_from(["email", "updated_at", "status", "meta", "metadata", "zeta", "alpha"]),
    st.integers(0, 1),  # refused by the schema: "Keys should be strings"
    st.just(_TextKey("beta")),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.dictionaries(_keys_with_unknown, _values, max_size=6).map(
            lambda record: {"email": "a@b.co", **record}
        ),
        min_size=1,
        max_size=4,
    )
)
def test_a_batch_keeps_unknown_fields_as_the_record_schema_does(
    records: list[dict[Any, Any]],
) -> None:
    """validate_records validates a batch without pydantic's bookkeeping of unknown keys and
    copies them over itself: each result, its key order included, is the full schema's."""
    from custsync.model import _one_record, field_errors, validate_records

    def one(record: dict[Any, Any]) -> Any:
        try:
            return _one_record.validate_python(record)
        except ValidationError as exc:
            return field_errors(exc)

    results = validate_records(records)

    assert len(results) == len(records)
    for record, result in zip(records, results, strict=True):
        expected = one(record)
        assert result == expected
        if isinstance(expected, dict):
            assert list(result) == list(expected)
            assert all(type(key) is str for key in result)


@given(
    st.fixed_dictionaries({}, optional={"id": _values, "type": _values}),
    st.dictionaries(st.sampled_from(["name", "id", "type", "code", "metadata"]), _values),
)
def test_a_related_object_is_its_linkage_then_the_included_attributes(
    linkage: dict[str, Any], attributes: dict[str, Any]
) -> None:
    """The linkage's id and type come first and win; the included object's other
    attributes follow in their order."""
    kind, identifier = linkage.get("type"), linkage.get("id")
    document = {
        "data": [
            {
                "id": "c1",
                "type": "customers",
                "attributes": {"email": "a@b.co"},
                "relationships": {"customer_group": {"data": linkage}},
            }
        ],
        "included": [{"type": kind, "id": identifier, "attributes": attributes}],
    }
    expected = {"id": identifier, "type": kind}
    expected.update((k, v) for k, v in attributes.items() if k not in ("id", "type"))

    [record] = list(iter_records(document))

    assert record["customer_group"] == expected
    assert list(record["customer_group"]) == list(expected)
