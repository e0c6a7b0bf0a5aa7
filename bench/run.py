"""custsync against dlt and a hand-written script, on the same input files and the same
databases: initial load, incremental run with 10% changed, no-op run; wall time and peak
RSS of each tool as a whole process. Prints a table and writes bench/RESULTS.md.

    .venv/bin/python bench/run.py [--sizes 100000,1000000] [--repeat 3]
        [--targets sqlite,postgresql] [--tools custsync,dlt,naive] [--quick] [--no-trap]

Each repetition starts every tool from nothing (a new SQLite file, or a dropped and
re-created PostgreSQL schema; a new state or pipelines folder) and runs the three
scenarios in order; after each, the table is checked (row count, distinct ids, sum of
``total_orders_count``). Every run is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import generate
import sqlalchemy as sa

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
CUSTSYNC = ROOT / ".venv" / "bin" / "custsync"
PYTHON = Path(sys.executable)
DLT_PYTHON = BENCH / ".venv-dlt" / "bin" / "python"
DLT_SCRIPT = BENCH / "competitors" / "dlt_pipeline.py"
NAIVE_SCRIPT = BENCH / "competitors" / "naive.py"
VALIDATE_SCRIPT = BENCH / "validate.py"
MEASURE_SCRIPT = BENCH / "_measure.py"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"

TOOLS = ("custsync", "dlt", "naive")
TARGETS = ("sqlite", "postgresql")
SCENARIOS = ("initial", "incremental", "noop")
SCENARIO_TITLES = {
    "initial": "initial load",
    "incremental": "incremental, 10% changed",
    "noop": "no-op (nothing changed)",
}
TARGET_TITLES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
TABLE = "customers"

# The figures issue 4 sets (see the "goals" section of RESULTS.md).
GOAL_INITIAL_VS_DLT = 5.0
GOAL_INCREMENTAL_VS_DLT = 3.0
GOAL_NOOP_FRACTION = 0.10
GOAL_RSS_MB = 300.0
GOAL_RSS_GROWTH = 1.5
GOAL_VALIDATE_PER_S = 200_000


# --- measuring one process -------------------------------------------------------------


@dataclasses.dataclass
class Measurement:
    target: str
    tool: str  # custsync | dlt | naive | dlt-trap
    n: int
    rep: int
    scenario: str
    wall_s: float
    peak_rss_mb: float
    exit_code: int
    ok: bool
    check: str  # what the table check found, or why the run failed
    load_before: float  # 1-minute load average as the run started: others' work skews us
    summary: dict[str, Any]


def run_process(
    cmd: Sequence[str], *, cwd: Path, log_stem: Path, timeout: float, env: dict[str, str]
) -> tuple[float, float, int, str]:
    """Run ``cmd`` to its end; return wall seconds, its peak RSS in MB, its exit code and
    its standard output. ``_measure.py`` forks it and reads ``ru_maxrss`` from
    ``os.wait4`` (forked from this large process, the child would report our peak too),
    or the sum of its processes' peaks when it runs in several."""
    stdout_path = log_stem.with_suffix(".stdout")
    stderr_path = log_stem.with_suffix(".stderr")
    result_path = log_stem.with_suffix(".measure.json")
    result_path.unlink(missing_ok=True)
    (log_stem.parent / (log_stem.name + ".cmd")).write_text(shlex.join(cmd) + "\n")
    launcher = [str(PYTHON), "-I", "-S", str(MEASURE_SCRIPT), str(result_path), "--", *cmd]
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            launcher, cwd=cwd, stdout=out, stderr=err, env=env, start_new_session=True
        )
        timer = threading.Timer(timeout, _kill_group, args=(proc.pid,))
        timer.start()
        try:
            code = proc.wait()
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
    stdout = stdout_path.read_text(errors="replace")
    try:
        measured = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        with stderr_path.open("a") as err_text:
            if wall >= timeout:
                err_text.write(f"\nbench: killed after the {timeout:.0f} s timeout\n")
            else:
                err_text.write("\nbench: the measuring process left no result\n")
        return wall, float("nan"), code if code else -1, stdout
    return measured["wall_s"], measured["maxrss_kb"] / 1024.0, measured["exit_code"], stdout


def _kill_group(pid: int) -> None:
    # The child leads its own session (start_new_session), so this reaches only it and
    # what it started.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def last_json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    return {}


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


# --- targets ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Place:
    """Where one tool writes in one repetition, and how each side names it."""

    target: str
    tool: str
    run_dir: Path
    pg_url: str

    @property
    def schema(self) -> str | None:
        return None if self.target == "sqlite" else f"bench_{self.tool.replace('-', '_')}"

    @property
    def sqlite_file(self) -> Path:
        return self.run_dir / f"{self.tool}.db"

    def url_for(self, tool: str) -> str:
        """The URL as the tool is given it (SQLAlchemy 2.1's default PostgreSQL driver is
        psycopg 3; each side names it explicitly so its default never matters)."""
        if self.target == "sqlite":
            return f"sqlite:///{self.sqlite_file}"
        if tool == "custsync":
            return self.pg_url
        return self.pg_url.replace("postgresql://", "postgresql+psycopg://", 1)

    def check_engine(self) -> sa.Engine:
        if self.target == "sqlite":
            return sa.create_engine(f"sqlite:///{self.sqlite_file}")
        return sa.create_engine(self.pg_url.replace("postgresql://", "postgresql+psycopg://", 1))

    def qualified(self) -> str:
        return f"{self.schema}.{TABLE}" if self.schema else TABLE

    def reset(self) -> None:
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True)
        if self.target == "postgresql":
            drop_schemas(self.pg_url, [self.schema or "", f"{self.schema}_staging"])
            if not self.tool.startswith("dlt"):  # dlt creates its dataset itself
                with _pg_engine(self.pg_url).begin() as connection:
                    connection.execute(sa.text(f"CREATE SCHEMA {self.schema}"))

    def cleanup(self, *, keep: bool) -> None:
        if keep:
            return
        for path in self.run_dir.glob("*.db*"):
            path.unlink()
        if self.target == "postgresql":
            drop_schemas(self.pg_url, [self.schema or "", f"{self.schema}_staging"])


def _pg_engine(url: str) -> sa.Engine:
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def drop_schemas(url: str, schemas: Iterable[str]) -> None:
    engine = _pg_engine(url)
    with engine.begin() as connection:
        for schema in schemas:
            if schema:
                connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    engine.dispose()


def check_table(place: Place, *, n: int, orders: int) -> tuple[bool, str]:
    engine = place.check_engine()
    try:
        with engine.connect() as connection:
            rows, ids, total = connection.execute(
                sa.text(
                    f"SELECT count(*), count(DISTINCT id), sum(total_orders_count) "
                    f"FROM {place.qualified()}"
                )
            ).one()
    except sa.exc.SQLAlchemyError as exc:
        return False, f"check failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    finally:
        engine.dispose()
    found = f"rows={rows} ids={ids} orders={total}"
    ok = rows == n and ids == n and int(total or 0) == orders
    return ok, found if ok else f"{found}, expected rows={n} orders={orders}"


# --- the tools -------------------------------------------------------------------------


def custsync_job(place: Place, input_path: str, batch_size: int | None) -> Path:
    target = [
        'connector = "sql"',
        f"url = {json.dumps(place.url_for('custsync'))}",
        f'table = "{TABLE}"',
        'key = "id"',
    ]
    if place.schema:
        target.append(f'schema = "{place.schema}"')
    lines = [
        'name = "bench"',
        "",
        "[source]",
        'connector = "file"',
        f"path = {json.dumps(input_path)}",
        "",
        "[target]",
        *target,
        "",
        "[mapping]",
        'preset = "flat_customer"',
    ]
    if batch_size:
        lines += ["", "[sync]", f"batch_size = {batch_size}"]
    job = place.run_dir / "job.toml"
    job.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return job


def command(place: Place, input_path: str, args: argparse.Namespace) -> list[str]:
    if place.tool == "custsync":
        job = custsync_job(place, input_path, args.custsync_batch_size)
        return [str(CUSTSYNC), "sync", str(job), "--json"]
    if place.tool in ("dlt", "dlt-trap"):
        cmd = [
            str(DLT_PYTHON),
            str(DLT_SCRIPT),
            input_path,
            place.url_for("dlt"),
            TABLE,
            str(place.run_dir / "pipelines"),
            "--dataset",
            place.schema or "main",
        ]
        return [*cmd, "--trap"] if place.tool == "dlt-trap" else cmd
    if place.tool == "naive":
        cmd = [str(PYTHON), str(NAIVE_SCRIPT), input_path, place.url_for("naive"), TABLE]
        return [*cmd, "--schema", place.schema] if place.schema else cmd
    raise ValueError(place.tool)


def run_sequence(
    place: Place, dataset: generate.Dataset, rep: int, args: argparse.Namespace, log: Path
) -> list[Measurement]:
    """The three scenarios in order, from an empty table: one repetition of one tool."""
    place.reset()
    out: list[Measurement] = []
    inputs = {
        "initial": (dataset.initial, dataset.orders_initial),
        "incremental": (dataset.changed, dataset.orders_changed),
        "noop": (dataset.changed, dataset.orders_changed),
    }
    timeout = args.trap_timeout if place.tool == "dlt-trap" else args.timeout
    for scenario in SCENARIOS:
        input_path, orders = inputs[scenario]
        cmd = command(place, input_path, args)
        load = load_average()
        wall, rss, code, stdout = run_process(
            cmd,
            cwd=place.run_dir,
            log_stem=place.run_dir / scenario,
            timeout=timeout,
            env=child_env(),
        )
        summary = last_json_line(stdout)
        if code != 0:
            ok, check = False, f"exit {code} (see {place.run_dir / scenario}.stderr)"
        elif place.tool == "custsync" and summary.get("status") != "ok":
            ok, check = False, f"status {summary.get('status')}"
        else:
            ok, check = check_table(place, n=dataset.n, orders=orders)
        m = Measurement(
            target=place.target,
            tool=place.tool,
            n=dataset.n,
            rep=rep,
            scenario=scenario,
            wall_s=round(wall, 4),
            peak_rss_mb=round(rss, 1),
            exit_code=code,
            ok=ok,
            check=check,
            load_before=load,
            summary=summary,
        )
        out.append(m)
        with log.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(dataclasses.asdict(m)) + "\n")
        print(
            f"  {place.target:<10} {place.tool:<9} n={dataset.n:<8} rep {rep} {scenario:<11} "
            f"{wall:8.2f} s {rss:7.0f} MB  {'ok' if ok else 'FAILED'}: {check}  "
            f"(load {load:.2f})",
            flush=True,
        )
        if not ok:
            break  # the next scenario needs this one's result
    place.cleanup(keep=args.keep)
    return out


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Each child is measured as a user would run it; nothing from this process leaks in.
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    env["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    return env


# --- summarising -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Figure:
    runs: int
    failed: int
    wall: float  # median
    wall_min: float
    wall_max: float
    rss: float  # median
    rss_max: float


def figure(
    measurements: list[Measurement], target: str, tool: str, n: int, scenario: str
) -> Figure | None:
    chosen = [
        m
        for m in measurements
        if (m.target, m.tool, m.n, m.scenario) == (target, tool, n, scenario)
    ]
    good = [m for m in chosen if m.ok]
    if not good:
        return Figure(len(chosen), len(chosen), float("nan"), 0, 0, 0, 0) if chosen else None
    walls = [m.wall_s for m in good]
    rss = [m.peak_rss_mb for m in good]
    return Figure(
        runs=len(chosen),
        failed=len(chosen) - len(good),
        wall=statistics.median(walls),
        wall_min=min(walls),
        wall_max=max(walls),
        rss=statistics.median(rss),
        rss_max=max(rss),
    )


def _ok(f: Figure | None) -> bool:
    return f is not None and f.failed < f.runs


def results_table(measurements: list[Measurement], tools: Sequence[str]) -> list[str]:
    """Markdown tables, one per target and size."""
    lines: list[str] = []
    keys = sorted(
        {(m.target, m.n) for m in measurements}, key=lambda k: (TARGETS.index(k[0]), k[1])
    )
    for target, n in keys:
        present = [
            t
            for t in tools
            if any(m.tool == t and m.target == target and m.n == n for m in measurements)
        ]
        lines.append(f"### {TARGET_TITLES[target]}, N = {n:,}")
        lines.append("")
        lines.append(
            "| scenario | tool | records/s | wall, median (min-max) | peak RSS "
            "| time ÷ custsync's | runs |"
        )
        lines.append("| --- | --- | ---: | --- | ---: | ---: | ---: |")
        for scenario in SCENARIOS:
            base = figure(measurements, target, "custsync", n, scenario)
            for tool in present:
                f = figure(measurements, target, tool, n, scenario)
                if f is None:
                    continue
                if not _ok(f):
                    lines.append(
                        f"| {SCENARIO_TITLES[scenario]} | {tool} | - | failed | - | - | {f.runs} |"
                    )
                    continue
                ratio = f"{f.wall / base.wall:.2f}x" if base is not None and _ok(base) else "-"
                runs = f"{f.runs}" + (f" ({f.failed} failed)" if f.failed else "")
                lines.append(
                    f"| {SCENARIO_TITLES[scenario]} | {tool} | {n / f.wall:,.0f} | "
                    f"{f.wall:.2f} s ({f.wall_min:.2f}-{f.wall_max:.2f}) | {f.rss:.0f} MB | "
                    f"{ratio} | {runs} |"
                )
        lines.append("")
    return lines


def _peak_rss(measurements: list[Measurement], target: str, n: int) -> float | None:
    """custsync's highest peak RSS over the three scenarios at size n."""
    figures = [figure(measurements, target, "custsync", n, s) for s in SCENARIOS]
    peaks = [f.rss_max for f in figures if f is not None and _ok(f)]
    return max(peaks) if peaks else None


def goals(
    measurements: list[Measurement], sizes: Sequence[int], validation: dict[str, Any] | None
) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) rows; a goal stated at a size this run did not measure is
    judged at the nearest size measured, and says so."""
    rows: list[tuple[str, str, str]] = []
    targets = [t for t in TARGETS if any(m.target == t for m in measurements)]

    def at(goal_n: int) -> tuple[int, str]:
        if goal_n in sizes:
            return goal_n, ""
        nearest = min(sizes, key=lambda s: abs(s - goal_n))
        return nearest, f" (at N = {nearest:,}: N = {goal_n:,} not run)"

    def verdict(met: bool | None) -> str:
        return "not measured" if met is None else ("**met**" if met else "**missed**")

    n, note = at(100_000)
    for target in targets:
        cs = figure(measurements, target, "custsync", n, "initial")
        dl = figure(measurements, target, "dlt", n, "initial")
        nv = figure(measurements, target, "naive", n, "initial")
        if _ok(cs) and _ok(dl):
            ratio = dl.wall / cs.wall
            rows.append(
                (
                    f"initial load of 100,000 into {TARGET_TITLES[target]}: ≥ 5x dlt's throughput",
                    f"{ratio:.2f}x ({cs.wall:.2f} s vs {dl.wall:.2f} s){note}",
                    verdict(ratio >= GOAL_INITIAL_VS_DLT),
                )
            )
        if _ok(cs) and _ok(nv):
            rows.append(
                (
                    f"initial load of 100,000 into {TARGET_TITLES[target]}: "
                    "faster than the naive script",
                    f"{cs.wall:.2f} s vs {nv.wall:.2f} s ({nv.wall / cs.wall:.2f}x){note}",
                    verdict(cs.wall < nv.wall),
                )
            )
    for target in targets:
        for size in sizes:
            cs = figure(measurements, target, "custsync", size, "incremental")
            dl = figure(measurements, target, "dlt", size, "incremental")
            if _ok(cs) and _ok(dl):
                ratio = dl.wall / cs.wall
                rows.append(
                    (
                        f"incremental, 10% changed, {TARGET_TITLES[target]}, N = {size:,}: "
                        "≥ 3x faster than dlt",
                        f"{ratio:.2f}x ({cs.wall:.2f} s vs {dl.wall:.2f} s)",
                        verdict(ratio >= GOAL_INCREMENTAL_VS_DLT),
                    )
                )
    for target in targets:
        for size in sizes:
            noop = figure(measurements, target, "custsync", size, "noop")
            initial = figure(measurements, target, "custsync", size, "initial")
            if _ok(noop) and _ok(initial):
                fraction = noop.wall / initial.wall
                rows.append(
                    (
                        f"no-op run, {TARGET_TITLES[target]}, N = {size:,}: "
                        "< 10% of the initial load's wall time",
                        f"{fraction:.1%} ({noop.wall:.2f} s vs {initial.wall:.2f} s)",
                        verdict(fraction < GOAL_NOOP_FRACTION),
                    )
                )
    if 1_000_000 in sizes and 100_000 in sizes:
        big, small, note = 1_000_000, 100_000, ""
    else:
        big, small = max(sizes), min(sizes)
        note = f" (at N = {big:,} vs {small:,}: the goal's sizes were not both run)"
    for target in targets:
        label = (
            f"peak RSS at 1,000,000, {TARGET_TITLES[target]}: < 300 MB "
            "and ≤ 1.5x the 100,000 figure"
        )
        big_rss = _peak_rss(measurements, target, big)
        small_rss = _peak_rss(measurements, target, small)
        if big_rss is None or small_rss is None or big == small:
            rows.append((label, "not measured in this run", verdict(None)))
            continue
        growth = big_rss / small_rss
        rows.append(
            (
                label,
                f"{big_rss:.0f} MB at {big:,}, {small_rss:.0f} MB at {small:,}: "
                f"{growth:.2f}x{note}",
                verdict(big_rss < GOAL_RSS_MB and growth <= GOAL_RSS_GROWTH),
            )
        )
    if validation:
        v = validation["validate"]
        rows.append(
            (
                "validation alone: ≥ 200,000 customers/s on one core",
                f"{v['median_per_s']:,.0f}/s (runs {v['min_per_s']:,.0f}-{v['max_per_s']:,.0f})",
                verdict(v["median_per_s"] >= GOAL_VALIDATE_PER_S),
            )
        )
    else:
        rows.append(
            ("validation alone: ≥ 200,000 customers/s on one core", "not run", verdict(None))
        )
    return rows


# --- the machine and the versions -------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "nproc": nproc or str(os.cpu_count()),
        "memory": memory,
        "cpu": cpu,
        "kernel": platform.release(),
    }


def versions(pg_url: str | None, with_dlt: bool) -> dict[str, str]:
    import pandas
    import pydantic

    import custsync

    out = {
        "python (custsync, naive)": platform.python_version(),
        "custsync": custsync.__version__,
        "sqlalchemy (custsync, naive)": sa.__version__,
        "pandas (naive)": pandas.__version__,
        "pydantic": pydantic.__version__,
        "sqlite (custsync, naive)": sqlite3.sqlite_version,
    }
    with contextlib.suppress(ImportError):
        import psycopg

        out["psycopg (custsync, naive)"] = psycopg.__version__
    if with_dlt and DLT_PYTHON.exists():
        probe = (
            "import json, platform, sqlite3, dlt, sqlalchemy, psycopg\n"
            "print(json.dumps({'python (dlt)': platform.python_version(), 'dlt': dlt.__version__,"
            " 'sqlalchemy (dlt)': sqlalchemy.__version__, 'psycopg (dlt)': psycopg.__version__,"
            " 'sqlite (dlt)': sqlite3.sqlite_version}))"
        )
        done = subprocess.run(
            [str(DLT_PYTHON), "-c", probe], capture_output=True, text=True, check=False, timeout=120
        )
        out.update(last_json_line(done.stdout) or {"dlt": f"probe failed: {done.stderr[-200:]}"})
    if pg_url:
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            engine = _pg_engine(pg_url)
            with engine.connect() as connection:
                out["postgresql server"] = str(
                    connection.execute(sa.text("SHOW server_version")).scalar()
                )
            engine.dispose()
    return out


def source_state() -> str:
    """The commit measured, and a digest of uncommitted changes under src/: the core is
    edited while benchmarks run, so a report says which code it measured."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=60
        )
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    diff = git("diff", "HEAD", "--", "src", "mappings", "connectors")
    if not diff:
        return head
    digest = hashlib.sha1(diff.encode()).hexdigest()[:10]
    return f"{head} + uncommitted changes (diff sha1 {digest})"


# --- the report ------------------------------------------------------------------------


def write_report(
    path: Path,
    *,
    measurements: list[Measurement],
    tools: Sequence[str],
    sizes: Sequence[int],
    validation: dict[str, Any] | None,
    info: dict[str, Any],
) -> None:
    runs = info["runs"]
    lines = [
        "# custsync benchmark results",
        "",
        f"Written by `bench/run.py` on {info['finished']}.",
        "How to reproduce: see [bench/README.md](README.md).",
        "",
        "## Command" + ("s" if len(runs) > 1 else ""),
        "",
    ]
    if len(runs) > 1:
        lines += [
            "Measurements from several runs; for each target, tool and size, those of the "
            "last run listed that measured it.",
            "",
        ]
    for run in runs:
        code = run["source_start"]
        if run["source_end"] != code:
            code += f" at the start, {run['source_end']} at the end (it changed during the run)"
        lines += [
            "```",
            run["command"],
            "```",
            "",
            f"- {run['finished']}, {run['elapsed_min']:.1f} min; code measured: {code}",
            f"- raw measurements: `{run['log']}` (one JSON object per run)",
            "",
        ]
    lines += [
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in info["machine"].items()),
        f"- 1-minute load average before each run: median {info['load_median']:.2f}, "
        f"max {info['load_max']:.2f} (other work on the machine skews the figures)",
        "",
        "## Versions",
        "",
        *(f"- {k}: {v}" for k, v in info["versions"].items()),
        "",
    ]
    lines += [
        "## Goals (issue 4)",
        "",
        "| goal | measured | verdict |",
        "| --- | --- | --- |",
        *(f"| {g} | {m} | {v} |" for g, m, v in goals(measurements, sizes, validation)),
        "",
        "## Results",
        "",
        "Wall time and peak RSS are those of the whole process (`ru_maxrss` from `wait4`), "
        "start-up included; a tool that runs in several processes (custsync forks a worker) "
        "is shown with the sum of each process's own peak, read from /proc while it runs, "
        "an upper bound (pages a fork shares count in each); records/s is N ÷ wall time "
        "for every scenario (each run reads the whole file of N customers). "
        "`time ÷ custsync's` above 1 means custsync was faster. Every run's table was "
        "checked afterwards: N rows, N distinct ids, and the "
        "expected sum of `total_orders_count`.",
        "",
        *results_table(measurements, [t for t in tools if t != "dlt-trap"]),
    ]
    trap = [m for m in measurements if m.tool == "dlt-trap"]
    if trap:
        lines += [
            "## The trap: dlt without its two settings",
            "",
            "dlt as a user first writes it: no primary key on the table "
            "(`create_primary_keys` left off: on SQLite the merge's `DELETE ... WHERE EXISTS` "
            "from the staging table then scans the table for every staged row, where "
            "PostgreSQL's planner hash-joins) and its own tie deduplication on "
            '(`dlt.sources.incremental("updated_at")` without `primary_key=()`). Reported, not '
            "compared against.",
            "",
            "| target | N | scenario | wall | peak RSS | vs dlt best | runs |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for target in TARGETS:
            for n in sorted({m.n for m in trap if m.target == target}):
                for scenario in SCENARIOS:
                    f = figure(measurements, target, "dlt-trap", n, scenario)
                    best = figure(measurements, target, "dlt", n, scenario)
                    if f is None:
                        continue
                    if not _ok(f):
                        lines.append(
                            f"| {TARGET_TITLES[target]} | {n:,} | {SCENARIO_TITLES[scenario]} "
                            f"| failed | - | - | {f.runs} |"
                        )
                        continue
                    ratio = f"{f.wall / best.wall:.1f}x" if best is not None and _ok(best) else "-"
                    lines.append(
                        f"| {TARGET_TITLES[target]} | {n:,} | {SCENARIO_TITLES[scenario]} | "
                        f"{f.wall:.2f} s | {f.rss:.0f} MB | {ratio} | {f.runs} |"
                    )
        lines.append("")
    if validation:
        v, p = validation["validate"], validation["parse_normalise_validate"]
        lines += [
            "## Validation micro-benchmark",
            "",
            f"`bench/validate.py`: {validation['records']:,} generated customers in batches "
            f"of {validation['batch']:,}, pinned to one core, {validation['rounds']} rounds "
            "(median, min-max). `validate_records` is the validation `custsync sync` runs "
            "(the Customer schema into plain dicts); `validate_batch` builds `Customer` "
            "models (the Python API).",
            "",
            "| what | customers/s | goal |",
            "| --- | ---: | ---: |",
            f"| validate_records (sync) | {v['median_per_s']:,.0f} "
            f"({v['min_per_s']:,.0f}-{v['max_per_s']:,.0f}) | {GOAL_VALIDATE_PER_S:,} |",
            *(
                [
                    f"| validate_batch (models) | {m['median_per_s']:,.0f} "
                    f"({m['min_per_s']:,.0f}-{m['max_per_s']:,.0f}) | - |"
                ]
                if (m := validation.get("validate_models"))
                else []
            ),
            f"| JSON parse + normalise + validate | {p['median_per_s']:,.0f} "
            f"({p['min_per_s']:,.0f}-{p['max_per_s']:,.0f}) | - |",
            "",
        ]
    lines += [
        "## What each tool does",
        "",
        "- **custsync**: `custsync sync job.toml --json` with the `flat_customer` preset "
        "(19 columns, key `id`; `metadata` one JSON column), default batch size, lookback "
        "and `parallel = true` (a forked worker process reads, validates and maps while the "
        "run writes), state in an SQLite file beside the job file.",
        "- **dlt** (`bench/competitors/dlt_pipeline.py`, its own venv): "
        '`write_disposition="merge"`, `primary_key="id"`, the sqlalchemy destination with '
        "`create_primary_keys=True`, `metadata` and `anonymization_info` as JSON columns with "
        '`max_table_nesting=0`, `dlt.sources.incremental("updated_at", primary_key=())`; rows '
        "are the resource's id, its attributes and `customer_group_id`, fed as lists of 1,000. "
        "PostgreSQL through psycopg 3 (SQLAlchemy 2.1's default driver; faster than psycopg2 "
        "here).",
        "- **naive** (`bench/competitors/naive.py`): the whole file into a pandas DataFrame, "
        "then `INSERT ... ON CONFLICT (id) DO UPDATE` through SQLAlchemy's executemany in "
        "chunks of 5,000, one transaction per chunk; no state, so every run writes every row.",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def print_table(measurements: list[Measurement], tools: Sequence[str]) -> None:
    for line in results_table(measurements, tools):
        print(line)


# --- main ------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    sizes = sorted({int(part.replace("_", "")) for part in text.split(",") if part.strip()})
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("sizes are positive integers, comma-separated")
    return sizes


def parse_list(allowed: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        items = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return items

    return parse


def parse_repeat_for(text: str) -> tuple[int, int]:
    size, _, count = text.partition("=")
    try:
        return int(size.replace("_", "")), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError("use N=R, e.g. 1000000=1") from None


def preflight(args: argparse.Namespace) -> list[str]:
    problems = []
    if "custsync" in args.tools and not CUSTSYNC.exists():
        problems.append(f"{CUSTSYNC} is missing: run `make venv`")
    if ("dlt" in args.tools or args.trap) and not DLT_PYTHON.exists():
        problems.append(
            f"{DLT_PYTHON} is missing: python3 -m venv bench/.venv-dlt && "
            "bench/.venv-dlt/bin/pip install -r bench/requirements-dlt.txt"
        )
    if "postgresql" in args.targets:
        try:
            engine = _pg_engine(args.pg_url)
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
            engine.dispose()
        except sa.exc.SQLAlchemyError as exc:
            problems.append(
                f"PostgreSQL at {args.pg_url} is unreachable: {str(exc).splitlines()[0]}"
            )
    return problems


def compile_custsync() -> None:
    """Byte-compile custsync as pip does when it installs a wheel. The checkout's editable
    install leaves that to the first import, which writes nothing where
    PYTHONDONTWRITEBYTECODE is set (it is on this kind of machine): every run would then
    compile custsync's own modules again, ~50 ms of start-up no installed copy pays. dlt
    and the script's libraries come from wheels, compiled at install."""
    import compileall

    import custsync

    compileall.compile_dir(Path(custsync.__file__).parent, quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=parse_sizes, default=[100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per size (median)")
    parser.add_argument(
        "--repeat-for",
        type=parse_repeat_for,
        action="append",
        default=[],
        metavar="N=R",
        help="a different repetition count for one size, e.g. 1000000=1",
    )
    parser.add_argument("--targets", type=parse_list(TARGETS), default=list(TARGETS))
    parser.add_argument("--tools", type=parse_list(TOOLS), default=list(TOOLS))
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke pass: --sizes 20000 --repeat 1"
    )
    parser.add_argument(
        "--trap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run dlt's first-try configuration once at the smallest size (default on)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--trap-timeout", type=float, default=1800.0, help="seconds per trap run")
    parser.add_argument("--custsync-batch-size", type=int, default=None)
    parser.add_argument(
        "--no-validate", action="store_true", help="skip the validation micro-benchmark"
    )
    parser.add_argument("--keep", action="store_true", help="keep databases after each repetition")
    parser.add_argument(
        "--report-from",
        type=lambda text: [Path(part) for part in text.split(",") if part.strip()],
        default=None,
        metavar="DIR[,DIR...]",
        help="run nothing: rebuild the report from earlier runs' folders under bench/out/runs",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="default: bench/RESULTS.md (bench/out/RESULTS-quick.md with --quick)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeat = [20_000], 1
    if not 1 <= args.repeat <= 50:
        parser.error("--repeat must be between 1 and 50")
    repeat_for = dict(args.repeat_for)
    if any(not 1 <= r <= 50 for r in repeat_for.values()):
        parser.error("--repeat-for counts must be between 1 and 50")
    results_path = args.results or (
        OUT / "RESULTS-quick.md" if args.quick else BENCH / "RESULTS.md"
    )
    if "dlt" not in args.tools:
        args.trap = False
    if args.report_from:
        return report_from(
            args.report_from, results_path, validate=not args.no_validate, seed=args.seed
        )

    problems = preflight(args)
    if problems:
        for problem in problems:
            print(f"bench: {problem}", file=sys.stderr)
        return 2
    if "custsync" in args.tools:
        compile_custsync()

    started = time.perf_counter()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    work = OUT / "runs" / stamp
    work.mkdir(parents=True, exist_ok=True)
    log = work / "measurements.jsonl"
    command_line = shlex.join(
        [".venv/bin/python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)]
    )
    print(f"bench: {command_line}\nbench: logs and raw measurements under {work}", flush=True)
    source_start = source_state()
    pg_url = args.pg_url if "postgresql" in args.targets else None

    datasets = {n: generate.ensure(n, args.seed) for n in args.sizes}
    measurements: list[Measurement] = []
    for n in args.sizes:
        reps = repeat_for.get(n, args.repeat)
        for target in args.targets:
            for rep in range(1, reps + 1):
                # Rotate the order so no tool always runs first (cold caches) or last.
                order = args.tools[rep - 1 :] + args.tools[: rep - 1]
                for tool in order:
                    place = Place(
                        target, tool, work / target / tool / f"n{n}" / f"r{rep}", args.pg_url
                    )
                    measurements += run_sequence(place, datasets[n], rep, args, log)
            if args.trap and n == args.sizes[0]:
                place = Place(
                    target, "dlt-trap", work / target / "dlt-trap" / f"n{n}" / "r1", args.pg_url
                )
                measurements += run_sequence(place, datasets[n], 1, args, log)

    validation = None if args.no_validate else run_validation(args.seed)
    if validation is not None:
        (work / "validation.json").write_text(json.dumps(validation) + "\n", encoding="utf-8")
    run_info = {
        "command": command_line,
        "source_start": source_start,
        "source_end": source_state(),
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_min": (time.perf_counter() - started) / 60,
        "log": os.path.relpath(log, ROOT),
        "pg_url": pg_url,
    }
    (work / "run.json").write_text(json.dumps(run_info, indent=2) + "\n", encoding="utf-8")
    report(measurements, [run_info], validation, results_path)
    failed = [m for m in measurements if not m.ok and m.tool != "dlt-trap"]
    return 1 if failed else 0


def run_validation(seed: int) -> dict[str, Any] | None:
    done = subprocess.run(
        [str(PYTHON), str(VALIDATE_SCRIPT), "--json", "--seed", str(seed)],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    validation = last_json_line(done.stdout) or None
    if validation is None:
        print(f"bench: validate.py failed:\n{done.stderr[-2000:]}", file=sys.stderr)
    return validation


def report(
    measurements: list[Measurement],
    runs: list[dict[str, Any]],
    validation: dict[str, Any] | None,
    results_path: Path,
) -> None:
    """Print the table and the goals, and write the report."""
    present = {m.tool for m in measurements}
    tools = [t for t in (*TOOLS, "dlt-trap") if t in present]
    sizes = sorted({m.n for m in measurements if m.tool != "dlt-trap"})
    print()
    print_table(measurements, [t for t in tools if t != "dlt-trap"])
    for goal, measured, verdict in goals(measurements, sizes, validation):
        print(f"goal: {goal}: {measured}: {verdict.strip('*')}")
    loads = [m.load_before for m in measurements if m.load_before == m.load_before] or [0.0]
    pg_url = next((run["pg_url"] for run in runs if run.get("pg_url")), None)
    info = {
        "runs": runs,
        "machine": machine(),
        "versions": versions(pg_url, any(t.startswith("dlt") for t in tools)),
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_median": statistics.median(loads),
        "load_max": max(loads),
    }
    write_report(
        results_path,
        measurements=measurements,
        tools=tools,
        sizes=sizes,
        validation=validation,
        info=info,
    )
    print(f"bench: wrote {os.path.relpath(results_path, Path.cwd())}")


def report_from(dirs: Sequence[Path], results_path: Path, *, validate: bool, seed: int) -> int:
    """Rebuild the report from earlier runs' folders. For each (target, tool, size), the
    measurements of the last folder that has them win: a later run can redo one part."""
    groups: dict[tuple[str, str, int], list[Measurement]] = {}
    runs: list[dict[str, Any]] = []
    validation: dict[str, Any] | None = None
    for folder in dirs:
        log = folder / "measurements.jsonl"
        if not log.exists():
            print(f"bench: {log} does not exist", file=sys.stderr)
            return 2
        found: dict[tuple[str, str, int], list[Measurement]] = {}
        for line in log.read_text(encoding="utf-8").splitlines():
            if line.strip():
                m = Measurement(**json.loads(line))
                found.setdefault((m.target, m.tool, m.n), []).append(m)
        groups.update(found)
        meta = folder / "run.json"
        runs.append(
            json.loads(meta.read_text(encoding="utf-8"))
            if meta.exists()
            else {
                "command": "(not recorded)",
                "source_start": "unknown",
                "source_end": "unknown",
                "finished": "unknown",
                "elapsed_min": float("nan"),
                "log": os.path.relpath(log, ROOT),
            }
        )
        if (folder / "validation.json").exists():
            validation = json.loads((folder / "validation.json").read_text(encoding="utf-8"))
    if validation is None and validate:
        validation = run_validation(seed)
    measurements = [m for group in groups.values() for m in group]
    report(measurements, runs, validation, results_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
