"""`make demo`: sync the bundled Commerce Layer export into SQLite, twice, and say what
happened. The first run loads everything; the second shows the incremental no-op."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "demo"
CUSTSYNC = [sys.executable, "-m", "custsync.cli"]


def run(*args: str) -> None:
    print(f"\n$ custsync {' '.join(a for a in args if a != '-q')}", flush=True)
    completed = subprocess.run([*CUSTSYNC, *args], cwd=DEMO, check=False)
    if completed.returncode != 0:
        sys.exit(f"demo: custsync exited {completed.returncode}")


def main() -> None:
    for leftover in (DEMO / "demo.db", DEMO / ".custsync"):
        if leftover.is_dir():
            subprocess.run(["rm", "-rf", str(leftover)], check=True)
        elif leftover.exists():
            leftover.unlink()
    print("custsync demo: demo/customers.jsonl holds 2,000 Commerce Layer customers, as pages")
    print("of the API's list documents. demo/job.toml maps them with the erp_customer preset")
    print("into the table `customers` of demo/demo.db (SQLite), keyed by customer_no.")

    run("-q", "sync", "job.toml", "--no-progress")
    print("\nThe second run reads the same file. Records older than the watermark the first run")
    print("recorded (less the 5-minute lookback) are skipped; the few inside the lookback are")
    print("read again and skipped too, as the first run wrote them just so. Nothing is written,")
    print("and the run never opens the table.")
    run("-q", "sync", "job.toml", "--no-progress")

    with sqlite3.connect(DEMO / "demo.db") as db:
        total = db.execute("SELECT count(*) FROM customers").fetchone()[0]
        sample = db.execute(
            "SELECT customer_no, email, status, customer_group, source_updated_at "
            "FROM customers ORDER BY customer_no LIMIT 3"
        ).fetchall()
    print(f"\ndemo/demo.db now holds {total:,} rows. The first three:")
    for row in sample:
        print("  " + " | ".join(str(v) for v in row))
    print("\nTry: .venv/bin/custsync state show demo/job.toml")
    print("     .venv/bin/custsync sync demo/job.toml --full-refresh --dry-run")


if __name__ == "__main__":
    main()
