"""Skimming JSON Lines list documents (``custsync.sources._skim``): an incremental read
gives exactly what the general read (orjson) gives, or leaves the line to it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from custsync.sources._skim import Skimmer
from custsync.sources.file import (
    FileSource,
    FileSourceSettings,
    _document,
    _document_items,
    _resources_of,
)

SINCE = datetime(2024, 5, 2, tzinfo=UTC)
OLD = "2024-05-01T10:00:00.000Z"
NEW = "2024-05-03T10:00:00.000Z"


class Obj:
    """A JSON object as written, key by key: a key may repeat, a name may be escaped."""

    def __init__(self, *pairs: tuple[str, Any], escape: bool = False) -> None:
        self.pairs, self.escape = list(pairs), escape


def dump(value: Any) -> bytes:
    if isinstance(value, Obj):
        members = [dump_key(k, value.escape) + b":" + dump(v) for k, v in value.pairs]
        return b"{" + b",".join(members) + b"}"
    if isinstance(value, list):
        return b"[" + b",".join(dump(v) for v in value) + b"]"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        return str(value).encode()  # beyond what orjson writes, as other programs do
    return orjson.dumps(value)


def dump_key(key: str, escape: bool) -> bytes:
    if escape and key and ord(key[0]) < 0x10000:
        return b'"\\u%04x' % ord(key[0]) + orjson.dumps(key[1:])[1:]
    return orjson.dumps(key)


def general(line: bytes) -> list[Any]:
    """What the general read makes of a list document's line."""
    value = orjson.loads(line)
    resources = _resources_of(value)
    assert resources is not None
    return list(_document_items(_document(value, resources, SINCE), "f.jsonl:1"))


def skimmed(line: bytes) -> list[Any] | None:
    found = Skimmer().skim(line, SINCE)
    return None if found is None else list(_document_items(found, "f.jsonl:1"))


def resource(n: int, *attributes: tuple[str, Any], group: str | None = None) -> Obj:
    pairs: list[tuple[str, Any]] = [("id", f"cus{n}"), ("type", "customers")]
    pairs.append(("attributes", Obj(("email", f"c{n}@example.com"), *attributes)))
    if group is not None:
        linkage = Obj(("type", "customer_groups"), ("id", group))
        pairs.append(("relationships", Obj(("customer_group", Obj(("data", linkage))))))
    return Obj(*pairs)


def group(identifier: str, name: str) -> Obj:
    attributes = Obj(("name", name), ("updated_at", OLD))
    return Obj(("id", identifier), ("type", "customer_groups"), ("attributes", attributes))


def page(*resources: Obj, included: list[Obj] | None = None) -> bytes:
    pairs: list[tuple[str, Any]] = [("data", list(resources))]
    if included is not None:
        pairs.append(("included", included))
    return dump(Obj(*pairs))


# --- the same records as the general read ------------------------------------------------


def test_a_plain_page_is_skimmed_to_the_general_reads_records() -> None:
    line = page(
        resource(0, ("updated_at", OLD), group="g1"),
        resource(1, ("updated_at", NEW), group="g1"),
        resource(3, ("total_orders_count", 2)),
        resource(4, ("updated_at", NEW), group="g2"),
        included=[group("g1", "VIP"), group("g2", "Staff")],
    )

    skim = skimmed(line)

    assert skim is not None
    assert skim == general(line)
    assert [getattr(item, "origin", None) for item in skim] == [
        None,  # the skipped one, counted
        "f.jsonl:1#1",
        "f.jsonl:1#2",
        "f.jsonl:1#3",
    ]
    assert skim[0].count == 1
    assert skim[1].data["customer_group"]["name"] == "VIP"


def test_a_null_update_time_leaves_the_line_to_the_general_read() -> None:
    # "updated_at": null is in the bytes but not found as a time: the counts differ
    line = page(resource(0, ("updated_at", OLD)), resource(1, ("updated_at", None)))

    assert skimmed(line) is None
    assert [getattr(item, "origin", None) for item in general(line)] == [None, "f.jsonl:1#1"]


def test_a_repeated_update_time_is_read_as_the_general_read_reads_it() -> None:
    # orjson keeps the last of a repeated key, simdjson's look-up finds the first: the
    # record is newer than the bound, and must not be skipped as older.
    line = page(resource(0, ("updated_at", OLD), ("updated_at", NEW)))

    assert general(line)[0].data["updated_at"] == NEW
    assert skimmed(line) in (None, general(line))


def test_repeated_attributes_are_read_as_the_general_read_reads_them() -> None:
    repeated = Obj(
        ("id", "cus0"),
        ("type", "customers"),
        ("attributes", Obj(("updated_at", OLD))),
        ("attributes", Obj(("email", "x@example.com"))),  # no time: always read
    )
    line = page(repeated)

    assert [item.data for item in general(line)] == [
        {"email": "x@example.com", "id": "cus0", "type": "customers"}
    ]
    assert skimmed(line) in (None, general(line))


def test_an_escaped_key_name_is_left_to_the_general_read() -> None:
    # The same key twice, the second spelled with an escape: the bytes hold one
    # "updated_at", the look-up finds one, and orjson keeps the second's value.
    plain = page(resource(0, ("updated_at", OLD), ("updated_at", NEW)))
    line = plain.replace(b'"updated_at":"' + NEW.encode(), b'"\\u0075pdated_at":"' + NEW.encode())

    assert line.count(b'"updated_at"') == 1
    assert general(line)[0].data["updated_at"] == NEW
    assert skimmed(line) is None


def test_an_escape_that_cannot_spell_a_name_does_not_stop_the_skim() -> None:
    # as Rails writes "&", "<" and ">" by default
    plain = page(resource(0, ("updated_at", OLD)), resource(1, ("updated_at", NEW)))
    line = plain.replace(b"c1@example.com", b"c1\\u0026\\u003c\\u003e@example.com")

    skim = skimmed(line)

    assert skim is not None
    assert skim == general(line)
    assert skim[1].data["email"] == "c1&<>@example.com"


def test_an_integer_beyond_64_bits_is_left_to_the_general_read() -> None:
    line = page(resource(0, ("updated_at", OLD), ("metadata", Obj(("n", 2**70)))))

    assert skimmed(line) is None
    assert general(line)[0].count == 1  # orjson reads it (as a float), and it is skipped


def test_a_line_over_16_mib_is_left_to_the_general_read() -> None:
    line = page(resource(0, ("updated_at", NEW), ("metadata", Obj(("note", "x" * (16 << 20))))))

    assert skimmed(line) is None
    assert len(general(line)) == 1


def test_the_parser_is_usable_again_after_a_line_it_refuses() -> None:
    skimmer = Skimmer()
    good = page(resource(0, ("updated_at", NEW)))

    assert skimmer.skim(b'{"data": [', SINCE) is None
    assert skimmer.skim(b"\xff\xfe", SINCE) is None
    found = skimmer.skim(good, SINCE)

    assert found is not None
    assert list(_document_items(found, "f.jsonl:1")) == general(good)


# --- the property ----------------------------------------------------------------------

NAMES = st.sampled_from(["updated_at", "attributes", "id", "type", "name", "a", "é"])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**66), max_value=2**66)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | st.sampled_from([OLD, NEW, "2024-05-02T00:00:00Z", "", "not a time"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.builds(
            lambda pairs, escape: Obj(*pairs, escape=escape),
            st.lists(st.tuples(NAMES | st.text(max_size=4), inner), max_size=3),
            st.booleans(),
        )
    ),
    max_leaves=8,
)
STAMPS = st.sampled_from([OLD, NEW, "2024-05-02T00:00:00Z", None, 7, "soon"])


@st.composite
def resources(draw: st.DrawFn, n: int) -> Obj:
    pairs: list[tuple[str, Any]] = [("id", f"cus{n}"), ("type", "customers")]
    for _ in range(draw(st.integers(min_value=0, max_value=2))):  # attributes repeated, or none
        attributes: list[tuple[str, Any]] = [("email", f"c{n}@example.com")]
        for _ in range(draw(st.integers(min_value=0, max_value=2))):
            attributes.append(("updated_at", draw(STAMPS)))
        if draw(st.booleans()):
            attributes.append(("metadata", draw(VALUES)))
        pairs.append(("attributes", Obj(*attributes, escape=draw(st.booleans()))))
    if draw(st.booleans()):
        linkage = Obj(("type", "customer_groups"), ("id", draw(st.sampled_from(["g1", "g2"]))))
        pairs.append(("relationships", Obj(("customer_group", Obj(("data", linkage))))))
    return Obj(*draw(st.permutations(pairs)))


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    count = draw(st.integers(min_value=0, max_value=5))
    data = [draw(resources(n)) for n in range(count)]
    included = draw(st.lists(st.builds(group, st.sampled_from(["g1", "g2"]), st.text(max_size=3))))
    pairs: list[tuple[str, Any]] = [("data", data)]
    if draw(st.booleans()):
        pairs.append(("included", included))
    if draw(st.booleans()):
        pairs.append(("meta", Obj(("record_count", count))))
    return dump(Obj(*pairs))


@settings(max_examples=400, deadline=None)
@given(documents())
def test_a_skimmed_line_reads_as_the_general_read_or_is_left_to_it(line: bytes) -> None:
    value = orjson.loads(line)  # every generated document is one the general read takes
    assert _resources_of(value) is not None

    skim = skimmed(line)

    assert skim is None or skim == general(line)


@settings(max_examples=100, deadline=None)
@given(st.lists(STAMPS.filter(lambda s: isinstance(s, str)), min_size=1, max_size=6))
def test_a_page_of_plain_resources_is_skimmed_not_left(stamps: list[str]) -> None:
    line = page(*(resource(n, ("updated_at", s)) for n, s in enumerate(stamps)))

    skim = skimmed(line)

    assert skim is not None
    assert skim == general(line)


# --- through the file source -------------------------------------------------------------


def test_an_incremental_read_of_a_file_gives_the_general_reads_records(tmp_path: Path) -> None:
    lines = [
        page(resource(0, ("updated_at", OLD)), resource(1, ("updated_at", NEW))),
        page(resource(2, ("updated_at", OLD), ("updated_at", NEW))),  # left to the general read
        b'{"data": [',  # not JSON: an error record, as before
        page(resource(3, ("updated_at", OLD))),
    ]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    source = FileSource(FileSourceSettings(path="a.jsonl"), base_dir=tmp_path)

    batches = list(source.read(since=SINCE, cursor=None, batch_size=10))

    records = [r for b in batches for r in b.records]
    assert [(r.origin, r.error is None) for r in records] == [
        ("a.jsonl:1#1", True),
        ("a.jsonl:2", True),
        ("a.jsonl:3", False),
    ]
    assert records[1].data["updated_at"] == NEW
    assert sum(b.skipped for b in batches) == 2
