"""Benchmark inputs: N customers as JSON Lines of API list documents, and the same file with
10% of the customers edited later, cached under bench/out/data/ by N and seed.

    .venv/bin/python bench/generate.py --n 100000 [--seed 7]

A ``.meta.json`` beside the files holds what a run must find in the target afterwards
(row count, sum of ``total_orders_count``); it is written last, so its presence means the
pair of files is complete. Everything comes from ``custsync._fake``: same N and seed, same
bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from custsync._fake import make_customers, touch, write_list_documents

BENCH = Path(__file__).resolve().parent
DATA_DIR = BENCH / "out" / "data"
TIE_FRACTION = 0.25  # a quarter of the records share one updated_at (a bulk import)
CHANGED_FRACTION = 0.10
# Bumped whenever the files' content changes for the same N and seed, so caches renew.
FORMAT = 1


@dataclass(frozen=True)
class Dataset:
    n: int
    seed: int
    initial: str  # path of the N customers
    changed: str  # path of the same customers, CHANGED_FRACTION of them edited later
    changed_count: int
    orders_initial: int  # sum of total_orders_count over the initial file
    orders_changed: int  # ... over the changed file
    max_updated_initial: str
    max_updated_changed: str
    format: int = FORMAT

    @classmethod
    def load(cls, path: Path) -> Dataset:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def paths(n: int, seed: int, data_dir: Path = DATA_DIR) -> tuple[Path, Path, Path]:
    stem = f"customers-n{n}-s{seed}-f{FORMAT}"
    return (
        data_dir / f"{stem}.jsonl",
        data_dir / f"{stem}-changed10.jsonl",
        data_dir / f"{stem}.meta.json",
    )


class _Tally:
    """Wraps the customer stream to learn the checksums while the file is written."""

    def __init__(self, customers: Iterator[dict[str, Any]]) -> None:
        self._customers = customers
        self.orders = 0
        self.max_updated = ""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for customer in self._customers:
            attributes = customer["attributes"]
            self.orders += attributes["total_orders_count"] or 0
            # Same format everywhere (UTC, milliseconds, Z): text order is time order.
            self.max_updated = max(self.max_updated, attributes["updated_at"])
            yield customer


def _edited(n: int, seed: int, after: datetime, changed: set[int]) -> Iterator[dict[str, Any]]:
    """The same customers in the same order; those in ``changed`` edited after ``after``,
    one second apart, the way a day of back-office edits would stamp them."""
    rng = random.Random(f"bench-edits:{seed}")
    at = after
    for index, customer in enumerate(make_customers(n, seed=seed, tie_fraction=TIE_FRACTION)):
        if index in changed:
            at += timedelta(seconds=1)
            yield touch(customer, at=at, rng=rng)
        else:
            yield customer


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(UTC)


def ensure(n: int, seed: int = 7, *, data_dir: Path = DATA_DIR, quiet: bool = False) -> Dataset:
    """The dataset for (n, seed), generated only when the cache does not hold it."""
    initial, changed, meta = paths(n, seed, data_dir)
    if meta.exists() and initial.exists() and changed.exists():
        dataset = Dataset.load(meta)
        if dataset.format == FORMAT:
            return dataset
    data_dir.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"generating {n:,} customers (seed {seed}) into {data_dir}", file=sys.stderr)

    tally = _Tally(make_customers(n, seed=seed, tie_fraction=TIE_FRACTION))
    tmp = initial.with_suffix(".tmp")
    write_list_documents(tmp, tally, seed=seed, record_count=n)
    os.replace(tmp, initial)

    picker = random.Random(f"bench-changed:{seed}")
    chosen = set(picker.sample(range(n), round(n * CHANGED_FRACTION)))
    # A day after the last edit of the initial file: every edit is newer than any watermark.
    start = _parse(tally.max_updated) + timedelta(days=1)
    edited = _Tally(_edited(n, seed, start, chosen))
    tmp = changed.with_suffix(".tmp")
    write_list_documents(tmp, edited, seed=seed, record_count=n)
    os.replace(tmp, changed)

    dataset = Dataset(
        n=n,
        seed=seed,
        initial=str(initial),
        changed=str(changed),
        changed_count=len(chosen),
        orders_initial=tally.orders,
        orders_changed=edited.orders,
        max_updated_initial=tally.max_updated,
        max_updated_changed=edited.max_updated,
    )
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(dataset), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, meta)
    return dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, required=True, help="number of customers")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    dataset = ensure(args.n, args.seed, data_dir=args.data_dir)
    print(json.dumps(asdict(dataset)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
