"""Write the demo: demo/customers.jsonl (API list documents), demo/job.toml, demo/.gitignore.

Deterministic (seed 42), so re-running it reproduces the committed files byte for byte.
"""

from __future__ import annotations

import collections
from pathlib import Path

import orjson

from custsync._fake import make_customers, write_list_documents

DEMO = Path(__file__).resolve().parent.parent / "demo"
SEED = 42
GROUPS = 4
PAGE_SIZE = 25
# The file is committed: faithful API pages weigh about 1.3 kB a customer (links
# included), so 1,500 customers keep it near 2 MB.
CUSTOMERS = 2_000
TIE_FRACTION = 0.25

JOB_TOML = """\
name = "demo"

[source]
connector = "file"
path = "customers.jsonl"

[target]
connector = "sql"
url = "sqlite:///demo.db"
table = "customers"
key = "customer_no"

[mapping]
preset = "erp_customer"

[sync]
batch_size = 500
"""

GITIGNORE = """\
demo.db*
.custsync/
"""


def main() -> None:
    DEMO.mkdir(exist_ok=True)
    data = DEMO / "customers.jsonl"
    written = write_list_documents(
        data,
        make_customers(CUSTOMERS, seed=SEED, tie_fraction=TIE_FRACTION, groups=GROUPS),
        page_size=PAGE_SIZE,
        groups=GROUPS,
        seed=SEED,
        record_count=CUSTOMERS,
    )
    (DEMO / "job.toml").write_text(JOB_TOML, encoding="utf-8")
    (DEMO / ".gitignore").write_text(GITIGNORE, encoding="utf-8")

    pages = 0
    updated_at: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    with data.open("rb") as lines:
        for line in lines:
            pages += 1
            document = orjson.loads(line)
            names = {g["id"]: g["attributes"]["name"] for g in document["included"]}
            for customer in document["data"]:
                updated_at[customer["attributes"]["updated_at"]] += 1
                linkage = customer["relationships"]["customer_group"]["data"]
                groups[names[linkage["id"]] if linkage else "(none)"] += 1
    tie, tied = updated_at.most_common(1)[0]
    print(
        f"wrote {data} ({data.stat().st_size / 1e6:.2f} MB): {written} customers in {pages} pages"
    )
    print(f"  {tied} customers share updated_at {tie} (the bulk import)")
    print("  groups: " + ", ".join(f"{name} {count}" for name, count in groups.most_common()))
    print(f"wrote {DEMO / 'job.toml'}")
    print(f"wrote {DEMO / '.gitignore'}")


if __name__ == "__main__":
    main()
