"""Extraction from Commerce Layer (issue 3): ``custsync sync`` against the fake API with
100 ms a request and the documented, unscaled rate limits. Prints a table and writes
bench/EXTRACT.md.

    .venv/bin/python bench/extract.py [--quick] [--live 8000] [--test 4000]
        [--backfill 200000] [--in-flight 3,1,5] [--parts steady,backfill]

Two parts, each a ``custsync sync JOB --json`` subprocess (the commercelayer source, the
``flat_customer`` preset, a new SQLite file per run) against ``tests/fakes/commercelayer.py``
served from this process on loopback:

1. **steady**: a first read through the list API (``export_threshold = 0``), live and
   test mode, long enough for about 100 s of steady state. Throughput is reported as a
   fraction of the sustained ceiling, 25 records x the per-minute limit ÷ 60 (83.3/s
   live, 41.7/s test); the sustained rate is read from the arrival times of the list
   requests at the fake, the end-to-end rate is N ÷ the process's wall time.
2. **backfill**: a full read of N = 200,000 through the Exports API (5,000 per export,
   ``--in-flight`` exports at once, the first figure the default), against the time the
   list API would take for the same N at the rate part 1 measured in the same mode:
   computed, never run (it would take about 40 minutes live).

After every run the table is checked: N rows, N distinct ids. Every run is bounded by a
timeout; nothing waits forever.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import itertools
import json
import math
import os
import platform
import shlex
import sqlite3
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fake lives with the tests

from run import last_json_line, load_average, machine, run_process, source_state  # noqa: E402

from custsync.commercelayer.client import LIMITS, Pacer  # noqa: E402
from fakes.commercelayer import RATE_LIMITS, FakeCommerceLayer  # noqa: E402 - after sys.path

OUT = BENCH / "out"
CUSTSYNC = ROOT / ".venv" / "bin" / "custsync"
PAGE = 25  # records a list request returns at most
TABLE = "customers"
SECRET_VAR = "CL_SECRET"
MODES = ("live", "test")
PARTS = ("steady", "backfill")

# The figures issue 3 sets.
GOAL_FRACTION = 0.90


def ceiling(mode: str) -> float:
    """Customers a second the per-minute read limit allows: 25 x limit ÷ 60."""
    limit, window = RATE_LIMITS[mode]["reads"]
    return PAGE * limit / window


def planned_rate(mode: str) -> tuple[float, float]:
    """The rate the client's Pacer aims at, as it computes its even spacing: each limit
    cut by the default margin, then the strictest window ÷ limit. Returns (records/s,
    margin)."""
    margin = float(inspect.signature(Pacer).parameters["margin"].default)
    limits = LIMITS["live" if mode == "live" else "test"]["read"]
    spacing = max(window / max(1, int(n * margin)) for n, window in limits)
    return PAGE / spacing, margin


# --- the fake ---------------------------------------------------------------------------


class BenchFake(FakeCommerceLayer):
    """The tests' fake, plus two things a benchmark needs: how long the fake itself
    spends answering (it scans every customer for each list request, which the real API
    does not, so that time must be visible next to the wall times), and an export whose
    duration grows with its size: ``export_fixed`` seconds plus ``export_per_record`` a
    record, pending for the first half of the fixed part."""

    def __init__(self, *, export_fixed: float, export_per_record: float, **options: Any) -> None:
        super().__init__(export_delay=export_fixed / 2, **options)
        self.export_fixed = export_fixed
        self.export_per_record = export_per_record
        self.busy: dict[str, list[float]] = {}  # route class -> [seconds, count]

    def _route(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        headers: Any,
        body: bytes,
    ) -> Any:
        # Called with the fake's lock held, so the tally needs no lock of its own.
        started = time.perf_counter()
        try:
            return super()._route(method, path, query, headers, body)
        finally:
            tally = self.busy.setdefault(_route_class(method, path, query), [0.0, 0])
            tally[0] += time.perf_counter() - started
            tally[1] += 1

    def _create_export(self, body: bytes) -> Any:
        response = super()._create_export(body)
        ident = orjson.loads(response.body)["data"]["id"]
        export = self.exports[ident]
        created = export.starts - self.export_delay
        export.completes = (
            created + self.export_fixed + self.export_per_record * export.records_count
        )
        return response

    def reset_busy(self) -> None:
        with self._lock:
            self.busy = {}


def _route_class(method: str, path: str, query: dict[str, str]) -> str:
    if path == "/oauth/token":
        return "token"
    if path.startswith("/attachments/"):
        return "attachment"
    if path == "/api/customers" and method == "GET":
        return "list page" if query.get("page[size]") == str(PAGE) else "list probe"
    if path == "/api/exports":
        return "export create"
    if path.startswith("/api/exports/"):
        return "export poll"
    return f"{method} {path}"


# --- one run ----------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    part: str  # steady | backfill
    mode: str
    n: int
    in_flight: int | None  # exports at once; None for the list API
    wall_s: float
    peak_rss_mb: float
    exit_code: int
    status: str  # the run's JSON summary status
    rows: int
    ids: int
    requests: int  # every request the fake received during the run
    throttled: int  # 429s the fake answered
    list_pages: int
    exports: int
    sustained_per_s: float | None  # from the list pages' arrival times
    gap_median_s: float | None
    gap_p95_s: float | None
    gap_max_s: float | None
    first_page_s: float | None  # from the process's start to the first list page
    after_last_page_s: float | None  # from the last list page to the process's end
    fake_busy_s: float  # time the fake spent answering, its lock held
    fake_busy: dict[str, list[float]]
    load_before: float
    load_after: float
    log_dir: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.status == "ok" and self.rows == self.ids == self.n

    @property
    def per_s(self) -> float:
        return self.n / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else float("nan")


def write_job(
    folder: Path,
    fake: FakeCommerceLayer,
    *,
    threshold: int,
    size: int,
    in_flight: int,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        'name = "bench-extract"',
        "",
        "[source]",
        'connector = "commercelayer"',
        f"base_url = {json.dumps(fake.base_url)}",
        f"auth_url = {json.dumps(fake.auth_url)}",
        f"client_id = {json.dumps(fake.client_id)}",
        f'client_secret = "${{{SECRET_VAR}}}"',
        # No mode and no requests_per_minute: the client learns the mode from the records
        # and paces to the documented limits, as a user's job would.
        f"export_threshold = {threshold}",
        f"export_size = {size}",
        f"exports_in_flight = {in_flight}",
        "",
        "[target]",
        'connector = "sql"',
        f"url = {json.dumps('sqlite:///' + str(folder / 'target.db'))}",
        f'table = "{TABLE}"',
        'key = "id"',
        "",
        "[mapping]",
        'preset = "flat_customer"',
    ]
    job = folder / "job.toml"
    job.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return job


def child_env(fake: FakeCommerceLayer) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    env[SECRET_VAR] = fake.client_secret
    return env


def count_rows(db: Path) -> tuple[int, int]:
    if not db.exists():
        return 0, 0
    with contextlib.closing(sqlite3.connect(db)) as connection:
        try:
            rows, ids = connection.execute(
                f"SELECT count(*), count(DISTINCT id) FROM {TABLE}"
            ).fetchone()
        except sqlite3.Error:
            return 0, 0
    return int(rows), int(ids)


def run_sync(
    fake: BenchFake,
    folder: Path,
    *,
    part: str,
    n: int,
    threshold: int,
    size: int,
    in_flight: int | None,
    timeout: float,
) -> Run:
    job = write_job(folder, fake, threshold=threshold, size=size, in_flight=in_flight or 1)
    first_request = len(fake.requests)
    throttled_before = fake.throttled
    exports_before = len(fake.exports)
    fake.reset_busy()
    load_before = load_average()
    launched = time.monotonic()  # the fake stamps requests with the same clock
    wall, rss, code, stdout = run_process(
        [str(CUSTSYNC), "sync", str(job), "--json", "--no-progress"],
        cwd=folder,
        log_stem=folder / "sync",
        timeout=timeout,
        env=child_env(fake),
    )
    ended = time.monotonic()
    load_after = load_average()
    summary = last_json_line(stdout)
    rows, ids = count_rows(folder / "target.db")
    requests = fake.requests[first_request:]
    pages = [r.time for r in requests if _route_class(r.method, r.path, r.query) == "list page"]
    gaps = [b - a for a, b in itertools.pairwise(pages)]
    sustained = None
    if len(pages) >= 3:
        # From the second page on: the first goes out before the client has learnt the
        # mode from a record, so at the stricter test pacing.
        sustained = PAGE * (len(pages) - 2) / (pages[-1] - pages[1])
    busy = {k: [round(v[0], 3), v[1]] for k, v in sorted(fake.busy.items())}
    result = Run(
        part=part,
        mode=fake.mode,
        n=n,
        in_flight=in_flight,
        wall_s=round(wall, 3),
        peak_rss_mb=round(rss, 1),
        exit_code=code,
        status=str(summary.get("status", "no summary")),
        rows=rows,
        ids=ids,
        requests=len(requests),
        throttled=fake.throttled - throttled_before,
        list_pages=len(pages),
        exports=len(fake.exports) - exports_before,
        sustained_per_s=sustained,
        gap_median_s=statistics.median(gaps) if gaps else None,
        gap_p95_s=_quantile(gaps, 0.95),
        gap_max_s=max(gaps) if gaps else None,
        first_page_s=pages[0] - launched if pages else None,
        after_last_page_s=ended - pages[-1] if pages else None,
        fake_busy_s=round(sum(v[0] for v in fake.busy.values()), 3),
        fake_busy=busy,
        load_before=load_before,
        load_after=load_after,
        log_dir=os.path.relpath(folder, ROOT),
    )
    (folder / "run.json").write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n")
    return result


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def describe(run: Run) -> str:
    check = "ok" if run.ok else f"FAILED (exit {run.exit_code}, status {run.status})"
    where = (
        "list API"
        if run.in_flight is None
        else f"exports x{run.in_flight} in flight ({run.exports} exports)"
    )
    sustained = f", sustained {run.sustained_per_s:.1f}/s" if run.sustained_per_s else ""
    return (
        f"  {run.part:<8} {run.mode:<4} n={run.n:<7} {where}: {run.wall_s:8.1f} s, "
        f"{run.per_s:7.1f} records/s{sustained}, {run.requests} requests, "
        f"{run.throttled} x 429, fake busy {run.fake_busy_s:.1f} s, rows {run.rows}: {check} "
        f"(load {run.load_before:.2f} -> {run.load_after:.2f})"
    )


# --- the parts --------------------------------------------------------------------------


def steady(mode: str, n: int, args: argparse.Namespace, work: Path) -> Run:
    """One first read through the list API, the fake seeded with ``n`` customers."""
    fake = BenchFake(
        mode=mode,
        latency=args.latency,
        seed=args.seed,
        export_fixed=args.export_fixed,
        export_per_record=args.export_per_record,
    )
    fake.seed_customers(n, seed=args.seed)
    # Generous but finite: three times the time at the ceiling, plus start-up.
    timeout = 3 * n / ceiling(mode) + 300
    with fake:
        return run_sync(
            fake,
            work / f"steady-{mode}-n{n}",
            part="steady",
            n=n,
            threshold=0,
            size=args.export_size,
            in_flight=None,
            timeout=timeout,
        )


def backfill(args: argparse.Namespace, work: Path) -> list[Run]:
    """Full reads of ``args.backfill`` customers through exports, one per in-flight count,
    from one seeded fake (its rate-limit windows emptied between runs, as a run that
    starts a minute after the last would find them)."""
    n = args.backfill
    fake = BenchFake(
        mode=args.backfill_mode,
        latency=args.latency,
        seed=args.seed,
        export_fixed=args.export_fixed,
        export_per_record=args.export_per_record,
    )
    started = time.perf_counter()
    fake.seed_customers(n, seed=args.seed)
    print(f"bench: seeded {n:,} customers in {time.perf_counter() - started:.1f} s", flush=True)
    runs = []
    with fake:
        for in_flight in args.in_flight:
            fake.reset_rate_limits()
            run = run_sync(
                fake,
                work / f"backfill-{args.backfill_mode}-n{n}-x{in_flight}",
                part="backfill",
                n=n,
                threshold=min(args.export_threshold, n - 1),
                size=args.export_size,
                in_flight=in_flight,
                timeout=args.timeout,
            )
            print(describe(run), flush=True)
            runs.append(run)
    return runs


# --- reporting --------------------------------------------------------------------------


def _f(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None or value != value else format(value, fmt)


def steady_table(runs: Sequence[Run]) -> list[str]:
    lines = [
        "| mode | N | wall | records/s end to end | sustained records/s | ceiling "
        "| sustained ÷ ceiling | end to end ÷ ceiling | requests | requests/s | 429s "
        "| exit | table |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| --- |",
    ]
    for run in runs:
        top = ceiling(run.mode)
        sustained = run.sustained_per_s
        lines.append(
            f"| {run.mode} | {run.n:,} | {run.wall_s:.1f} s | {run.per_s:.1f} "
            f"| {_f(sustained)} | {top:.1f} "
            f"| {_f(sustained / top if sustained else None, '.1%')} "
            f"| {run.per_s / top:.1%} | {run.requests} | {run.requests_per_s:.2f} "
            f"| {run.throttled} | {run.exit_code} | {run.rows:,} rows, {run.ids:,} ids |"
        )
    return lines


def profile_table(runs: Sequence[Run]) -> list[str]:
    lines = [
        "| mode | Pacer's planned rate | list pages | gap between pages: median / p95 / max "
        "| planned gap | start to first page | last page to end | fake's own time per page "
        "| process peak RSS |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        rate, margin = planned_rate(run.mode)
        page_busy = run.fake_busy.get("list page", [0.0, 0])
        per_page = page_busy[0] / page_busy[1] if page_busy[1] else None
        lines.append(
            f"| {run.mode} | {rate:.1f}/s ({rate / ceiling(run.mode):.1%} of the ceiling, "
            f"margin {margin:g}) | {run.list_pages} "
            f"| {_f(run.gap_median_s, '.3f')} / {_f(run.gap_p95_s, '.3f')} / "
            f"{_f(run.gap_max_s, '.3f')} s | {PAGE / rate:.3f} s "
            f"| {_f(run.first_page_s)} s | {_f(run.after_last_page_s)} s "
            f"| {_f(per_page * 1000 if per_page else None, '.0f')} ms "
            f"| {run.peak_rss_mb:.0f} MB |"
        )
    return lines


def list_rate(steady_runs: Sequence[Run], mode: str) -> Run | None:
    return next((r for r in steady_runs if r.mode == mode and r.ok and r.sustained_per_s), None)


def backfill_table(runs: Sequence[Run], steady_runs: Sequence[Run], mode: str) -> list[str]:
    lines = [
        "| how | N | wall | records/s | list API's time ÷ this | requests | 429s | exports "
        "| fake's own time (share of wall) | peak RSS | exit | table |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    base = list_rate(steady_runs, mode)
    n = runs[0].n if runs else 0
    list_time = n / base.sustained_per_s if base and base.sustained_per_s else None
    for run in runs:
        lines.append(
            f"| Exports, {run.in_flight} in flight, {run.mode} | {run.n:,} | {run.wall_s:.1f} s "
            f"| {run.per_s:,.0f} | {_f(list_time / run.wall_s if list_time else None, '.1f')}x "
            f"| {run.requests} | {run.throttled} | {run.exports} | {run.fake_busy_s:.1f} s "
            f"({run.fake_busy_s / run.wall_s:.0%}) "
            f"| {run.peak_rss_mb:.0f} MB | {run.exit_code} | {run.rows:,} rows, {run.ids:,} ids |"
        )
    if base and base.sustained_per_s and list_time:
        lines.append(
            f"| list API, {mode}: **computed**, not run | {n:,} "
            f"| {list_time:,.0f} s ({list_time / 60:.0f} min) | {base.sustained_per_s:.1f} "
            f"| 1.0x | {math.ceil(n / PAGE) + 2:,} (at least) | - | - | - | - | - | - |"
        )
    return lines


def goals(
    steady_runs: Sequence[Run], backfill_runs: Sequence[Run], mode: str
) -> list[tuple[str, str, str]]:
    rows = []

    def verdict(met: bool | None) -> str:
        return "not measured" if met is None else ("**met**" if met else "**missed**")

    for wanted in MODES:
        label = (
            f"steady list read, {wanted}: ≥ 90% of the sustained ceiling "
            f"({ceiling(wanted):.1f}/s), no 429"
        )
        run = next((r for r in steady_runs if r.mode == wanted), None)
        if run is None:
            rows.append((label, "not run", verdict(None)))
            continue
        if not run.ok or not run.sustained_per_s:
            rows.append((label, f"run failed (exit {run.exit_code})", verdict(False)))
            continue
        fraction = run.sustained_per_s / ceiling(wanted)
        rows.append(
            (
                label,
                f"{fraction:.1%} sustained ({run.sustained_per_s:.1f}/s), "
                f"{run.per_s / ceiling(wanted):.1%} end to end ({run.per_s:.1f}/s), "
                f"{run.throttled} x 429",
                verdict(fraction >= GOAL_FRACTION and run.throttled == 0),
            )
        )
    base = list_rate(steady_runs, mode)
    several = [r for r in backfill_runs if (r.in_flight or 0) > 1]
    label = (
        "Exports backfill, several exports in flight, measured against the list API "
        "on the same fake"
    )
    if not several:
        rows.append((label, "not run", verdict(None)))
    else:
        run = several[0]
        if not run.ok:
            rows.append((label, f"run failed (exit {run.exit_code})", verdict(False)))
        elif base is None or not base.sustained_per_s:
            rows.append((label, f"{run.wall_s:.0f} s; no list rate to compare", verdict(None)))
        else:
            list_time = run.n / base.sustained_per_s
            rows.append(
                (
                    label,
                    f"{run.n:,} in {run.wall_s:.0f} s with {run.in_flight} in flight "
                    f"({run.per_s:,.0f}/s), {run.throttled} x 429; the list API "
                    f"{list_time / 60:.0f} min (computed): {list_time / run.wall_s:.1f}x faster",
                    verdict(run.throttled == 0 and run.wall_s < list_time),
                )
            )
    return rows


def versions() -> dict[str, str]:
    import custsync

    out = {"python": platform.python_version(), "custsync": custsync.__version__}
    for name in ("httpx", "tenacity", "orjson", "pydantic", "sqlalchemy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["sqlite"] = sqlite3.sqlite_version
    return out


def write_report(
    path: Path,
    *,
    steady_runs: Sequence[Run],
    backfill_runs: Sequence[Run],
    args: argparse.Namespace,
    info: dict[str, Any],
) -> None:
    loads = [x for r in (*steady_runs, *backfill_runs) for x in (r.load_before, r.load_after)]
    lines = [
        "# Extraction from Commerce Layer: results (issue 3)",
        "",
        f"Written by `bench/extract.py` on {info['finished']} "
        f"(the run took {info['elapsed_min']:.1f} min).",
        'How to reproduce: see [bench/README.md](README.md), section "Extraction (issue 3)".',
        "",
        "## Command",
        "",
        "```",
        info["command"],
        "```",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in info["machine"].items()),
        f"- 1-minute load average before and after each run: "
        f"{', '.join(f'{x:.2f}' for x in loads) or '-'} (median "
        f"{statistics.median(loads) if loads else float('nan'):.2f}); the fake API runs in "
        "the benchmark's own process on the same cores, and other work on the machine "
        "skews the figures",
        "",
        "## Versions",
        "",
        *(f"- {k}: {v}" for k, v in info["versions"].items()),
        f"- code measured: {info['source_start']}"
        + (
            ""
            if info["source_start"] == info["source_end"]
            else f" at the start, {info['source_end']} at the end (the code changed during the run)"
        ),
        "",
        "## Set-up",
        "",
        f"- The fake: `tests/fakes/commercelayer.py` on 127.0.0.1, {args.latency * 1000:.0f} ms "
        "added to every request (token, list, export, attachment), its real rate limits "
        "(sliding windows, `rate_limit_scale` 1): reads 200/min and 50 per 10 s live, "
        "100/min and 25 per 10 s test. Customers from `custsync._fake.make_customers` "
        f"(seed {args.seed}; a quarter share one `updated_at`).",
        "- The job: the `commercelayer` source (mode not set: the client learns it from the "
        "records and paces to its documented limits), the `flat_customer` preset, a new "
        "SQLite file per run, `batch_size` 1,000 (the default); `custsync sync JOB --json`, "
        "wall time and peak RSS of the whole process (start-up and token included).",
        "- Sustained rate: 25 x (list pages - 2) ÷ (arrival of the last page - arrival of "
        "the second) at the fake; the first page goes out before the client has learnt the "
        "mode, at the stricter test pacing. End to end: N ÷ the process's wall time.",
        f"- Exports: each completes {args.export_fixed:g} s + "
        f"{args.export_per_record * 1000:g} ms a record after it is created "
        f"({args.export_fixed + args.export_per_record * args.export_size:g} s for "
        f"{args.export_size:,}), pending for the first {args.export_fixed / 2:g} s; "
        f"`export_size` {args.export_size:,}, `export_threshold` "
        f"{min(args.export_threshold, max(args.backfill - 1, 0)):,}; the attachment is "
        "gzipped JSON, downloaded with the same 100 ms latency.",
        "- The fake's own time: what it spends answering with its lock held (it filters "
        "and sorts every customer on each list request and each export, which the real "
        "API does with indexes); it runs in the benchmark's process, on the same two cores "
        "as custsync.",
        "",
        "## Goals (issue 3)",
        "",
        "| goal | measured | verdict |",
        "| --- | --- | --- |",
        *(
            f"| {g} | {m} | {v} |"
            for g, m, v in goals(steady_runs, backfill_runs, args.backfill_mode)
        ),
        "",
    ]
    if steady_runs:
        lines += [
            "## Steady runs through the list API",
            "",
            "A first read with `export_threshold = 0`. The ceiling is 25 records x the "
            "per-minute read limit ÷ 60.",
            "",
            *steady_table(steady_runs),
            "",
            "Where the time goes: the client's Pacer spaces requests evenly at its planned "
            "rate (each limit x its margin); a gap longer than the planned one is time the "
            "client was not ready to send (a batch being written, a slow answer).",
            "",
            *profile_table(steady_runs),
            "",
        ]
    if backfill_runs:
        lines += [
            f"## Backfill of {args.backfill:,} through the Exports API",
            "",
            "A first read over `export_threshold`: id ranges of "
            f"{args.export_size:,} found by one list request each, exports created, polled "
            "and downloaded a few at once, records fed to the same pipeline into SQLite. "
            "The list API's row is **computed** from the sustained rate the steady "
            f"{args.backfill_mode} run measured (N ÷ that rate), not run. On the fake "
            f"seeded with {args.backfill:,}, every list request also costs the fake a scan "
            f"of all of them ({_probe_cost(backfill_runs)} a request here, the range probes' "
            "figure), which would hold a list read on this fake far below the limit; the "
            "computed figure leaves that out, in the list API's favour.",
            "",
            *backfill_table(backfill_runs, steady_runs, args.backfill_mode),
            "",
            "The fake's own time by request class (seconds, requests):",
            "",
            "| run | " + " | ".join(_busy_classes(backfill_runs)) + " |",
            "| --- | " + " | ".join("---:" for _ in _busy_classes(backfill_runs)) + " |",
            *(
                f"| {r.in_flight} in flight | "
                + " | ".join(
                    f"{r.fake_busy.get(c, [0.0, 0])[0]:.1f} s / {r.fake_busy.get(c, [0, 0])[1]}"
                    for c in _busy_classes(backfill_runs)
                )
                + " |"
                for r in backfill_runs
            ),
            "",
            "The fake builds an export's file (a scan, a sort and gzip of its records) in "
            "whichever request first finds it due: a poll, or the creation of another "
            "export, which looks at all of them; so with several in flight that work shows "
            "under `export create`.",
            "",
        ]
    notes = reading_notes(steady_runs, backfill_runs)
    if notes:
        lines += ["## Reading the numbers", "", *notes, ""]
    lines += [f"Raw measurements: `{info['log']}` (one `run.json` and the logs per run).", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def reading_notes(steady_runs: Sequence[Run], backfill_runs: Sequence[Run]) -> list[str]:
    """What the figures say about where the time went, from the figures themselves."""
    notes = []
    for run in steady_runs:
        if not run.ok or not run.sustained_per_s:
            continue
        rate, margin = planned_rate(run.mode)
        top = ceiling(run.mode)
        who = (
            "so the pacing, not the client's own work, sets the rate"
            if run.sustained_per_s >= 0.98 * rate
            else "so the client fell short of its own plan: it was not ready to send on time"
        )
        notes.append(
            f"- Steady, {run.mode}: the client's Pacer plans {rate:.1f}/s, {rate / top:.1%} "
            f"of the ceiling (each limit x {margin:g}); the fake saw "
            f"{run.sustained_per_s:.1f}/s ({run.sustained_per_s / rate:.1%} of the plan), "
            f"{who} (the slowest gap between pages was {_f(run.gap_max_s, '.3f')} s against "
            f"{PAGE / rate:.3f} s planned). End to end, {run.per_s / top:.1%}: start-up "
            f"(process, token, window probe) took {_f(run.first_page_s)} s before the "
            f"first page and {_f(run.after_last_page_s)} s followed the last one, "
            f"{_f((run.first_page_s or 0) + (run.after_last_page_s or 0))} s of "
            f"{run.wall_s:.1f} s."
        )
    bound = [r for r in backfill_runs if r.ok and r.fake_busy_s > 0.5 * r.wall_s]
    if bound:
        shares = ", ".join(
            f"{r.fake_busy_s / r.wall_s:.0%} with {r.in_flight} in flight" for r in bound
        )
        notes.append(
            f"- Backfill: the fake's own time was {shares} of the wall time. Its lock "
            "serialises that work (every list request and export scans all the customers), "
            "so there the backfill is bound by the fake, not by custsync or the export "
            "delay, and comparisons between in-flight counts measure the fake as much as "
            "custsync; the real API's exports take longer than this model's and its list "
            "requests do not scan."
        )
    return notes


def _probe_cost(runs: Sequence[Run]) -> str:
    seconds = sum(r.fake_busy.get("list probe", [0.0, 0])[0] for r in runs)
    count = sum(r.fake_busy.get("list probe", [0.0, 0])[1] for r in runs)
    return f"{seconds / count * 1000:,.0f} ms" if count else "not measured"


def _busy_classes(runs: Sequence[Run]) -> list[str]:
    return sorted({name for r in runs for name in r.fake_busy})


# --- main -------------------------------------------------------------------------------


def parse_counts(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("comma-separated integers, e.g. 3,1,5") from None
    if not values or any(not 1 <= v <= 10 for v in values):
        raise argparse.ArgumentTypeError("exports in flight are between 1 and 10")
    return values


def parse_parts(text: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items or any(item not in PARTS for item in items):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(PARTS)}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--live", type=int, default=8_000, help="customers, steady live run")
    parser.add_argument("--test", type=int, default=4_000, help="customers, steady test run")
    parser.add_argument("--backfill", type=int, default=200_000, help="customers to backfill")
    parser.add_argument("--backfill-mode", choices=MODES, default="live")
    parser.add_argument(
        "--in-flight",
        type=parse_counts,
        default=[3, 1, 5],
        help="exports at once, one backfill each; the first is the one judged (default 3,1,5)",
    )
    parser.add_argument("--export-size", type=int, default=5_000)
    parser.add_argument("--export-threshold", type=int, default=10_000)
    parser.add_argument("--export-fixed", type=float, default=2.0, help="seconds an export takes")
    parser.add_argument(
        "--export-per-record", type=float, default=0.0001, help="and seconds more a record"
    )
    parser.add_argument("--latency", type=float, default=0.1, help="seconds added a request")
    parser.add_argument("--parts", type=parse_parts, default=list(PARTS))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per backfill run")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke pass: --live 1000 --test 500 --backfill 20000 --in-flight 3",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="default: bench/EXTRACT.md (bench/out/EXTRACT-quick.md with --quick)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.live, args.test, args.backfill, args.in_flight = 1_000, 500, 20_000, [3]
    if min(args.live, args.test, args.backfill) < 1:
        parser.error("sizes must be positive")
    if not 1 <= args.export_size <= 10_000:
        parser.error("--export-size must be between 1 and 10,000 (the API's maximum)")
    results_path = args.results or (
        OUT / "EXTRACT-quick.md" if args.quick else BENCH / "EXTRACT.md"
    )
    if not CUSTSYNC.exists():
        print(f"bench: {CUSTSYNC} is missing: run `make venv`", file=sys.stderr)
        return 2

    started = time.perf_counter()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    work = OUT / "extract" / stamp
    work.mkdir(parents=True, exist_ok=True)
    command_line = shlex.join(
        [".venv/bin/python", "bench/extract.py", *(sys.argv[1:] if argv is None else argv)]
    )
    print(f"bench: {command_line}\nbench: logs and raw measurements under {work}", flush=True)
    source_start = source_state()

    steady_runs: list[Run] = []
    if "steady" in args.parts:
        for mode, n in (("live", args.live), ("test", args.test)):
            run = steady(mode, n, args, work)
            print(describe(run), flush=True)
            steady_runs.append(run)
    backfill_runs = backfill(args, work) if "backfill" in args.parts else []

    print()
    if steady_runs:
        print("\n".join(steady_table(steady_runs)))
        print()
        print("\n".join(profile_table(steady_runs)))
        print()
    if backfill_runs:
        print("\n".join(backfill_table(backfill_runs, steady_runs, args.backfill_mode)))
        print()
    for goal, measured, verdict in goals(steady_runs, backfill_runs, args.backfill_mode):
        print(f"goal: {goal}: {measured}: {verdict.strip('*')}")
    info = {
        "command": command_line,
        "machine": machine(),
        "versions": versions(),
        "source_start": source_start,
        "source_end": source_state(),
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_min": (time.perf_counter() - started) / 60,
        "log": os.path.relpath(work, ROOT),
    }
    write_report(
        results_path,
        steady_runs=steady_runs,
        backfill_runs=backfill_runs,
        args=args,
        info=info,
    )
    print(f"bench: wrote {os.path.relpath(results_path, Path.cwd())}")
    return 0 if all(r.ok for r in (*steady_runs, *backfill_runs)) else 1


if __name__ == "__main__":
    sys.exit(main())
