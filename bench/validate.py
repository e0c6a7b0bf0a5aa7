"""Validation alone: customers/s on one core, in batches of 1,000, beside issue 4's goal of
200,000/s. The headline is ``custsync.model.validate_records``, the validation every
``custsync sync`` runs (the Customer schema, into plain dicts); ``validate_batch`` (into
``Customer`` models, what the Python API hands a notebook) is measured beside it.

    .venv/bin/python bench/validate.py [--records 50000] [--rounds 5] [--json]

Records are generated in memory, shaped as the file source hands them to validation (a
list document's resources, normalised by ``iter_records``). A second figure adds JSON
parsing and normalising, for context. Each round times every record once; the median
round is reported, with the spread.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

import orjson

from custsync import _fake
from custsync.cli import GC_THRESHOLDS
from custsync.model import iter_records, validate_batch, validate_records

GOAL_PER_S = 200_000
PAGE = 25  # records per API list document, as the API pages them


def _documents(n: int, seed: int) -> list[bytes]:
    groups = _fake.customer_groups(seed=seed)
    customers = list(_fake.make_customers(n, seed=seed))
    documents = []
    for start in range(0, n, PAGE):
        page = customers[start : start + PAGE]
        documents.append(orjson.dumps({"data": page, "included": groups}))
    return documents


def _round_validate(records: list[dict[str, Any]], batch: int, validate: Any = None) -> float:
    validate = validate or validate_records
    started = time.perf_counter()
    for start in range(0, len(records), batch):
        results = validate(records[start : start + batch])
        if len(results) != len(records[start : start + batch]):
            raise RuntimeError("validation returned the wrong number of results")
    return time.perf_counter() - started


def _round_parse_validate(documents: list[bytes], batch: int) -> float:
    started = time.perf_counter()
    pending: list[dict[str, Any]] = []
    for document in documents:
        pending.extend(iter_records(orjson.loads(document)))
        if len(pending) >= batch:
            validate_records(pending)
            pending = []
    if pending:
        validate_records(pending)
    return time.perf_counter() - started


def measure(records_n: int, rounds: int, batch: int, seed: int) -> dict[str, Any]:
    documents = _documents(records_n, seed)
    records = [record for document in documents for record in iter_records(orjson.loads(document))]
    invalid = sum(1 for result in validate_records(records[:batch]) if isinstance(result, list))
    if invalid:
        raise RuntimeError(f"{invalid} generated records failed validation")
    _round_validate(records[: batch * 5], batch)  # warm-up: pydantic's first calls are slower
    _round_validate(records[: batch * 5], batch, validate_batch)

    # The generated input sits outside the collector's view: a streaming run holds one
    # batch, not 50,000 records, and the figure is validation's, not the GC walking our heap.
    gc.collect()
    gc.freeze()
    # The collector as `custsync sync` sets it: the figure is validation as a sync runs it.
    gc.set_threshold(*GC_THRESHOLDS)
    validate_times = [_round_validate(records, batch) for _ in range(rounds)]
    model_times = [_round_validate(records, batch, validate_batch) for _ in range(rounds)]
    parse_times = [_round_parse_validate(documents, batch) for _ in range(rounds)]

    def rate(times: list[float]) -> dict[str, float]:
        rates = [len(records) / t for t in times]
        return {
            "median_per_s": statistics.median(rates),
            "min_per_s": min(rates),
            "max_per_s": max(rates),
        }

    return {
        "records": len(records),
        "batch": batch,
        "rounds": rounds,
        "validate": rate(validate_times),
        "validate_models": rate(model_times),
        "parse_normalise_validate": rate(parse_times),
        "goal_per_s": GOAL_PER_S,
        "met": statistics.median(len(records) / t for t in validate_times) >= GOAL_PER_S,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cpu", type=int, default=None, help="core to pin to (default: last)")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args(argv)
    if not (1 <= args.rounds <= 100 and args.records >= args.batch >= 1):
        parser.error("need 1 <= rounds <= 100 and records >= batch >= 1")

    cores = sorted(os.sched_getaffinity(0))
    cpu = args.cpu if args.cpu is not None else cores[-1]
    os.sched_setaffinity(0, {cpu})  # one core, as the goal states
    result = measure(args.records, args.rounds, args.batch, args.seed)
    result["cpu"] = cpu

    if args.json:
        print(json.dumps(result))
        return 0
    v, m, p = result["validate"], result["validate_models"], result["parse_normalise_validate"]
    print(
        f"validation on one core (cpu {cpu}), {result['records']:,} records, batches of "
        f"{args.batch:,}, {args.rounds} rounds"
    )
    print(
        f"  validate_records (sync):      {v['median_per_s']:>9,.0f} customers/s "
        f"({v['min_per_s']:,.0f}-{v['max_per_s']:,.0f})   goal {GOAL_PER_S:,}/s: "
        f"{'met' if result['met'] else 'NOT met'}"
    )
    print(
        f"  validate_batch (models):      {m['median_per_s']:>9,.0f} customers/s "
        f"({m['min_per_s']:,.0f}-{m['max_per_s']:,.0f})"
    )
    print(
        f"  parse + normalise + validate: {p['median_per_s']:>9,.0f} customers/s "
        f"({p['min_per_s']:,.0f}-{p['max_per_s']:,.0f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
