"""The baseline: the pandas + SQLAlchemy script an engineer writes in an afternoon to load
the benchmark's JSON Lines file of Commerce Layer list documents into a SQL table, with
``INSERT ... ON CONFLICT (id) DO UPDATE`` in chunks. No state: every run upserts every row.

    .venv/bin/python bench/competitors/naive.py INPUT URL TABLE [--schema S] [--chunk-size N]

Deliberately ordinary: the whole file is read into one DataFrame, timestamps are parsed
with pandas, and rows go through SQLAlchemy's executemany. The last line of standard
output is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

COLUMNS_TEXT = (
    "email",
    "status",
    "shopper_reference",
    "profile_id",
    "tax_exemption_code",
    "anonymization_status",
    "reference",
    "reference_origin",
    "customer_group_id",
)


def read_rows(path: str) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            if not line.strip():
                continue
            for resource in json.loads(line)["data"]:
                row = {"id": resource["id"], **resource["attributes"]}
                group = resource.get("relationships", {}).get("customer_group", {}).get("data")
                row["customer_group_id"] = group["id"] if group else None
                rows.append(row)
    frame = pd.DataFrame(rows)
    for column in ("created_at", "updated_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
    return frame


def customers_table(name: str, schema: str | None) -> sa.Table:
    json_type = sa.JSON(none_as_null=True).with_variant(
        postgresql.JSONB(none_as_null=True), "postgresql"
    )
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("id", sa.String(64), primary_key=True),
        *(sa.Column(column, sa.Text) for column in COLUMNS_TEXT),
        sa.Column("has_password", sa.Boolean),
        sa.Column("total_orders_count", sa.Integer),
        sa.Column("anonymization_info", json_type),
        sa.Column("metadata", json_type),
        sa.Column("created_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True)),
        schema=schema,
    )


def to_records(frame: pd.DataFrame, columns: list[str]) -> list[dict[str, Any]]:
    # pandas holds missing text as NaN; the database wants NULL.
    frame = frame[columns].astype(object)
    frame = frame.where(frame.notna(), None)
    records = frame.to_dict("records")
    for record in records:
        for column in ("created_at", "updated_at"):
            if record[column] is not None:
                record[column] = record[column].to_pydatetime()
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input")
    parser.add_argument("url", help="SQLAlchemy URL (sqlite:///... or postgresql+psycopg://...)")
    parser.add_argument("table")
    parser.add_argument("--schema")
    parser.add_argument("--chunk-size", type=int, default=5000)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    engine = sa.create_engine(args.url)
    table = customers_table(args.table, args.schema)
    table.metadata.create_all(engine)

    frame = read_rows(args.input)
    columns = [column.name for column in table.columns]
    records = to_records(frame, columns)

    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    statement = insert(table)
    statement = statement.on_conflict_do_update(
        index_elements=["id"],
        set_={name: statement.excluded[name] for name in columns if name != "id"},
    )
    for start in range(0, len(records), args.chunk_size):
        with engine.begin() as connection:
            connection.execute(statement, records[start : start + args.chunk_size])
    engine.dispose()

    summary = {
        "tool": "naive",
        "table": args.table,
        "rows_written": len(records),
        "duration_s": round(time.perf_counter() - started, 3),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
