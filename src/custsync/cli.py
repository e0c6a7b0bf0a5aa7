"""The ``custsync`` command: scheduled jobs, one-off migrations, and a look at the state.

Standard output carries the result (a short summary, or with ``--json`` one JSON object as
the last line, whatever the exit code); logs go to standard error (JSON lines when
``CUSTSYNC_LOG_FORMAT=json``). Exit codes: 0 success, 1 the run failed, 2 invalid job file
or usage, 3 rejects exceeded ``max_rejects``, 75 another run holds the job's lock.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import threading
import tomllib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from custsync import __version__, plugins, presets
from custsync.engine import COUNTS, Job, RunResult
from custsync.errors import ConfigError, CustsyncError, LockedError
from custsync.mapping import load_mapping_file
from custsync.targets.base import Target

log = logging.getLogger("custsync")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTS, EXIT_LOCKED = 0, 1, 2, 3, 75


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


_JSON_LOGS = False


def _say_error(text: str) -> None:
    """An error the CLI reports itself: a plain line for people, a JSON log line when
    CUSTSYNC_LOG_FORMAT=json (schedulers parse standard error then)."""
    if _JSON_LOGS:
        log.error("%s", text)
    else:
        sys.stderr.write(f"custsync: {text}\n")


def setup_logging(verbosity: int, env: Mapping[str, str]) -> None:
    global _JSON_LOGS
    handler = logging.StreamHandler(sys.stderr)
    _JSON_LOGS = env.get("CUSTSYNC_LOG_FORMAT", "").lower() == "json"
    if _JSON_LOGS:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("custsync")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error still ends with the JSON line when --json was asked."""

    json_requested = False

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"custsync: error: {message}\n")
        if _Parser.json_requested:
            print(json.dumps(_empty_summary(None, "config_error")))
        sys.exit(EXIT_USAGE)


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 timestamp") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="custsync", description="Keep Commerce Layer customers in sync.")
    parser.add_argument("--version", action="version", version=f"custsync {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log lines")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sync = sub.add_parser("sync", help="run a job once")
    sync.add_argument("job", type=Path, help="the job file (TOML)")
    sync.add_argument(
        "--full-refresh", action="store_true", help="read everything, ignore the watermark"
    )
    sync.add_argument(
        "--dry-run", action="store_true", help="report what would change; write nothing"
    )
    sync.add_argument("--json", action="store_true", help="end with one JSON summary line")
    sync.add_argument(
        "--since", type=_timestamp, metavar="TS", help="read records updated at or after TS"
    )
    sync.add_argument("--limit", type=_positive, metavar="N", help="stop after about N records")
    sync.add_argument("--report", type=Path, metavar="PATH", help="write a JSON report of the run")
    sync.add_argument("--from-rejects", type=Path, metavar="PATH", help="replay a rejects file")
    sync.add_argument("--no-progress", action="store_true", help="no progress display")

    check = sub.add_parser("check", help="validate a job and reach its source and target")
    check.add_argument("job", type=Path)

    reconcile = sub.add_parser("reconcile", help="find target rows whose customer is gone")
    reconcile.add_argument("job", type=Path)
    reconcile.add_argument(
        "--dry-run", action="store_true", help="report only, whatever on_deleted says"
    )
    reconcile.add_argument("--force", action="store_true", help="delete even a large share of rows")
    reconcile.add_argument("--json", action="store_true")

    state = sub.add_parser("state", help="show or change a job's state")
    state_sub = state.add_subparsers(dest="state_command", required=True, parser_class=_Parser)
    show = state_sub.add_parser("show", help="the watermark, cursor and recent runs")
    show.add_argument("job", type=Path)
    show.add_argument("--json", action="store_true")
    reset = state_sub.add_parser("reset", help="forget the watermark and cursor")
    reset.add_argument("job", type=Path)
    set_ = state_sub.add_parser("set", help="set the watermark")
    set_.add_argument("job", type=Path)
    set_.add_argument("--watermark", type=_timestamp, required=True, metavar="TS")

    sub.add_parser("connectors", help="list the installed sources and targets")
    sub.add_parser("mappings", help="list the shipped mapping presets")
    return parser


def _empty_summary(job: str | None, status: str) -> dict[str, Any]:
    return {
        "job": job,
        "run_id": None,
        "status": status,
        **dict.fromkeys(COUNTS, 0),
        "watermark": None,
        "duration_s": 0.0,
    }


# A sync allocates millions of short-lived objects that hold no cycles; the default
# collector thresholds make it rescan them hundreds of times. The CLI's process is ours.
GC_THRESHOLDS = (100_000, 50, 100)


def main(argv: Sequence[str] | None = None) -> int:
    gc.set_threshold(*GC_THRESHOLDS)
    args_list = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_requested = "--json" in args_list
    args = build_parser().parse_args(args_list)
    setup_logging(-1 if args.quiet else args.verbose, os.environ)
    command = args.command
    try:
        if command == "sync":
            return _sync(args)
        if command == "check":
            return _check(args)
        if command == "reconcile":
            return _reconcile(args)
        if command == "state":
            return _state(args)
        if command == "connectors":
            return _connectors()
        if command == "mappings":
            return _mappings()
    except ConfigError as exc:
        _say_error(str(exc))
        return EXIT_USAGE
    except LockedError as exc:
        _say_error(str(exc))
        return EXIT_LOCKED
    except CustsyncError as exc:
        _say_error(str(exc))
        return EXIT_FAILED
    return EXIT_USAGE


# --- sync ------------------------------------------------------------------------------


def _sync(args: argparse.Namespace) -> int:
    try:
        job = Job.from_file(args.job)
    except ConfigError as exc:
        _say_error(str(exc))
        if args.json:
            print(json.dumps(_empty_summary(_job_name(args.job), "config_error")))
        return EXIT_USAGE
    stop = threading.Event()
    restore = _install_stop_handlers(stop)
    progress = None if args.json or args.no_progress else _Progress.maybe(job.name)
    try:
        result = job.run(
            dry_run=args.dry_run,
            full_refresh=args.full_refresh,
            since=args.since,
            limit=args.limit,
            from_rejects=args.from_rejects,
            progress=progress.update if progress else None,
            stop=stop,
        )
    finally:
        if progress is not None:
            progress.close()
        restore()
    if args.report is not None:
        _write_report(args.report, job, result)
    if result.error and result.status != "failed":  # the engine logged failures already
        log.error("%s: %s", result.status, result.error)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(_summary(job, result))
    return result.exit_code


def _job_name(path: Path) -> str:
    """The job's name for a summary even when the job file is invalid: its ``name`` key
    when the TOML parses and has one, else the file's stem."""
    try:
        name = tomllib.loads(path.read_text(encoding="utf-8")).get("name")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        name = None
    return name if isinstance(name, str) and name else path.stem


def _install_stop_handlers(stop: threading.Event) -> Any:
    """SIGTERM or Ctrl-C: finish the batch in flight, checkpoint, exit 1 ``interrupted``.
    A second Ctrl-C stops at once (the open transaction rolls back)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        log.warning("stopping after the batch in flight (signal %d)", signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


class _Progress:
    """A live line on a terminal; nothing when standard error is not one."""

    def __init__(self, job: str) -> None:
        from rich.console import Console
        from rich.live import Live

        self._console = Console(stderr=True)
        self._live = Live("", console=self._console, refresh_per_second=4, transient=True)
        self._job = job
        self._live.start()

    @classmethod
    def maybe(cls, job: str) -> _Progress | None:
        return cls(job) if sys.stderr.isatty() else None

    def update(self, counts: Mapping[str, int]) -> None:
        shown = "  ".join(f"{k} {counts.get(k, 0):,}" for k in COUNTS if counts.get(k, 0))
        self._live.update(f"[bold]{self._job}[/bold]  {shown}")

    def close(self) -> None:
        self._live.stop()


def _summary(job: Job, result: RunResult) -> str:
    verb = "would be" if result.dry_run else "were"
    c = result.counts()
    lines = [
        f"{job.name}: {result.status}{' (dry run: nothing written)' if result.dry_run else ''} "
        f"in {result.duration_s:.2f}s",
        f"  read {c['read']:,} records: {c['inserted']:,} inserted, {c['updated']:,} updated, "
        f"{c['unchanged']:,} unchanged, {c['stale']:,} stale (target newer), "
        f"{c['unknown']:,} written (outcome unknown)",
        f"  {c['skipped']:,} skipped (older than the watermark, or written so already), "
        f"{c['duplicates']:,} duplicates, "
        f"{c['rejected']:,} rejected",
    ]
    if result.dry_run:
        lines[1] = lines[1].replace(" records:", f" records; these {verb}:")
    for note in result.notes:
        lines.append(f"  note: {note}")
    if c["rejected"] or c["duplicates"]:
        lines.append(f"  rejects: {result.rejects_path}")
    lines.append(f"  watermark: {result.as_dict()['watermark'] or 'none yet'}")
    if result.error:
        lines.append(f"  error: {result.error}")
    if result.status == "rejects_exceeded":
        lines.append(
            "  rejects exceeded max_rejects: see the rejects file, fix, and replay "
            "with --from-rejects"
        )
    return "\n".join(lines)


def _write_report(path: Path, job: Job, result: RunResult) -> None:
    report = {
        **result.as_dict(),
        "dry_run": result.dry_run,
        "error": result.error,
        "notes": result.notes,
        "rejects_path": str(result.rejects_path) if result.rejects_path else None,
        "source": job.config.source.connector,
        "target": job.config.target.connector,
        "mapping": job.config.mapping.name,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


# --- check, reconcile, state -----------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    job = Job.from_file(args.job)
    config = job.config
    schema = config.schema_
    print(f"job {config.name}: {args.job} is valid")
    print(
        f"  source: {config.source.connector}"
        + (f" (inbound mapping {config.inbound.name})" if config.inbound else "")
    )
    print(
        f"  target: {config.target.connector}, key ({', '.join(schema.key)}), "
        f"match_policy {schema.match_policy}"
    )
    print(
        f"  mapping {config.mapping.name}: "
        + ", ".join(f"{f.name} ({f.type})" for f in config.mapping.fields)
    )
    if schema.guard:
        print(f"  never-go-backwards guard: on (column {schema.guard} holds updated_at)")
    else:
        print("  never-go-backwards guard: OFF - map updated_at to a field to turn it on")
    failed = False
    for label, make in (("source", job.make_source), ("target", job.make_target)):
        try:
            thing = make()
            try:
                check = getattr(thing, "check", None)
                for line in check() if callable(check) else ["(no check available)"]:
                    print(f"  {label}: {line}")
                if isinstance(thing, Target):
                    for note in thing.prepare(schema, create=False):
                        print(f"  target: {note}")
            finally:
                thing.close()
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure here is a finding to print
            failed = True
            print(f"  {label}: NOT reachable: {type(exc).__name__}: {exc}")
    try:
        with job.state_store() as store:
            state = store.get(config.name)
        print(
            f"  state: {config.state_url.split('?')[0]}, watermark "
            f"{state.watermark.isoformat() if state.watermark else 'none yet'}"
        )
    except CustsyncError as exc:
        failed = True
        print(f"  state: NOT reachable: {exc}")
    return EXIT_FAILED if failed else EXIT_OK


def _reconcile(args: argparse.Namespace) -> int:
    from custsync.reconcile import reconcile

    job = Job.from_file(args.job)
    if args.dry_run:
        result = reconcile(job, dry_run=True, force=args.force)
    else:
        with job.state_store() as store, store.lock(job.name):
            result = reconcile(job, force=args.force)
    if args.json:
        print(json.dumps(result.as_dict()))
        return EXIT_OK
    print(
        f"{job.name}: {result.source_ids:,} customers in the source, {result.target_rows:,} "
        f"rows in the target, {result.missing:,} rows whose customer is gone"
    )
    if result.missing:
        acted = result.action != "report" and not args.dry_run
        verb = {"report": "reported", "flag": "flagged", "delete": "deleted"}[result.action]
        print(
            f"  {verb if acted else 'reported'} {result.acted if acted else result.missing:,} "
            f"(on_deleted = {result.action}{', dry run' if args.dry_run else ''}); "
            f"for example {', '.join(result.examples[:5])}"
        )
    return EXIT_OK


def _state(args: argparse.Namespace) -> int:
    job = Job.from_file(args.job)
    with job.state_store() as store:
        if args.state_command == "show":
            state = store.get(job.name)
            runs = store.runs(job.name, limit=10)
            if args.json:
                print(
                    json.dumps(
                        {
                            "job": job.name,
                            "watermark": state.watermark.isoformat() if state.watermark else None,
                            "cursor": state.cursor,
                            "remembered_rows": sum(len(rows) for rows in state.seen.values()),
                            "runs": [
                                {
                                    "run_id": r.run_id,
                                    "status": r.status,
                                    "started_at": r.started_at.isoformat(),
                                    "ended_at": r.ended_at.isoformat() if r.ended_at else None,
                                    "counts": r.counts,
                                    "error": r.error,
                                }
                                for r in runs
                            ],
                        }
                    )
                )
                return EXIT_OK
            print(f"job {job.name}")
            print(f"  watermark: {state.watermark.isoformat() if state.watermark else 'none'}")
            print(f"  cursor: {json.dumps(state.cursor) if state.cursor else 'none'}")
            remembered = sum(len(rows) for rows in state.seen.values())
            print(f"  rows remembered at the watermark: {remembered}")
            for r in runs:
                counts = ", ".join(f"{k} {v}" for k, v in r.counts.items() if v)
                print(f"  run {r.run_id} {r.status} at {r.started_at:%Y-%m-%d %H:%M:%S}: {counts}")
            return EXIT_OK
        with store.lock(job.name):
            if args.state_command == "reset":
                store.reset(job.name)
                print(f"job {job.name}: state reset; the next run reads everything")
            else:
                store.set_watermark(job.name, args.watermark)
                print(f"job {job.name}: watermark set to {args.watermark.isoformat()}")
    return EXIT_OK


def _connectors() -> int:
    for connector in plugins.available():
        kind, name = connector.kind, connector.name
        print(f"{kind:6}  {name:22}  {connector.description}  [{connector.origin}]")
    return EXIT_OK


def _mappings() -> int:
    for name, path in sorted(presets.mapping_names().items()):
        try:
            mapping = load_mapping_file(name)
            direction = mapping.direction or "either"
            summary = mapping.description.split(". ")[0].rstrip(".")
            print(f"{name:24} {direction:8}  {summary}")
        except ConfigError as exc:
            print(f"{name:24} broken    {exc} ({path})")
    return EXIT_OK


def console() -> NoReturn:
    """The ``custsync`` command: ``main``, then exit. What the run left in memory goes with
    the process; frozen, it is not walked once more by the collector as the interpreter
    shuts down (~50 ms of every command, a fifth of a run with nothing to do). Exit
    handlers and finalisers run as usual."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
