"""Reading customers without a target: ``iter_customers`` and ``read_customers``."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from custsync import plugins
from custsync.config import build_source
from custsync.errors import FieldError, RecordError
from custsync.model import Customer, validate_batch
from custsync.sources.base import Source

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("custsync")


def iter_customers(
    source: Mapping[str, Any],
    *,
    batch_size: int = 1000,
    base_dir: str | Path | None = None,
    on_error: Literal["raise", "skip"] = "raise",
) -> Iterator[list[Customer]]:
    """Validated batches of customers from a source (the ``[source]`` table of a job).

    ``on_error="raise"`` raises a RecordError naming the record and field at the first
    invalid record; ``"skip"`` logs it (by origin, never by content) and goes on.
    """
    folder = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    settings, inbound = build_source(source, base_dir=folder)
    connector = plugins.find("source", settings.connector)
    reader = cast(Source, connector.factory(settings, base_dir=folder))
    try:
        for batch in reader.read(since=None, cursor=None, batch_size=batch_size):
            records: list[dict[str, Any]] = []
            origins: list[str] = []
            for raw in batch.records:
                errors: list[FieldError] | None = None
                data = raw.data
                if raw.error is not None:
                    errors = [FieldError("record", raw.error)]
                elif inbound is not None:
                    mapped = inbound.apply([data])[0]
                    if isinstance(mapped, list):
                        errors = mapped
                    else:
                        data = mapped
                if errors is not None:
                    _bad(raw.origin, errors, on_error)
                    continue
                records.append(data)
                origins.append(raw.origin)
            customers: list[Customer] = []
            for origin, result in zip(origins, validate_batch(records), strict=True):
                if isinstance(result, Customer):
                    customers.append(result)
                else:
                    _bad(origin, result, on_error)
            if customers:
                yield customers
    finally:
        reader.close()


def _bad(origin: str, errors: list[FieldError], on_error: str) -> None:
    if on_error == "raise":
        raise RecordError(errors, source_id=origin)
    log.warning("skipped invalid record %s (%s)", origin, ", ".join(e.field for e in errors))


def read_customers(
    source: Mapping[str, Any],
    *,
    base_dir: str | Path | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    limit: int | None = None,
) -> pd.DataFrame:
    """A pandas DataFrame of customers, one column per field, nested values flattened
    with dots (``metadata.tier``, ``customer_group.name``); passwords never included."""
    import pandas as pd  # imported here: a plain sync never pays for pandas

    rows: list[dict[str, Any]] = []
    for batch in iter_customers(source, base_dir=base_dir, on_error=on_error):
        for customer in batch:
            rows.append(customer.model_dump(exclude={"password"}, exclude_none=False))
            if limit is not None and len(rows) >= limit:
                break
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        return pd.DataFrame()
    return pd.json_normalize(rows, sep=".")
