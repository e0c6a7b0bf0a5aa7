"""The mapping engine: grammar, evaluation order, types, and configuration errors."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from custsync.errors import ConfigError
from custsync.mapping import (
    TRANSFORMS,
    CompiledMapping,
    RecordFailure,
    compile_mapping,
    load_mapping_file,
)
from custsync.model import SECRET_KEYS, Customer


def customer(**fields: Any) -> Customer:
    return Customer.model_validate({"id": "c1", "email": "ann@example.com", **fields})


def outbound(**fields: Any) -> CompiledMapping:
    return compile_mapping(fields, direction="outbound")


def one(mapping: CompiledMapping, record: Any) -> dict[str, Any]:
    return mapping.apply_one(record)


def test_a_string_is_one_path() -> None:
    assert one(outbound(mail="email"), customer()) == {"mail": "ann@example.com"}


def test_a_list_of_paths_takes_the_first_non_empty() -> None:
    mapping = outbound(no=["reference", "metadata.erp_id"])

    assert one(mapping, customer(reference="R1", metadata={"erp_id": "E1"}))["no"] == "R1"
    assert one(mapping, customer(reference="", metadata={"erp_id": "E1"}))["no"] == "E1"
    assert one(mapping, customer(metadata={}))["no"] is None


def test_included_relationship_is_addressed_like_a_nested_object() -> None:
    mapping = outbound(group="customer_group.name")

    record = customer(customer_group={"id": "g", "type": "customer_groups", "name": "VIP"})

    assert one(mapping, record) == {"group": "VIP"}


def test_links_self_and_meta_mode_are_paths() -> None:
    mapping = outbound(link="links.self", mode="meta.mode")

    record = customer(links={"self": "https://x/api/customers/c1"}, meta={"mode": "test"})

    assert one(mapping, record) == {"link": "https://x/api/customers/c1", "mode": "test"}


def test_order_is_path_then_transform_then_map_then_default() -> None:
    mapping = outbound(
        tier={"path": "metadata.tier", "transform": "lower", "map": {"gold": "G"}, "default": "S"}
    )

    assert one(mapping, customer(metadata={"tier": " GOLD "}))["tier"] == " gold "
    assert one(mapping, customer(metadata={"tier": "GOLD"}))["tier"] == "G"
    assert one(mapping, customer(metadata={"tier": "Bronze"}))["tier"] == "bronze"
    assert one(mapping, customer(metadata={}))["tier"] == "S"


def test_strict_map_refuses_values_not_in_the_map() -> None:
    mapping = outbound(status={"path": "status", "map": {"prospect": "LEAD"}, "strict_map": True})

    with pytest.raises(RecordFailure) as failure:
        one(mapping, customer(status="repeat"))

    assert failure.value.errors[0].field == "status"


def test_template_joins_paths_and_skips_empty_parts() -> None:
    mapping = outbound(name={"template": "{metadata.first} {metadata.last}"})

    assert one(mapping, customer(metadata={"first": "Ann", "last": "Lee"}))["name"] == "Ann Lee"
    assert one(mapping, customer(metadata={"last": "Lee"}))["name"] == "Lee"
    assert one(mapping, customer(metadata={}))["name"] is None


def test_const_is_the_same_for_every_record() -> None:
    mapping = outbound(source={"const": "commercelayer"})

    assert one(mapping, customer())["source"] == "commercelayer"
    assert mapping.column_types() == {"source": "text"}


def test_types_follow_the_customer_field() -> None:
    mapping = outbound(
        n="total_orders_count", pw="has_password", ts="updated_at", md="metadata", e="email"
    )

    assert mapping.column_types() == {
        "n": "integer",
        "pw": "boolean",
        "ts": "timestamp",
        "md": "json",
        "e": "text",
    }


def test_declared_type_coerces_values() -> None:
    mapping = outbound(
        points={"path": "metadata.points", "type": "integer"},
        news={"path": "metadata.news", "type": "boolean"},
    )

    assert one(mapping, customer(metadata={"points": "12", "news": "yes"})) == {
        "points": 12,
        "news": True,
    }


def test_a_value_that_cannot_take_its_type_fails_naming_the_field() -> None:
    mapping = outbound(points={"path": "metadata.points", "type": "integer"})

    with pytest.raises(RecordFailure) as failure:
        one(mapping, customer(metadata={"points": "lots"}))

    assert failure.value.errors[0].field == "points"
    assert "metadata.points" in failure.value.errors[0].message


def test_metadata_values_default_to_text() -> None:
    mapping = outbound(erp="metadata.erp_id")

    assert one(mapping, customer(metadata={"erp_id": 42}))["erp"] == "42"


def test_guard_is_the_field_holding_updated_at() -> None:
    assert outbound(k="id", seen="updated_at").guard == "seen"
    assert outbound(k="id", seen="created_at").guard is None


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"x": "emial"}, "mapping.fields.x"),
        ({"x": "metadata."}, "mapping.fields.x"),
        ({"x": {"path": "email", "transform": "shout"}}, "mapping.fields.x"),
        ({"x": {"path": "email", "type": "money"}}, "mapping.fields.x"),
        ({"x": {"path": "email", "const": 1}}, "mapping.fields.x"),
        ({"x": {"pth": "email"}}, "mapping.fields.x"),
        ({"x": "password"}, "mapping.fields.x"),
        ({"x": "orders.number"}, "mapping.fields.x"),
    ],
)
def test_configuration_errors_name_the_field(fields: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError) as error:
        compile_mapping(fields, direction="outbound", section="mapping.fields")

    assert error.value.key == names


def test_a_list_relationship_item_is_addressed_by_index() -> None:
    mapping = outbound(first_order="orders.0.id")

    assert one(mapping, customer(orders=[{"id": "o1"}, {"id": "o2"}]))["first_order"] == "o1"


def test_presets_compile() -> None:
    for name in ("erp_customer", "flat_customer"):
        mapping = load_mapping_file(name).compile(direction="outbound")
        assert mapping.key


def test_an_outbound_preset_cannot_be_used_inbound() -> None:
    with pytest.raises(ConfigError):
        load_mapping_file("erp_customer").compile(direction="inbound")


# --- inbound ---------------------------------------------------------------------------


def inbound(fields: dict[str, Any], **options: Any) -> CompiledMapping:
    return compile_mapping(fields, direction="inbound", **options)


def test_inbound_matches_headers_ignoring_case_and_spaces() -> None:
    mapping = inbound({"email": "Email", "metadata.first_name": "First Name"})

    row = {"EMAIL": "a@b.co", " first  name ": "Ann"}

    assert mapping.apply_one(row) == {"email": "a@b.co", "metadata": {"first_name": "Ann"}}


def test_inbound_left_side_must_be_a_customer_path() -> None:
    with pytest.raises(ConfigError) as error:
        inbound({"emial": "Email"})

    assert error.value.key == "fields.emial"


@pytest.mark.parametrize(
    ("order", "text", "expected"),
    [
        ("DMY", "09/01/24 12:49", datetime(2024, 1, 9, 12, 49, tzinfo=UTC)),
        ("MDY", "09/01/24 12:49", datetime(2024, 9, 1, 12, 49, tzinfo=UTC)),
        (None, "2024-03-12 09:14", datetime(2024, 3, 12, 9, 14, tzinfo=UTC)),
        (None, "2024-03-12T09:14:00.000+0000", datetime(2024, 3, 12, 9, 14, tzinfo=UTC)),
    ],
)
def test_inbound_dates_follow_date_order(order: str | None, text: str, expected: datetime) -> None:
    mapping = inbound({"email": "email", "updated_at": "when"}, date_order=order)

    assert mapping.apply_one({"email": "a@b.co", "when": text})["updated_at"] == expected


def test_day_month_dates_without_date_order_are_refused_not_guessed() -> None:
    mapping = inbound({"email": "email", "updated_at": "when"})

    with pytest.raises(RecordFailure) as failure:
        mapping.apply_one({"email": "a@b.co", "when": "09/01/24 12:49"})

    assert "date_order" in failure.value.errors[0].message


def test_inbound_dates_without_a_zone_take_the_mapping_timezone() -> None:
    mapping = inbound(
        {"email": "email", "updated_at": "when"}, date_order="DMY", timezone="Europe/Rome"
    )

    value = mapping.apply_one({"email": "a@b.co", "when": "09/01/24 12:49"})["updated_at"]

    assert value == datetime(2024, 1, 9, 11, 49, tzinfo=UTC)


def test_unknown_timezone_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError) as error:
        inbound({"email": "email"}, timezone="Mars/Olympus")

    assert error.value.key == "timezone"


# --- properties ------------------------------------------------------------------------

values = st.one_of(st.none(), st.just(""), st.text(min_size=1, max_size=8))


@given(st.lists(values, min_size=1, max_size=5), st.text(min_size=1, max_size=5))
def test_first_non_empty_or_default(candidates: list[str | None], default: str) -> None:
    fields = {f"c{i}": v for i, v in enumerate(candidates)}
    mapping = inbound({"email": "email", "metadata.v": {"paths": list(fields), "default": default}})

    got = mapping.apply_one({"email": "a@b.co", **fields})["metadata"]["v"]

    expected = next((v for v in candidates if v not in (None, "")), default)
    assert got == expected


@given(st.text(max_size=30))
def test_text_transforms_are_idempotent(text: str) -> None:
    for name in ("lower", "upper", "strip", "collapse_whitespace", "strip_apostrophe", "digits"):
        once = TRANSFORMS[name](text)
        if name == "strip_apostrophe":
            continue  # strips one leading apostrophe by design
        assert TRANSFORMS[name](once) == once, name


@given(
    st.text(min_size=1, max_size=10),
    st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=5), max_size=4),
)
def test_values_not_in_a_map_pass_through(value: str, table: dict[str, str]) -> None:
    mapping = inbound({"email": "email", "metadata.v": {"path": "v", "map": table}})

    got = mapping.apply_one({"email": "a@b.co", "v": value})["metadata"]["v"]

    if value in table:
        assert got == (table[value] if table[value] != "" else None)
    else:
        assert got == value


def test_secret_keys_inside_json_values_are_left_out_of_rows() -> None:
    mapping = outbound(md="metadata")

    record = customer(metadata={"tier": "gold", "legacy": {"password_hash": "h", "rp_token": "t"}})

    assert one(mapping, record)["md"] == {"tier": "gold", "legacy": {}}


@pytest.mark.parametrize("name", sorted(SECRET_KEYS))
def test_every_secret_name_in_any_case_is_left_out_of_json_values(name: str) -> None:
    mapping = outbound(md="metadata")

    record = customer(metadata={"tier": "gold", "deep": [{name.upper(): "s3cr3t"}]})

    assert one(mapping, record)["md"] == {"tier": "gold", "deep": [{}]}


def test_a_path_to_a_secret_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError) as error:
        compile_mapping({"h": "metadata.password_hash"}, direction="outbound")

    assert "secret" in str(error.value)


_EMPTY = st.sampled_from([None, ""])
_BY_TYPE = {
    "text": st.one_of(_EMPTY, st.text(max_size=6), st.integers(-2, 2), st.booleans()),
    "integer": st.one_of(_EMPTY, st.integers(-2, 2), st.sampled_from(["3", 2.0, "x"])),
    "float": st.one_of(_EMPTY, st.floats(-2, 2, width=32), st.integers(-2, 2), st.just("1.5")),
    "boolean": st.one_of(_EMPTY, st.booleans(), st.sampled_from(["yes", 0, 1])),
    "timestamp": st.one_of(
        _EMPTY,
        st.sampled_from(
            [
                datetime(2026, 1, 2, 10, 30, tzinfo=UTC),
                datetime(2026, 1, 2, 10, 30),
                "2026-01-02T10:30:00Z",
            ]
        ),
    ),
    "json": st.one_of(
        _EMPTY,
        st.sampled_from([{"a": 1, "password": "p"}, {"b": [1, "x"]}, [1, 2], 3, "t"]),
    ),
}
_GENERATED_FIELDS = {
    "text": {"path": "metadata.a", "type": "text"},
    "text_default": {"paths": ["metadata.a", "metadata.n.a"], "type": "text", "default": "none"},
    "reference": {"path": "reference", "type": "text"},
    "integer": {"path": "metadata.i", "type": "integer"},
    "integer_default": {"path": "metadata.n.i", "type": "integer", "default": 0},
    "float": {"path": "metadata.f", "type": "float"},
    "boolean": {"path": "metadata.b", "type": "boolean"},
    "timestamp": {"path": "metadata.t", "type": "timestamp"},
    "json": {"path": "metadata.j", "type": "json"},
    "json_nested": {"paths": ["metadata.n.j", "metadata.j"], "type": "json"},
}
_METADATA = {
    "a": _BY_TYPE["text"],
    "i": _BY_TYPE["integer"],
    "f": _BY_TYPE["float"],
    "b": _BY_TYPE["boolean"],
    "t": _BY_TYPE["timestamp"],
    "j": _BY_TYPE["json"],
}


_GENERATED_RECORDS = st.fixed_dictionaries(
    {"reference": _BY_TYPE["text"]},
    optional={
        "metadata": st.fixed_dictionaries(
            {},
            optional={
                **_METADATA,
                "n": st.one_of(
                    st.none(),
                    st.fixed_dictionaries(
                        {},
                        optional={k: _METADATA[k] for k in ("a", "i", "j")},
                    ),
                ),
            },
        )
    },
)


@given(_GENERATED_RECORDS)
def test_the_generated_mapping_computes_what_the_field_by_field_one_does(
    record: dict[str, Any],
) -> None:
    """An outbound mapping runs as one generated function, and falls back to computing
    field by field (which names the failing field) when that raises: both give the same
    row, or the same failure, for every record; where a record maps, the generated
    function itself maps it."""
    mapping = outbound(**_GENERATED_FIELDS)

    def outcome(apply: Any) -> Any:
        try:
            return apply(record)
        except RecordFailure as failure:
            return failure.errors

    field_by_field = outcome(mapping._apply_slowly)

    assert outcome(mapping.apply_one) == field_by_field
    if isinstance(field_by_field, dict):
        generated = mapping._fast(record)  # type: ignore[attr-defined]
        assert generated == field_by_field
        assert list(generated) == list(field_by_field)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mysql"])
@given(record=_GENERATED_RECORDS)
def test_the_mapping_encodes_as_the_codec_encodes_what_it_maps(
    dialect: str, record: dict[str, Any]
) -> None:
    """``encoder`` maps a record straight to a codec's row (a JSON value checked and
    dumped once): what ``encode(apply_one(record))`` gives, and it fails where that fails,
    so a run falls back to the steps that name the failure."""
    from custsync.targets.base import ColumnSpec, RowSchema
    from custsync.targets.sql import row_codec

    mapping = outbound(**_GENERATED_FIELDS)
    key = "reference"
    schema = RowSchema(
        columns=(
            *(
                ColumnSpec(name, "text" if name == key else kind)
                for name, kind in mapping.column_types().items()
            ),
            ColumnSpec("unmapped", "json"),
        ),
        key=(key,),
    )
    codec = row_codec(schema, dialect)
    assert codec.converters is not None
    encoder = mapping.encoder(codec.names, codec.converters)
    assert encoder is not None

    try:
        expected: Any = codec.encode(mapping.apply_one(record))
    except Exception as exc:  # noqa: BLE001 - the fused function must fail too
        expected = type(exc)

    if isinstance(expected, tuple):
        assert encoder(record) == expected
    else:
        with pytest.raises(Exception):  # noqa: B017,PT011 - any failure sends it back
            encoder(record)
