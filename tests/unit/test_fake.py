"""The fake Commerce Layer customer generator: deterministic, realistic, API-shaped."""

from __future__ import annotations

import gzip
import random
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest

from custsync._fake import customer_groups, make_customers, touch, write_list_documents
from custsync.model import Customer, iter_records, validate_batch

ID = re.compile(r"^[A-Za-z]{10}$")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _lines(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        return [orjson.loads(line) for line in stream]


@pytest.fixture(scope="module")
def customers() -> list[dict[str, Any]]:
    return list(make_customers(2000, seed=3))


def test_same_seed_gives_same_records() -> None:
    assert list(make_customers(200, seed=7)) == list(make_customers(200, seed=7))


def test_another_seed_gives_other_records() -> None:
    first = list(make_customers(50, seed=1))
    second = list(make_customers(50, seed=2))
    assert {c["id"] for c in first}.isdisjoint(c["id"] for c in second)


def test_ids_are_ten_letters_and_unique(customers: list[dict[str, Any]]) -> None:
    ids = [c["id"] for c in customers]
    assert all(ID.match(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_emails_are_unique_even_once_stripped_and_lower_cased(
    customers: list[dict[str, Any]],
) -> None:
    emails = [c["attributes"]["email"] for c in customers]
    assert len({e.strip().lower() for e in emails}) == len(emails)
    # Real data carries some mixed case and stray spaces.
    assert any(e != e.lower() for e in emails)
    assert any(e != e.strip() for e in emails)


def test_status_matches_total_orders_count(customers: list[dict[str, Any]]) -> None:
    expected = {0: "prospect", 1: "acquired"}
    for customer in customers:
        attributes = customer["attributes"]
        count = attributes["total_orders_count"]
        assert attributes["status"] == expected.get(count, "repeat")
    assert {c["attributes"]["status"] for c in customers} == {"prospect", "acquired", "repeat"}


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5])
def test_tie_fraction_share_one_updated_at(fraction: float) -> None:
    records = list(make_customers(2000, seed=5, tie_fraction=fraction))
    counts = Counter(c["attributes"]["updated_at"] for c in records)
    _, tied = counts.most_common(1)[0]
    if fraction == 0.0:
        assert tied == 1
    else:
        assert abs(tied / len(records) - fraction) <= 0.02


def test_untied_updated_at_strictly_increases(customers: list[dict[str, Any]]) -> None:
    tie, _ = Counter(c["attributes"]["updated_at"] for c in customers).most_common(1)[0]
    rest = [_ts(c["attributes"]["updated_at"]) for c in customers]
    rest = [t for t in rest if t != _ts(tie)]
    assert all(a < b for a, b in pairwise(rest))


def test_first_record_is_updated_at_start() -> None:
    start = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    first = next(make_customers(10, start=start, tie_fraction=0.0))
    assert first["attributes"]["updated_at"] == "2026-03-01T12:30:00.000Z"


def test_timestamps_are_utc_milliseconds_and_updated_not_before_created(
    customers: list[dict[str, Any]],
) -> None:
    for customer in customers:
        attributes = customer["attributes"]
        assert TIMESTAMP.match(attributes["created_at"])
        assert TIMESTAMP.match(attributes["updated_at"])
        assert _ts(attributes["updated_at"]) >= _ts(attributes["created_at"])


def test_reference_is_set_for_about_seventy_percent_with_erp_origin(
    customers: list[dict[str, Any]],
) -> None:
    with_reference = [c for c in customers if c["attributes"]["reference"] is not None]
    assert 0.65 <= len(with_reference) / len(customers) <= 0.75
    for customer in customers:
        attributes = customer["attributes"]
        has_reference = attributes["reference"] is not None
        assert (attributes["reference_origin"] == "erp") is has_reference
        if has_reference:
            assert re.match(r"^CUST-\d{6,}$", attributes["reference"])


def test_every_record_has_an_erp_key(customers: list[dict[str, Any]]) -> None:
    for customer in customers:
        attributes = customer["attributes"]
        assert attributes["reference"] or attributes["metadata"].get("erp_id")


def test_mode_is_stamped_on_every_record() -> None:
    assert {c["meta"]["mode"] for c in make_customers(30, mode="test")} == {"test"}


def test_records_validate_as_customers(customers: list[dict[str, Any]]) -> None:
    results = validate_batch([next(iter_records(c)) for c in customers])
    assert all(isinstance(result, Customer) for result in results)


def test_customer_groups_do_not_depend_on_the_group_count() -> None:
    assert customer_groups(2, seed=9) == customer_groups(6, seed=9)[:2]
    assert [g["attributes"]["name"] for g in customer_groups(2, seed=9)] == ["VIP", "Wholesale"]


def test_pages_hold_at_most_page_size_and_include_only_referenced_groups(
    tmp_path: Path,
) -> None:
    path = tmp_path / "customers.jsonl"
    written = write_list_documents(path, make_customers(240, seed=4), page_size=25, seed=4)
    documents = _lines(path)
    assert written == 240
    assert [len(d["data"]) for d in documents] == [25] * 9 + [15]
    for document in documents:
        referenced = {
            c["relationships"]["customer_group"]["data"]["id"]
            for c in document["data"]
            if c["relationships"]["customer_group"]["data"] is not None
        }
        included = [g["id"] for g in document["included"]]
        assert len(included) == len(set(included))
        assert set(included) == referenced
        assert {g["type"] for g in document["included"]} <= {"customer_groups"}


def test_links_follow_the_pages_and_counts_appear_when_known(tmp_path: Path) -> None:
    known = tmp_path / "known.jsonl"
    write_list_documents(known, list(make_customers(60)), page_size=25)
    documents = _lines(known)
    assert [d["meta"] for d in documents] == [{"record_count": 60, "page_count": 3}] * 3
    assert "prev" not in documents[0]["links"]
    assert "next" not in documents[-1]["links"]
    assert all("last" in d["links"] for d in documents)

    streamed = tmp_path / "streamed.jsonl"
    write_list_documents(streamed, make_customers(60), page_size=25)
    assert all(d["meta"] == {} and "last" not in d["links"] for d in _lines(streamed))


def test_each_line_parses_into_customers_carrying_group_names(tmp_path: Path) -> None:
    path = tmp_path / "customers.jsonl"
    write_list_documents(path, make_customers(100, seed=8, groups=3), groups=3, seed=8)
    names = {g["id"]: g["attributes"]["name"] for g in customer_groups(3, seed=8)}
    records = [r for document in _lines(path) for r in iter_records(document)]
    assert len(records) == 100
    grouped = [r for r in records if r["customer_group"] is not None]
    assert grouped
    for record in grouped:
        assert record["customer_group"]["name"] == names[record["customer_group"]["id"]]
    assert "customer_addresses" not in records[0]  # links only: not requested
    assert all(isinstance(r, Customer) for r in validate_batch(records))


def test_gz_suffix_writes_gzip(tmp_path: Path) -> None:
    plain, packed = tmp_path / "c.jsonl", tmp_path / "c.jsonl.gz"
    write_list_documents(plain, make_customers(80))
    write_list_documents(packed, make_customers(80))
    assert packed.read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()


def test_empty_input_writes_one_empty_page(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    assert write_list_documents(path, [], page_size=25) == 0
    assert [d["data"] for d in _lines(path)] == [[]]


def test_a_group_the_seed_does_not_produce_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="customer group"):
        write_list_documents(tmp_path / "x.jsonl", make_customers(50, seed=1), seed=2)


def test_touch_stamps_the_edit_and_changes_one_thing() -> None:
    rng = random.Random(0)
    changed = Counter[str]()
    for original in make_customers(300, seed=6):
        before = orjson.dumps(original)
        at = _ts(original["attributes"]["updated_at"]) + timedelta(days=1)
        edited = touch(original, at=at, rng=rng)
        assert orjson.dumps(original) == before  # the input is left alone
        old, new = original["attributes"], edited["attributes"]
        assert _ts(new["updated_at"]) == at
        diff = {k for k in old if old[k] != new[k]} - {"updated_at"}
        if diff == {"email"}:
            assert new["email"] != old["email"]
            assert new["email"].lower() == old["email"].lower()
            changed["email"] += 1
        elif diff == {"metadata"}:
            assert new["metadata"]["tier"] != old["metadata"].get("tier")
            changed["tier"] += 1
        else:
            assert diff <= {"total_orders_count", "status"}
            assert new["total_orders_count"] == old["total_orders_count"] + 1
            changed["orders"] += 1
        assert new["status"] == {0: "prospect", 1: "acquired"}.get(
            new["total_orders_count"], "repeat"
        )
    assert set(changed) == {"email", "tier", "orders"}


def test_touch_before_creation_is_an_error() -> None:
    customer = next(make_customers(1))
    created = _ts(customer["attributes"]["created_at"])
    with pytest.raises(ValueError, match="before it was created"):
        touch(customer, at=created - timedelta(seconds=1), rng=random.Random(0))
