"""The file source: every Commerce Layer form, the shapes real export files come in, and bad
input that never stops a read."""

from __future__ import annotations

import gzip
import tracemalloc
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from custsync.errors import ConfigError, SourceError
from custsync.sources.base import RawRecord, Source, SourceBatch
from custsync.sources.file import FileSource, FileSourceSettings

# --- fixture makers ---------------------------------------------------------------------


def resource(n: int, *, group: str | None = None, **attributes: Any) -> dict[str, Any]:
    """A Commerce Layer customer resource object."""
    out: dict[str, Any] = {
        "id": f"cus{n}",
        "type": "customers",
        "links": {"self": f"https://acme.commercelayer.io/api/customers/cus{n}"},
        "attributes": {
            "email": f"user{n}@example.com",
            "status": "acquired",
            "updated_at": "2024-05-01T10:00:00.000Z",
            **attributes,
        },
        "meta": {"mode": "live"},
    }
    if group is not None:
        out["relationships"] = {
            "customer_group": {"data": {"type": "customer_groups", "id": group}},
        }
    return out


def group(group_id: str, name: str) -> dict[str, Any]:
    return {"id": group_id, "type": "customer_groups", "attributes": {"name": name}}


def write_jsonl(path: Path, values: Iterable[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(v) + b"\n" for v in values))
    return path


def write_json(path: Path, value: Any) -> Path:
    path.write_bytes(orjson.dumps(value))
    return path


def gzip_file(path: Path, data: bytes) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(data)
    return path


def source(base: Path, path: str, **settings: Any) -> FileSource:
    return FileSource(FileSourceSettings(path=path, **settings), base_dir=base)


def read_batches(src: FileSource, batch_size: int = 100) -> list[SourceBatch]:
    """The batches that carry records (the closing, empty checkpoint batch left out)."""
    return [b for b in src.read(since=None, cursor=None, batch_size=batch_size) if b.records]


def read_all(src: FileSource, batch_size: int = 100) -> list[RawRecord]:
    return [r for batch in read_batches(src, batch_size) for r in batch.records]


def notes(src: FileSource) -> list[str]:
    return [note for batch in read_batches(src) for note in batch.notes]


EXPORT_CSV = (
    "id,email,status,customer_group_id,metadata,updated_at\n"
    'cus1,a@example.com,prospect,grp1,"{""tier"": ""gold""}",2024-05-01T10:00:00Z\n'
    "cus2,b@example.com,repeat,,,2024-05-02T10:00:00Z\n"
)


# --- Commerce Layer forms ---------------------------------------------------------------


def test_jsonl_list_documents_resolve_included_customer_group(tmp_path: Path) -> None:
    pages = [
        {
            "data": [resource(1, group="g1"), resource(2, group="g2")],
            "included": [group("g1", "VIP"), group("g2", "Staff")],
        },
        {"data": [resource(3, group="g1")], "included": [group("g1", "VIP")]},
    ]
    write_jsonl(tmp_path / "customers.jsonl", pages)

    records = read_all(source(tmp_path, "customers.jsonl"))

    assert [r.data["customer_group"]["name"] for r in records] == ["VIP", "Staff", "VIP"]
    assert [r.data["email"] for r in records] == [
        "user1@example.com",
        "user2@example.com",
        "user3@example.com",
    ]
    assert [r.origin for r in records] == [
        "customers.jsonl:1#0",
        "customers.jsonl:1#1",
        "customers.jsonl:2",
    ]


def test_jsonl_resource_objects_one_per_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "customers.jsonl", [resource(1), resource(2)])

    records = read_all(source(tmp_path, "customers.jsonl"))

    assert [r.data["id"] for r in records] == ["cus1", "cus2"]
    assert records[0].data["meta"] == {"mode": "live"}
    assert records[0].data["links"]["self"].endswith("/customers/cus1")
    assert [r.origin for r in records] == ["customers.jsonl:1", "customers.jsonl:2"]


def test_json_array_of_resources_is_streamed_item_by_item(tmp_path: Path) -> None:
    write_json(tmp_path / "export.json", [resource(n) for n in range(3)])

    records = read_all(source(tmp_path, "export.json"))

    assert [r.data["id"] for r in records] == ["cus0", "cus1", "cus2"]
    assert [r.origin for r in records] == ["export.json#0", "export.json#1", "export.json#2"]


def test_json_list_document_file_resolves_included_listed_after_data(tmp_path: Path) -> None:
    # "included" first in the dict would hide the case: orjson keeps insertion order.
    document = {"data": [resource(1, group="g1"), resource(2)], "included": [group("g1", "VIP")]}
    write_json(tmp_path / "page.json", document)

    records = read_all(source(tmp_path, "page.json"))

    assert records[0].data["customer_group"] == {
        "id": "g1",
        "type": "customer_groups",
        "name": "VIP",
    }
    assert "customer_group" not in records[1].data
    assert [r.origin for r in records] == ["page.json#0", "page.json#1"]


def test_flat_exports_json_array_turns_customer_group_id_into_a_relationship(
    tmp_path: Path,
) -> None:
    flat = [
        {"id": "cus1", "email": "a@example.com", "customer_group_id": "g1", "metadata": {"x": 1}},
        {"id": "cus2", "email": "b@example.com", "customer_group_id": None},
    ]
    write_json(tmp_path / "export.json", flat)

    records = read_all(source(tmp_path, "export.json"))

    assert records[0].data["customer_group"] == {"id": "g1", "type": "customer_groups"}
    assert records[0].data["metadata"] == {"x": 1}
    assert "customer_group" not in records[1].data


def test_exports_csv_parses_json_metadata_cell(tmp_path: Path) -> None:
    (tmp_path / "export.csv").write_text(EXPORT_CSV, encoding="utf-8")

    records = read_all(source(tmp_path, "export.csv"))

    assert records[0].data["metadata"] == {"tier": "gold"}
    assert records[0].data["customer_group"] == {"id": "grp1", "type": "customer_groups"}
    assert records[1].data["metadata"] is None  # an empty cell is null, not ""
    assert [r.origin for r in records] == ["export.csv:row 1", "export.csv:row 2"]


def test_parquet_nested_metadata_struct_becomes_a_dict(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": ["cus1", "cus2"],
            "email": ["a@example.com", "b@example.com"],
            "customer_group_id": ["g1", None],
            "metadata": [{"tier": "gold", "erp_id": 7}, {"tier": "silver", "erp_id": None}],
        }
    )
    pq.write_table(table, tmp_path / "x.parquet")

    records = read_all(source(tmp_path, "x.parquet"))

    assert records[0].data["metadata"] == {"tier": "gold", "erp_id": 7}
    assert records[0].data["customer_group"] == {"id": "g1", "type": "customer_groups"}
    assert [r.origin for r in records] == ["x.parquet#0", "x.parquet#1"]


# --- compression, globs, batches --------------------------------------------------------


def test_gzipped_jsonl_is_read(tmp_path: Path) -> None:
    data = b"".join(orjson.dumps(resource(n)) + b"\n" for n in range(3))
    gzip_file(tmp_path / "customers.jsonl.gz", data)

    records = read_all(source(tmp_path, "customers.jsonl.gz"))

    assert [r.data["id"] for r in records] == ["cus0", "cus1", "cus2"]
    assert records[2].origin == "customers.jsonl.gz:3"


def test_gzipped_csv_is_read(tmp_path: Path) -> None:
    gzip_file(tmp_path / "export.csv.gz", EXPORT_CSV.encode())

    records = read_all(source(tmp_path, "export.csv.gz"))

    assert [r.data["email"] for r in records] == ["a@example.com", "b@example.com"]


def test_gzipped_parquet_is_read(tmp_path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"email": ["a@example.com"]}), sink)
    gzip_file(tmp_path / "x.parquet.gz", sink.getvalue().to_pybytes())

    records = read_all(source(tmp_path, "x.parquet.gz"))

    assert [r.data["email"] for r in records] == ["a@example.com"]


def test_glob_reads_matched_files_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "exports").mkdir()
    write_jsonl(tmp_path / "exports" / "b.jsonl", [resource(2)])
    write_jsonl(tmp_path / "exports" / "a.jsonl", [resource(1)])
    write_jsonl(tmp_path / "exports" / "c.csv.txt", [resource(3)])  # not matched

    src = source(tmp_path, "exports/*.jsonl")

    assert src.files() == [tmp_path / "exports" / "a.jsonl", tmp_path / "exports" / "b.jsonl"]
    assert [r.origin for r in read_all(src)] == ["exports/a.jsonl:1", "exports/b.jsonl:1"]


def test_glob_matching_nothing_raises_source_error_naming_the_pattern(tmp_path: Path) -> None:
    src = source(tmp_path, "exports/customers-*.csv")

    with pytest.raises(SourceError, match=r"exports/customers-\*\.csv"):
        src.read(since=None, cursor=None, batch_size=10)


def test_batches_have_the_requested_size_and_the_last_the_rest(tmp_path: Path) -> None:
    # Two files: batches run across the file boundary.
    write_jsonl(tmp_path / "a.jsonl", [resource(n) for n in range(4)])
    write_jsonl(tmp_path / "b.jsonl", [resource(n) for n in range(4, 7)])

    batches = read_batches(source(tmp_path, "*.jsonl"), batch_size=3)

    assert [len(b.records) for b in batches] == [3, 3, 1]
    assert all(b.checkpoint is None and b.skipped == 0 for b in batches)


def test_a_complete_read_ends_with_what_each_file_held(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [resource(n) for n in range(4)])

    *_, last = source(tmp_path, "a.jsonl").read(since=None, cursor=None, batch_size=3)

    assert last.records == []
    assert last.checkpoint is not None
    assert last.checkpoint.watermark is None  # the engine sets an unordered source's
    [(name, entry)] = last.checkpoint.cursor["files"].items()  # type: ignore[index]
    assert name == "a.jsonl"
    assert entry[4] == 4


def test_an_unchanged_file_older_than_since_is_skipped_unread(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [resource(n) for n in range(4)])
    src = source(tmp_path, "a.jsonl")
    *_, last = src.read(since=None, cursor=None, batch_size=10)
    far_future = datetime(2100, 1, 1, tzinfo=UTC)

    again = list(src.read(since=far_future, cursor=last.checkpoint.cursor, batch_size=10))  # type: ignore[union-attr]

    assert sum(b.skipped for b in again) == 4
    assert not any(b.records for b in again)


def test_a_changed_file_is_read_again(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [resource(n) for n in range(4)])
    src = source(tmp_path, "a.jsonl")
    *_, last = src.read(since=None, cursor=None, batch_size=10)
    write_jsonl(tmp_path / "a.jsonl", [resource(n) for n in range(5)])
    far_future = datetime(2100, 1, 1, tzinfo=UTC)

    again = list(src.read(since=far_future, cursor=last.checkpoint.cursor, batch_size=10))  # type: ignore[union-attr]

    # Read, not taken from the cursor: the new entry counts the fifth record.
    assert sum(b.skipped for b in again) == 5
    entry = again[-1].checkpoint.cursor["files"]["a.jsonl"]  # type: ignore[union-attr, index]
    assert entry[4] == 5


def test_records_older_than_since_are_counted_skipped_not_handed_on(tmp_path: Path) -> None:
    old = {"updated_at": "2024-05-01T10:00:00.000Z"}
    new = {"updated_at": "2024-05-03T10:00:00.000Z"}
    page = {"data": [resource(0, **old), resource(1, **new), resource(2, **old)]}
    flat = {"id": "cus3", "email": "x@example.com", **old}
    write_jsonl(
        tmp_path / "a.jsonl", [page, resource(4, **new), flat, resource(5, updated_at=None)]
    )
    since = datetime(2024, 5, 2, tzinfo=UTC)

    batches = list(source(tmp_path, "a.jsonl").read(since=since, cursor=None, batch_size=10))

    records = [r for b in batches for r in b.records]
    assert [r.origin for r in records] == ["a.jsonl:1#1", "a.jsonl:2", "a.jsonl:4"]
    assert records[0].stamp == datetime(2024, 5, 3, 10, tzinfo=UTC)
    assert records[2].stamp is None  # no updated_at: handed on, validation decides
    assert sum(b.skipped for b in batches) == 3
    # A record without a time makes the file one a later run must always read.
    assert "a.jsonl" not in batches[-1].checkpoint.cursor["files"]  # type: ignore[union-attr, index]


def test_input_without_records_yields_no_batch(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    (tmp_path / "header_only.csv").write_text("id,email\n", encoding="utf-8")

    assert read_batches(source(tmp_path, "empty.jsonl")) == []
    assert read_batches(source(tmp_path, "header_only.csv")) == []


def test_file_source_satisfies_the_source_protocol(tmp_path: Path) -> None:
    assert isinstance(source(tmp_path, "x.csv"), Source)


# --- encodings and delimiters -----------------------------------------------------------


def test_utf8_bom_is_dropped_and_not_noted(tmp_path: Path) -> None:
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfemail,status\na@example.com,prospect\n")
    src = source(tmp_path, "bom.csv")

    records = read_all(src)

    assert records[0].data == {"email": "a@example.com", "status": "prospect"}
    assert notes(src) == []


def test_declared_utf8_with_a_bom_keeps_no_bom_in_the_header(tmp_path: Path) -> None:
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfemail\na@example.com\n")

    records = read_all(source(tmp_path, "bom.csv", encoding="utf-8", mapping="m"))

    assert records[0].data == {"email": "a@example.com"}


def test_json_array_with_a_bom_is_streamed(tmp_path: Path) -> None:
    (tmp_path / "export.json").write_bytes(b"\xef\xbb\xbf" + orjson.dumps([resource(1)]))

    assert [r.data["id"] for r in read_all(source(tmp_path, "export.json"))] == ["cus1"]


def test_windows_1252_is_detected_and_noted(tmp_path: Path) -> None:
    # The dash and the curly quotes are bytes 0x96, 0x93, 0x94: Windows-1252, not Latin-1.
    name = "Zo\u00eb \u2013 \u201cZ\u201d"
    (tmp_path / "contacts.csv").write_bytes(f"email,name\nz@example.com,{name}\n".encode("cp1252"))
    src = source(tmp_path, "contacts.csv")

    records = read_all(src)

    assert records[0].data["name"] == name
    assert notes(src) == ["contacts.csv: encoding detected as windows-1252"]


def test_bytes_undefined_in_windows_1252_fall_back_to_latin_1(tmp_path: Path) -> None:
    (tmp_path / "contacts.csv").write_bytes(b"email,name\nz@example.com,Zo\xeb\x81\n")
    src = source(tmp_path, "contacts.csv")

    assert read_all(src)[0].data["name"] == "Zo\xeb\x81"
    assert notes(src) == ["contacts.csv: encoding detected as latin-1"]


def test_undeclared_utf8_is_noted_and_declared_utf8_is_not(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("email\nzoë@example.com\n", encoding="utf-8")

    assert notes(source(tmp_path, "c.csv")) == ["c.csv: encoding detected as utf-8"]
    assert notes(source(tmp_path, "c.csv", encoding="utf-8")) == []


def test_a_wrong_declared_encoding_raises_source_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "contacts.csv").write_bytes("email\nzoë@example.com\n".encode("cp1252"))

    with pytest.raises(SourceError, match=r"contacts\.csv.*utf-8"):
        read_all(source(tmp_path, "contacts.csv", encoding="utf-8"))


def test_semicolon_delimiter_is_sniffed_and_noted(tmp_path: Path) -> None:
    text = "email;status;metadata\na@example.com;prospect;\nb@example.com;repeat;\n"
    (tmp_path / "eu.csv").write_text(text, encoding="utf-8")
    src = source(tmp_path, "eu.csv")

    records = read_all(src)

    assert [r.data["status"] for r in records] == ["prospect", "repeat"]
    assert "eu.csv: delimiter detected as ';'" in notes(src)


def test_tab_delimiter_is_sniffed_in_utf16_excel_text(tmp_path: Path) -> None:
    text = "Email\tFirst Name\nz@example.com\tZoë\n"
    (tmp_path / "contacts.tsv").write_bytes(text.encode("utf-16"))  # with its BOM
    src = source(tmp_path, "contacts.tsv", mapping="m")

    assert read_all(src)[0].data == {"Email": "z@example.com", "First Name": "Zoë"}
    assert notes(src) == ["contacts.tsv: delimiter detected as '\\t'"]


def test_declared_delimiter_is_used_without_sniffing(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("email|status\na@example.com|repeat\n", encoding="utf-8")
    src = source(tmp_path, "p.csv", delimiter="|", encoding="utf-8")

    assert read_all(src)[0].data == {"email": "a@example.com", "status": "repeat"}
    assert notes(src) == []


def test_quoted_line_break_inside_a_cell_stays_in_the_cell(tmp_path: Path) -> None:
    text = 'email,Note\r\na@example.com,"first line\r\nsecond line"\r\nb@example.com,x\r\n'
    (tmp_path / "c.csv").write_bytes(text.encode())

    records = read_all(source(tmp_path, "c.csv", mapping="m"))

    assert records[0].data["Note"] == "first line\r\nsecond line"
    assert [r.origin for r in records] == ["c.csv:row 1", "c.csv:row 2"]


def test_header_names_are_stripped(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text(" Email , Status\na@example.com,repeat\n", encoding="utf-8")

    assert read_all(source(tmp_path, "c.csv", mapping="m"))[0].data == {
        "Email": "a@example.com",
        "Status": "repeat",
    }


# --- bad input --------------------------------------------------------------------------


def test_blank_jsonl_lines_are_skipped(tmp_path: Path) -> None:
    line = orjson.dumps(resource(1)).decode()
    (tmp_path / "c.jsonl").write_text(f"\n{line}\n   \n\n{line}\n\n\n", encoding="utf-8")

    records = read_all(source(tmp_path, "c.jsonl"))

    assert [r.origin for r in records] == ["c.jsonl:2", "c.jsonl:5"]
    assert all(r.error is None for r in records)


def test_empty_csv_rows_and_trailing_empty_lines_are_skipped(tmp_path: Path) -> None:
    text = "email,status\na@example.com,repeat\n\n,\nb@example.com,repeat\n\n\n\n"
    (tmp_path / "c.csv").write_text(text, encoding="utf-8")

    records = read_all(source(tmp_path, "c.csv"))

    assert [r.data["email"] for r in records] == ["a@example.com", "b@example.com"]
    assert all(r.error is None for r in records)


def test_malformed_json_line_becomes_an_error_record_and_the_read_goes_on(
    tmp_path: Path,
) -> None:
    good = orjson.dumps(resource(1)).decode()
    (tmp_path / "c.jsonl").write_text(f'{good}\n{{"id": x}}\n{good}\n', encoding="utf-8")

    records = read_all(source(tmp_path, "c.jsonl"))

    assert [r.error is None for r in records] == [True, False, True]
    bad = records[1]
    assert bad.origin == "c.jsonl:2"
    assert bad.data == {"_raw": '{"id": x}'}
    assert bad.error is not None
    assert bad.error.startswith("invalid JSON:")
    assert "column 8" in bad.error


def test_json_line_that_is_not_an_object_becomes_an_error_record(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "c.jsonl", [42, resource(1)])

    records = read_all(source(tmp_path, "c.jsonl"))

    assert records[0].error == "expected a JSON object, got a number"
    assert records[0].data == {"_raw": "42"}
    assert records[1].error is None


def test_list_document_whose_data_is_not_objects_becomes_one_error_record(
    tmp_path: Path,
) -> None:
    write_jsonl(tmp_path / "c.jsonl", [{"data": [resource(1), "cus2"]}, resource(3)])

    records = read_all(source(tmp_path, "c.jsonl"))

    assert [r.origin for r in records] == ["c.jsonl:1", "c.jsonl:2"]
    assert records[0].error is not None
    assert "other than objects" in records[0].error
    assert records[0].data["_raw"].startswith('{"data":')


def test_json_array_item_that_is_not_an_object_becomes_an_error_record(tmp_path: Path) -> None:
    write_json(tmp_path / "export.json", [resource(0), "oops", resource(2)])

    records = read_all(source(tmp_path, "export.json"))

    assert [(r.origin, r.error) for r in records] == [
        ("export.json#0", None),
        ("export.json#1", "expected a JSON object, got a string"),
        ("export.json#2", None),
    ]
    assert records[1].data == {"_raw": '"oops"'}


def test_json_file_that_is_json_lines_raises_source_error_with_a_hint(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "export.json", [resource(1), resource(2)])

    with pytest.raises(SourceError, match=r"export\.json.*format = \"jsonl\""):
        read_all(source(tmp_path, "export.json"))


def test_file_that_is_not_parquet_raises_source_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "x.parquet").write_text("email\na@example.com\n", encoding="utf-8")

    with pytest.raises(SourceError, match=r"x\.parquet"):
        read_all(source(tmp_path, "x.parquet"))


def test_truncated_json_array_raises_source_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "export.json").write_text('[{"email": "a@example.com"}, {"email": ', "utf-8")

    with pytest.raises(SourceError, match=r"export\.json.*after item 0"):
        read_all(source(tmp_path, "export.json"))


def test_csv_row_with_too_many_cells_becomes_an_error_record(tmp_path: Path) -> None:
    text = "email,status\na@example.com,repeat\nb@example.com,repeat,extra\nc@example.com,\n"
    (tmp_path / "contacts.csv").write_text(text, encoding="utf-8")

    records = read_all(source(tmp_path, "contacts.csv"))

    assert [r.error is None for r in records] == [True, False, True]
    assert records[1].origin == "contacts.csv:row 2"
    assert records[1].data == {"_raw": "b@example.com,repeat,extra"}
    assert records[1].error == "the row has 3 cells, the header 2"


def test_extra_empty_cells_at_the_end_of_a_row_are_tolerated(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("email,status\na@example.com,repeat,,\n", encoding="utf-8")

    records = read_all(source(tmp_path, "c.csv", mapping="m"))

    assert records[0].error is None
    assert records[0].data == {"email": "a@example.com", "status": "repeat"}


def test_error_record_raw_text_is_truncated(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text("{" + "x" * 20_000 + "\n", encoding="utf-8")

    [record] = read_all(source(tmp_path, "c.jsonl"))

    assert len(record.data["_raw"]) == 10_000


def test_unknown_suffix_without_format_is_a_config_error_on_format(tmp_path: Path) -> None:
    (tmp_path / "customers.txt").write_text("email\na@example.com\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="format"):
        source(tmp_path, "customers.txt").read(since=None, cursor=None, batch_size=10)
    assert len(read_all(source(tmp_path, "customers.txt", format="csv"))) == 1


# --- raw rows for an inbound mapping ----------------------------------------------------


def test_with_a_mapping_csv_rows_come_back_raw_with_header_case_kept(tmp_path: Path) -> None:
    text = "Customer ID,First Name,Email,Accepts Email Marketing\n'8779761975521,Zoë,Z@x.com,yes\n"
    (tmp_path / "shopify.csv").write_text(text, encoding="utf-8")

    [record] = read_all(source(tmp_path, "shopify.csv", mapping="shopify_customers"))

    assert record.data == {
        "Customer ID": "'8779761975521",
        "First Name": "Zoë",
        "Email": "Z@x.com",
        "Accepts Email Marketing": "yes",
    }


def test_with_a_mapping_json_objects_come_back_as_parsed(tmp_path: Path) -> None:
    document = {"data": [resource(1)], "Email": "Z@x.com"}
    write_jsonl(tmp_path / "c.jsonl", [document])
    write_json(tmp_path / "c.json", [document])

    assert read_all(source(tmp_path, "c.jsonl", mapping="m"))[0].data == document
    assert read_all(source(tmp_path, "c.json", mapping="m"))[0].data == document


# --- origins, check, close --------------------------------------------------------------


def test_origin_of_a_file_outside_base_dir_is_its_absolute_path(tmp_path: Path) -> None:
    base = tmp_path / "jobs"
    base.mkdir()
    write_jsonl(tmp_path / "c.jsonl", [resource(1)])

    [record] = read_all(source(base, "../c.jsonl"))

    assert record.origin == f"{tmp_path / 'c.jsonl'}:1"


def test_absolute_glob_is_matched_as_written(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "c.jsonl", [resource(1)])

    src = source(tmp_path / "elsewhere", str(tmp_path / "*.jsonl"))

    assert src.files() == [tmp_path / "c.jsonl"]


def test_check_counts_the_matched_files_and_their_size(tmp_path: Path) -> None:
    (tmp_path / "exports").mkdir()
    for name in ("a.csv", "b.csv", "c.csv"):
        (tmp_path / "exports" / name).write_bytes(b"email\n" + b"x" * 1994)

    assert source(tmp_path, "exports/*.csv").check() == ["3 files match exports/*.csv (6.0 kB)"]


def test_close_closes_a_half_consumed_read(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "c.jsonl", [resource(n) for n in range(10)])
    src = source(tmp_path, "c.jsonl")
    batches = src.read(since=None, cursor=None, batch_size=2)
    next(batches)

    src.close()

    assert list(batches) == []


# --- memory -----------------------------------------------------------------------------


def _peak_while_reading(path: Path) -> int:
    src = source(path.parent, path.name)
    src.expect_lookback(timedelta(minutes=5))  # as the engine does: lines are noted
    tracemalloc.start()
    try:
        for _batch in src.read(since=None, cursor=None, batch_size=500):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_as_the_input_grows(tmp_path: Path) -> None:
    start = datetime(2024, 5, 1, tzinfo=UTC)
    for count in (20_000, 80_000):
        with (tmp_path / f"c{count}.jsonl").open("wb") as f:
            for n in range(count):
                # A record a second, plus a tie of 30,000 at the end of the large file
                stamp = start + timedelta(seconds=min(n, 50_000))
                updated = stamp.isoformat().replace("+00:00", "Z")
                record = resource(n, group="g1", metadata={"n": n}, updated_at=updated)
                f.write(orjson.dumps(record) + b"\n")
    _peak_while_reading(tmp_path / "c20000.jsonl")  # warm caches before measuring

    small = _peak_while_reading(tmp_path / "c20000.jsonl")
    large = _peak_while_reading(tmp_path / "c80000.jsonl")

    assert large < 1.5 * small, (small, large)


def test_an_unchanged_file_with_records_at_the_lower_bound_is_read_again(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [resource(n) for n in range(4)])
    src = source(tmp_path, "a.jsonl")
    *_, last = src.read(since=None, cursor=None, batch_size=10)
    at_the_bound = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)  # the records' own updated_at

    again = list(src.read(since=at_the_bound, cursor=last.checkpoint.cursor, batch_size=10))  # type: ignore[union-attr]

    assert sum(len(b.records) for b in again) == 4
    assert sum(b.skipped for b in again) == 0


def test_a_jsonl_line_that_is_not_utf8_is_read_as_windows_1252(tmp_path: Path) -> None:
    # The encoding is judged on the first MiB; a later line in another encoding is decoded
    # on its own rather than lost.
    filler = [resource(n, note="x" * 400) for n in range(3000)]  # over a MiB of UTF-8
    late = orjson.dumps(resource(9999, email="rene@example.com")).replace(b"rene", b"ren\xe9")
    bad = b'{"data": [\n'
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(orjson.dumps(v) + b"\n" for v in filler) + late + b"\n" + bad)
    src = source(tmp_path, "mixed.jsonl")

    batches = list(src.read(since=None, cursor=None, batch_size=5000))

    records = [r for b in batches for r in b.records]
    assert records[3000].data["email"] == "ren\u00e9@example.com"
    assert records[3001].error is not None
    assert records[3001].origin == "mixed.jsonl:3002"
    assert [n for b in batches for n in b.notes] == [
        "mixed.jsonl: encoding detected as utf-8",
        "mixed.jsonl: line 3001 is not UTF-8: lines like it are read as windows-1252",
    ]


def _mixed_lines(tmp_path: Path) -> Path:
    """JSON Lines of every kind: pages mixing old and recent records, single resources,
    flat records, a malformed line, a record without updated_at, blank lines."""

    def at(hour: int) -> dict[str, Any]:
        return {"updated_at": f"2024-05-01T{hour:02d}:00:00.000Z"}

    lines: list[bytes] = []
    n = 0
    for page in range(40):
        hours = [1 + (page * 7 + k) % 9 for k in range(5)]  # 01:00 .. 09:00
        docs = [resource(n + k, **at(h)) for k, h in enumerate(hours)]
        n += 5
        lines.append(orjson.dumps({"data": docs}))
        if page % 9 == 0:
            lines.append(orjson.dumps(resource(1000 + page, **at(2 + page % 8))))
            lines.append(b"")
        if page % 13 == 0:
            lines.append(orjson.dumps({"id": f"flat{page}", "email": "f@example.com", **at(9)}))
    lines.insert(7, b'{"data": [')  # malformed
    lines.insert(20, orjson.dumps(resource(5000, updated_at=None)))
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _summary(batches: list[SourceBatch]) -> tuple[list[str], list[str | None], int, list[str]]:
    records = [r for b in batches for r in b.records]
    return (
        [r.origin for r in records],
        [r.error for r in records],
        sum(b.skipped for b in batches),
        [n for b in batches for n in b.notes],
    )


def test_an_unchanged_file_is_read_again_only_where_recent_records_lie(tmp_path: Path) -> None:
    _mixed_lines(tmp_path)
    src = source(tmp_path, "mixed.jsonl")
    src.expect_lookback(timedelta(hours=2))
    *_, last = src.read(since=None, cursor=None, batch_size=50)
    cursor = last.checkpoint.cursor  # type: ignore[union-attr]
    entry = cursor["files"]["mixed.jsonl"]  # type: ignore[index]
    noted = entry[5]["hot"]
    total_lines = len((tmp_path / "mixed.jsonl").read_bytes().splitlines())
    assert 0 < len(noted) // 2 < total_lines  # only some lines are noted

    # The next run's lower bound is newest - lookback (09:00 - 2h) or later.
    for since in (datetime(2024, 5, 1, 7, tzinfo=UTC), datetime(2024, 5, 1, 8, 30, tzinfo=UTC)):
        indexed = list(src.read(since=since, cursor=cursor, batch_size=50))
        whole = list(source(tmp_path, "mixed.jsonl").read(since=since, cursor=None, batch_size=50))

        assert _summary(indexed) == _summary(whole)
        assert indexed[-1].checkpoint.cursor["files"]["mixed.jsonl"] == entry  # type: ignore[union-attr, index]
    # The malformed line and the record without a time are read again, so rejected again.
    errors = [e for e in _summary(indexed)[1] if e is not None]
    assert len(errors) == 1
    assert "mixed.jsonl:21" in _summary(indexed)[0]


def test_a_lower_bound_before_the_noted_one_reads_the_whole_file(tmp_path: Path) -> None:
    path = _mixed_lines(tmp_path)
    src = source(tmp_path, "mixed.jsonl")
    src.expect_lookback(timedelta(hours=2))
    *_, last = src.read(since=None, cursor=None, batch_size=50)
    cursor = last.checkpoint.cursor  # type: ignore[union-attr]
    early = datetime(2024, 5, 1, 3, tzinfo=UTC)  # before 09:00 - 2h

    indexed = list(src.read(since=early, cursor=cursor, batch_size=50))
    whole = list(source(tmp_path, "mixed.jsonl").read(since=early, cursor=None, batch_size=50))
    assert _summary(indexed) == _summary(whole)

    # A file changed since (here: one byte more) is read whole too.
    path.write_bytes(path.read_bytes() + b"\n")
    since = datetime(2024, 5, 1, 8, tzinfo=UTC)
    changed = list(src.read(since=since, cursor=cursor, batch_size=50))
    whole = list(source(tmp_path, "mixed.jsonl").read(since=since, cursor=None, batch_size=50))
    assert _summary(changed) == _summary(whole)


@pytest.mark.parametrize("name", ["a.csv", "a.jsonl.gz", "a.json"])
def test_files_without_line_offsets_are_read_again_whole(tmp_path: Path, name: str) -> None:
    # Only plain JSON Lines are re-read by line: the others are read whole, as before.
    old, new = "2024-05-01T08:00:00.000Z", "2024-05-01T10:00:00.000Z"
    flat = [
        {"id": f"c{n}", "email": f"u{n}@example.com", "updated_at": old if n % 2 else new}
        for n in range(6)
    ]
    if name.endswith(".csv"):
        rows = ["id,email,updated_at"] + [f"{r['id']},{r['email']},{r['updated_at']}" for r in flat]
        (tmp_path / name).write_text("\n".join(rows) + "\n", encoding="utf-8")
    elif name.endswith(".gz"):
        gzip_file(tmp_path / name, b"".join(orjson.dumps(r) + b"\n" for r in flat))
    else:
        write_json(tmp_path / name, flat)
    src = source(tmp_path, name)
    src.expect_lookback(timedelta(minutes=5))
    *_, last = src.read(since=None, cursor=None, batch_size=50)
    since = datetime(2024, 5, 1, 9, 55, tzinfo=UTC)  # newest - lookback

    again = list(src.read(since=since, cursor=last.checkpoint.cursor, batch_size=50))  # type: ignore[union-attr]

    assert sum(len(b.records) for b in again) == 3
    assert sum(b.skipped for b in again) == 3


def test_notes_are_not_used_when_the_file_is_then_read_as_text(tmp_path: Path) -> None:
    # A job that now declares another encoding reads the file whole: the records of the
    # unnoted lines are not counted twice.
    _mixed_lines(tmp_path)
    first = source(tmp_path, "mixed.jsonl")
    first.expect_lookback(timedelta(hours=2))
    *_, last = first.read(since=None, cursor=None, batch_size=50)
    since = datetime(2024, 5, 1, 8, tzinfo=UTC)
    as_text = source(tmp_path, "mixed.jsonl", encoding="latin-1")

    again = list(as_text.read(since=since, cursor=last.checkpoint.cursor, batch_size=50))  # type: ignore[union-attr]
    whole = list(
        source(tmp_path, "mixed.jsonl", encoding="latin-1").read(
            since=since, cursor=None, batch_size=50
        )
    )

    assert _summary(again)[:3] == _summary(whole)[:3]


def test_notes_the_cursor_does_not_hold_whole_mean_a_whole_read(tmp_path: Path) -> None:
    _mixed_lines(tmp_path)
    src = source(tmp_path, "mixed.jsonl")
    src.expect_lookback(timedelta(hours=2))
    *_, last = src.read(since=None, cursor=None, batch_size=50)
    cursor = last.checkpoint.cursor  # type: ignore[union-attr]
    del cursor["files"]["mixed.jsonl"][5]["cold"]  # type: ignore[index]
    since = datetime(2024, 5, 1, 8, tzinfo=UTC)

    again = list(src.read(since=since, cursor=cursor, batch_size=50))
    whole = list(source(tmp_path, "mixed.jsonl").read(since=since, cursor=None, batch_size=50))

    assert _summary(again) == _summary(whole)
