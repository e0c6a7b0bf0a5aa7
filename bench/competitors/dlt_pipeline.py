"""dlt, in the configuration issue 4 calls its best, loading the benchmark's JSON Lines file
of Commerce Layer list documents into a SQL table; ``--trap`` is the configuration a user
falls into first (no primary key on the table, dlt's own tie deduplication on).

Runs in its own environment, never custsync's:

    bench/.venv-dlt/bin/python bench/competitors/dlt_pipeline.py INPUT URL TABLE PIPELINES_DIR

URL is a SQLAlchemy URL (``sqlite:////abs/file.db`` or ``postgresql://user@host/db``).
Each run is incremental on ``updated_at`` against the pipeline's state in PIPELINES_DIR
(and in the destination): a fresh PIPELINES_DIR and an empty destination make an initial
load. The last line of standard output is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

# No network here, and a benchmark must not wait on one: telemetry off before dlt loads.
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")

# dlt reads the environment above on import; orjson comes with dlt.
import dlt
import orjson

BATCH = 1000  # rows per yielded list: dlt's recommended way to feed a resource


def flat_rows(path: str) -> Iterator[list[dict[str, Any]]]:
    """One row per customer: id, every attribute as it is (``metadata`` and
    ``anonymization_info`` stay objects), and ``customer_group_id``."""
    batch: list[dict[str, Any]] = []
    with open(path, "rb") as stream:
        for line in stream:
            if not line.strip():
                continue
            for resource in orjson.loads(line)["data"]:
                row = {"id": resource["id"], **resource["attributes"]}
                group = (resource.get("relationships") or {}).get("customer_group") or {}
                linkage = group.get("data")
                row["customer_group_id"] = linkage["id"] if linkage else None
                batch.append(row)
            if len(batch) >= BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def build_resource(path: str, table: str, *, tie_dedup: bool) -> Any:
    # primary_key=() turns off dlt's deduplication of records at the cursor's last value:
    # the merge deduplicates by id anyway. Without it dlt hashes every row at the boundary.
    incremental_key: Any = None if tie_dedup else ()

    @dlt.resource(
        name=table,
        write_disposition="merge",
        primary_key="id",
        # metadata stays one JSON column; no child tables for nested values.
        columns={
            "metadata": {"data_type": "json"},
            "anonymization_info": {"data_type": "json"},
        },
        max_table_nesting=0,
    )
    def customers(
        # dlt reads the cursor from the default: its documented form.
        updated_at: Any = dlt.sources.incremental(  # noqa: B008
            "updated_at", primary_key=incremental_key
        ),
    ) -> Iterator[list[dict[str, Any]]]:
        yield from flat_rows(path)

    return customers()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="JSON Lines file of Commerce Layer list documents")
    parser.add_argument("url", help="SQLAlchemy URL of the destination database")
    parser.add_argument("table")
    parser.add_argument("pipelines_dir", help="where dlt keeps the pipeline's local state")
    parser.add_argument(
        "--dataset",
        help="dlt dataset (PostgreSQL schema); default: main on SQLite (the file itself), "
        "bench_dlt elsewhere",
    )
    parser.add_argument("--pipeline-name", default="bench_customers")
    parser.add_argument(
        "--trap",
        action="store_true",
        help="the first-try configuration: no primary key on the table and tie dedup on",
    )
    parser.add_argument(
        "--no-primary-key", action="store_true", help="create_primary_keys=False only"
    )
    parser.add_argument(
        "--tie-dedup", action="store_true", help="incremental tie deduplication on only"
    )
    args = parser.parse_args(argv)

    primary_key_on_table = not (args.trap or args.no_primary_key)
    tie_dedup = args.trap or args.tie_dedup
    dataset = args.dataset or ("main" if args.url.startswith("sqlite") else "bench_dlt")

    started = time.perf_counter()
    destination = dlt.destinations.sqlalchemy(
        credentials=args.url, create_primary_keys=primary_key_on_table
    )
    pipeline = dlt.pipeline(
        pipeline_name=args.pipeline_name,
        destination=destination,
        dataset_name=dataset,
        pipelines_dir=args.pipelines_dir,
    )
    # The table's primary key is the destination's business (create_primary_keys).
    resource = build_resource(args.input, args.table, tie_dedup=tie_dedup)
    load_info = pipeline.run(resource)
    load_info.raise_on_failed_jobs()

    normalize_info = pipeline.last_trace.last_normalize_info
    row_counts = dict(normalize_info.row_counts) if normalize_info else {}
    summary = {
        "tool": "dlt",
        "dlt_version": dlt.__version__,
        "dataset": dataset,
        "table": args.table,
        "primary_key_on_table": primary_key_on_table,
        "tie_dedup": tie_dedup,
        "rows_loaded": row_counts.get(args.table, 0),
        "duration_s": round(time.perf_counter() - started, 3),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
