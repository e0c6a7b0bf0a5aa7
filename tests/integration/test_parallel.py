"""A parallel run (a worker process reads, validates and maps while the run writes) ends
exactly as a single-process run does, and the worker never outlives nor outranks it.

Each comparison runs the same job twice, ``parallel = true`` and ``parallel = false``,
into SQLite files of their own, and compares the summaries, the notes, the rejects files
and every row.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import T0, cli_env, command, customer, rejects_of, write_job, write_pages

from custsync import plugins
from custsync._fake import make_customers, touch, write_list_documents
from custsync.engine import Job, RunResult, _cpus, _Run, _widen
from custsync.model import normalize
from custsync.plugins import Connector
from custsync.sources.base import RawRecord, SourceBatch, SourceSettings

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or _cpus() < 2,
    reason="a parallel run needs Linux and two CPUs (affinity and cgroup quota)",
)


def children(pid: int | None = None) -> set[int]:
    """A process's child processes (this one's by default), from /proc."""
    found: set[int] = set()
    try:
        for task in Path(f"/proc/{pid or os.getpid()}/task").iterdir():
            found.update(int(child) for child in (task / "children").read_text().split())
    except FileNotFoundError:
        pass  # it has ended
    return found


def file_job(folder: Path, input_file: Path, sync: str) -> Path:
    """A job file in ``folder`` syncing ``input_file`` into ``folder``/target.db."""
    return write_job(
        folder,
        url=f"sqlite:///{folder / 'target.db'}",
        table="customers",
        source=f'path = "{input_file}"',
        sync=sync,
    )


def generated_job(tmp_path: Path, n: int, *, seed: int, batch_size: int) -> tuple[Path, Path]:
    """``n`` generated customers in a JSON Lines file, and a job syncing them into SQLite:
    (the input file, the job file)."""
    input_file = tmp_path / "customers.jsonl"
    write_list_documents(input_file, make_customers(n, seed=seed), page_size=25, seed=seed)
    job_file = file_job(tmp_path, input_file, f"batch_size = {batch_size}")
    return input_file, job_file


def wait_for_worker(process: subprocess.Popen[Any]) -> set[int]:
    """The worker process(es) of a ``custsync sync`` started in the background, once seen."""
    workers: set[int] = set()
    deadline = time.monotonic() + 60
    while not workers and process.poll() is None and time.monotonic() < deadline:
        workers = children(process.pid)
        time.sleep(0.01)
    assert workers, "the run ended before its worker was seen"
    return workers


def alive(pid: int) -> bool:
    """A process that has not ended (a zombie nobody reaped has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def mixed_input(path: Path) -> Path:
    """Pages of good customers with, among them, every kind of record a run sets apart:
    an invalid e-mail, a record without a key, a password, duplicates across pages (newer,
    older, tied), a key too long for its column (refused by the database); then a
    malformed line and a line that is not UTF-8."""
    records = [customer(f"C{n:03d}", updated_at=T0 + timedelta(seconds=n)) for n in range(60)]
    records[5] = customer("C005", email="not-an-email")
    records[6] = customer("C006", reference="")
    records[7] = customer("C007", password="hunter2-secret")
    records[8] = customer("C008", reference="X" * 300)
    records += [
        customer("C010", updated_at=T0 + timedelta(hours=1), status="repeat"),
        customer("C011", updated_at=T0 - timedelta(hours=1), status="repeat"),
        customer("C012", updated_at=T0 + timedelta(seconds=12), status="acquired"),
    ]
    pages = [records[i : i + 7] for i in range(0, len(records), 7)]
    write_pages(path, *pages)
    with path.open("ab") as f:
        f.write(b'{"data": [{"id": "broken", "attributes": {"email": \n')
        late = customer("C099", email="zo\u00e9@example.com")
        f.write(json.dumps({"data": [late]}, ensure_ascii=False).encode("cp1252") + b"\n")
    return path


def run_both(tmp_path: Path, input_file: Path, sync: str) -> tuple[Any, Any]:
    """The same job run in parallel and in one process; per run: the result, the rejects
    file (without run ids) and the table's rows."""
    outcomes = []
    for parallel in ("true", "false"):
        folder = tmp_path / f"parallel-{parallel}"
        job_file = file_job(folder, input_file, f"{sync}\nparallel = {parallel}")
        result = Job.from_file(job_file).run()
        outcomes.append((summary_of(result), rejects_without_run(job_file), rows_of(folder)))
    return outcomes[0], outcomes[1]


def summary_of(result: RunResult) -> dict[str, Any]:
    summary = result.as_dict()
    summary["notes"] = list(result.notes)
    summary["error"] = result.error
    for volatile in ("run_id", "duration_s", "rejects_path"):
        summary.pop(volatile, None)
    return summary


def rejects_without_run(job_file: Path) -> list[dict[str, Any]]:
    lines = rejects_of(job_file)
    for line in lines:
        line.pop("run_id", None)
        line.pop("rejected_at", None)
    return lines


def rows_of(folder: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(folder / "target.db") as db:
        return db.execute("SELECT * FROM customers ORDER BY customer_no").fetchall()


def test_a_parallel_run_ends_as_a_single_process_run_does(tmp_path: Path) -> None:
    input_file = mixed_input(tmp_path / "customers.jsonl")

    parallel, single = run_both(tmp_path, input_file, "batch_size = 5\nmax_rejects = 100")

    assert parallel == single
    summary, rejects, rows = parallel
    assert summary["status"] == "ok"
    assert summary["read"] == 65  # 63 on pages, the broken line, the line after it
    assert summary["duplicates"] == 3
    stages = sorted((r["stage"], r["source_id"]) for r in rejects)
    assert ("load", "C008") in stages  # the database refused it: its record came back packed
    assert ("validate", "C005") in stages
    assert ("map", "C006") in stages
    assert sum(stage == "dedupe" for stage, _ in stages) == 3
    assert "hunter2-secret" not in json.dumps(rejects)
    assert summary["rejected"] == 4  # e-mail, no key, key too long, broken line
    assert len(rows) == 65 - 3 - 4
    assert any("windows-1252" in note for note in summary["notes"])


def sprinkled_input(path: Path, n: int, *, seed: int) -> Path:
    """``n`` generated customers on pages of 25, with something to set apart every few
    dozen records (a bad e-mail, no key, a password, a key too long for its column, a
    duplicate) and a malformed line and a line that is not UTF-8 between the pages."""
    records = list(make_customers(n, seed=seed))
    for k in range(0, n, 37):
        attributes = records[k]["attributes"]
        match (k // 37) % 5:
            case 0:
                attributes["email"] = f"not-an-email-{k}"
            case 1:
                attributes["reference"] = None
                attributes["metadata"].pop("erp_id", None)
            case 2:
                attributes["password"] = f"hunter2-{k}"
            case 3:
                attributes["reference"] = "X" * 300
            case 4:
                records[k] = json.loads(json.dumps(records[k - 20]))  # an earlier one again
    lines = []
    for start in range(0, n, 25):
        lines.append(json.dumps({"data": records[start : start + 25]}).encode())
        if start % 1000 == 500:
            lines.append(b'{"data": [{"id": "broken", "attributes": {"email": ')
        if start % 1000 == 750:
            late = customer(f"W{start}", email="zo\u00e9@example.com")
            lines.append(json.dumps({"data": [late]}, ensure_ascii=False).encode("cp1252"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_large_batches_end_alike_in_parallel(tmp_path: Path) -> None:
    """Batches of 1,000 are prepared partly in the worker and partly by the writer,
    whichever is idle: the outcome must not depend on where the line fell."""
    input_file = sprinkled_input(tmp_path / "customers.jsonl", 4_000, seed=11)

    parallel, single = run_both(tmp_path, input_file, "batch_size = 1000\nmax_rejects = 1000")

    assert parallel == single
    summary, rejects, rows = parallel
    assert summary["status"] == "ok"
    assert summary["read"] == 4_000 + 8  # four malformed lines, four Windows-1252 ones
    assert {r["stage"] for r in rejects} == {"validate", "map", "load", "dedupe"}
    assert not any("hunter2" in json.dumps(r) for r in rejects)
    assert len(rows) == summary["inserted"] + summary["updated"]


def test_a_slow_writer_gets_batches_in_parts_and_ends_alike(tmp_path: Path) -> None:
    """A writer slower than the worker (here: a progress callback that sleeps) takes
    every batch as stretches the worker sent while it was busy; the outcome is the one
    of a single process."""
    input_file = sprinkled_input(tmp_path / "customers.jsonl", 3_000, seed=13)
    outcomes = []
    for parallel in ("true", "false"):
        folder = tmp_path / f"parallel-{parallel}"
        job_file = file_job(
            folder, input_file, f"batch_size = 1000\nmax_rejects = 1000\nparallel = {parallel}"
        )
        result = Job.from_file(job_file).run(progress=lambda counts: time.sleep(0.3))
        outcomes.append((summary_of(result), rejects_without_run(job_file), rows_of(folder)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0]["status"] == "ok"


def test_a_batch_read_and_prepared_in_parts_is_the_batch_prepared_whole(tmp_path: Path) -> None:
    """The worker reads the source a part at a time, and the parts are prepared where
    there is time (some by the worker, some by the writer): joined, they are the batch
    read and prepared at once, for every size of part; and the rejects come in read
    order, whatever the stage that set them apart."""
    input_file = sprinkled_input(tmp_path / "customers.jsonl", 600, seed=12)
    job_file = file_job(tmp_path, input_file, "batch_size = 10000")
    job = Job.from_file(job_file)
    run = _Run(
        job,
        dry_run=True,
        full_refresh=False,
        since=None,
        limit=None,
        from_rejects=None,
        progress=None,
        stop=threading.Event(),
    )
    since = datetime.fromisoformat(
        json.loads(input_file.read_bytes().split(b"\n")[3])["data"][0]["attributes"]["updated_at"]
    )  # the first records are older: the lower bound sets some apart too

    def read(size: int) -> list[SourceBatch]:
        source = job.make_source()
        try:
            return list(source.read(since=since, cursor=None, batch_size=size))
        finally:
            source.close()

    def joined(batches: list[SourceBatch]) -> SourceBatch:
        return SourceBatch(
            [raw for b in batches for raw in b.records],
            skipped=sum(b.skipped for b in batches),
            notes=[note for b in batches for note in b.notes],
            checkpoint=batches[-1].checkpoint,
        )

    batch = joined(read(10_000))
    whole = run._prepare(batch, since)

    assert whole.skipped > 0
    assert whole.checkpoint is not None
    assert {"validate", "map"} <= {r.stage for r in whole.rejects}
    position = {}
    for k, raw in enumerate(batch.records):
        position[raw.origin] = k
        if raw.error is None:
            position[str(raw.data["id"])] = k
    read_order = [position[r.source_id or ""] for r in whole.rejects]
    assert f"{input_file.name}:22" in {r.source_id for r in whole.rejects}  # the broken line
    assert read_order == sorted(read_order)
    for size in [1, 7, 199, 200, 333]:
        parts = read(size)
        assert len(parts) > len(batch.records) // size
        prepared = run._prepare(parts[0], since)
        for part in parts[1:]:
            prepared.extend(run._prepare(part, since))
        assert joined(parts) == batch, f"parts of {size}"
        assert prepared == whole, f"parts of {size}"


def test_a_parallel_dry_run_reports_as_a_single_process_one_and_writes_nothing(
    tmp_path: Path,
) -> None:
    input_file = mixed_input(tmp_path / "customers.jsonl")
    summaries = []
    for parallel in ("true", "false"):
        folder = tmp_path / f"dry-{parallel}"
        sync = f"batch_size = 5\nmax_rejects = 100\nparallel = {parallel}"
        job_file = file_job(folder, input_file, sync)
        result = Job.from_file(job_file).run(dry_run=True)
        summaries.append(summary_of(result))
        assert not (folder / "target.db").exists() or rows_of_any(folder) == 0
        assert rejects_of(job_file) == []

    assert summaries[0] == summaries[1]
    assert summaries[0]["status"] == "ok"
    assert summaries[0]["read"] == 65


def rows_of_any(folder: Path) -> int:
    with sqlite3.connect(folder / "target.db") as db:
        tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return sum(db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for (t,) in tables)


@pytest.mark.parametrize("duplicates", ["keep_latest", "keep_first", "merge", "reject"])
def test_every_duplicates_policy_ends_alike_in_parallel(tmp_path: Path, duplicates: str) -> None:
    input_file = mixed_input(tmp_path / "customers.jsonl")

    parallel, single = run_both(
        tmp_path, input_file, f'batch_size = 3\nmax_rejects = 100\nduplicates = "{duplicates}"'
    )

    assert parallel == single


def test_an_incremental_run_after_a_parallel_one_ends_alike(tmp_path: Path) -> None:
    input_file = tmp_path / "customers.jsonl"
    customers = list(make_customers(3_000, seed=5, tie_fraction=0.25))
    write_list_documents(input_file, customers, page_size=25, seed=5)
    sync = 'batch_size = 100\nlookback = "1m"'
    run_both(tmp_path, input_file, sync)
    rng = random.Random(5)
    later = max(datetime.fromisoformat(c["attributes"]["updated_at"]) for c in customers)
    edits = [touch(c, at=later + timedelta(hours=1), rng=rng) for c in customers[:40]]
    write_list_documents(input_file, customers + edits, page_size=25, seed=5)

    parallel, single = run_both(tmp_path, input_file, sync)

    assert parallel == single
    assert parallel[0]["read"] == 3_040
    assert parallel[0]["updated"] == 40


def test_an_error_in_the_worker_fails_the_run_with_the_sources_message(tmp_path: Path) -> None:
    broken = tmp_path / "customers.json"
    items = [json.dumps(customer(f"C{n:03d}")) for n in range(30)]
    broken.write_text("[" + ",".join(items) + ', {"id": "C999", "attr', encoding="utf-8")

    parallel, single = run_both(tmp_path, broken, "batch_size = 4")

    assert parallel == single
    summary, _, rows = parallel
    assert summary["status"] == "failed"
    assert "is not valid JSON after item 29" in summary["error"]
    assert len(rows) == 28  # the batches committed before the error stay
    assert children() == set()


def test_a_target_that_cannot_be_prepared_fails_the_run_with_nothing_written(
    tmp_path: Path,
) -> None:
    """The worker starts reading while the run connects to the target; a target found
    unfit then ends the run as before: nothing counted, no rejects, no worker left."""
    input_file = mixed_input(tmp_path / "customers.jsonl")
    with sqlite3.connect(tmp_path / "target.db") as db:
        db.execute("CREATE TABLE customers (something_else TEXT)")
    job_file = file_job(tmp_path, input_file, "batch_size = 5\nmax_rejects = 100")

    result = Job.from_file(job_file).run()

    assert result.status == "config_error"
    assert "no key column 'customer_no'" in (result.error or "")
    assert result.read == 0
    assert rejects_of(job_file) == []
    assert children() == set()


def test_a_run_stopped_early_leaves_no_worker_behind(tmp_path: Path) -> None:
    _, job_file = generated_job(tmp_path, 2_000, seed=3, batch_size=50)
    seen: list[set[int]] = []

    result = Job.from_file(job_file).run(limit=100, progress=lambda counts: seen.append(children()))

    assert result.status == "ok"
    assert result.read == 100
    assert seen
    assert all(len(workers) == 1 for workers in seen)  # it did run in parallel
    assert children() == set()


def test_the_worker_holds_no_descriptor_of_the_run(tmp_path: Path) -> None:
    """Only its pipe, the input file and the standard streams: not the job's lock, the
    state, the target or the rejects file, which die with the run's own process."""
    input_file, job_file = generated_job(tmp_path, 2_000, seed=4, batch_size=50)
    held: list[list[str]] = []

    def look(counts: Any) -> None:
        for pid in children():
            fds = Path(f"/proc/{pid}/fd")
            held.append([os.readlink(fd) for fd in fds.iterdir() if int(fd.name) > 2])

    result = Job.from_file(job_file).run(progress=look)

    assert result.status == "ok"
    assert held
    for targets in held:
        others = [t for t in targets if not t.startswith("pipe:") and t != str(input_file)]
        assert others == []


def test_kill_9_of_a_parallel_run_frees_the_job_at_once(tmp_path: Path) -> None:
    """The worker may still be reading when its run dies: the next run takes the lock
    anyway, and the worker ends when its pipe breaks."""
    _, job_file = generated_job(tmp_path, 20_000, seed=8, batch_size=100)
    process = subprocess.Popen(
        command("sync", str(job_file), "--json"),
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        workers = wait_for_worker(process)
        process.send_signal(signal.SIGKILL)
        process.wait()

        again = Job.from_file(job_file).run()

        assert again.status == "ok"
        assert again.read == 20_000
        with sqlite3.connect(tmp_path / "target.db") as db:
            assert db.execute("SELECT count(*) FROM customers").fetchone() == (20_000,)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "the orphaned worker did not end"
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class _BreaksAfterOneBatch:
    """A third-party source that says it may be read in a forked worker, and fails in
    the middle of its read with an error of its own."""

    fork_safe = True

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def read(self, *, since: Any, cursor: Any, batch_size: int) -> Iterator[SourceBatch]:
        yield SourceBatch(
            [RawRecord(data=normalize(r), origin=f"#{i}") for i, r in enumerate(self.records)]
        )
        raise ValueError("the third-party source broke")

    def close(self) -> None:
        pass


class _BrokenSettings(SourceSettings):
    pass


def test_an_unexpected_error_in_the_worker_is_logged_with_its_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [customer(f"C{n:03d}") for n in range(5)]
    plugins.register(
        Connector(
            "breaks", "source", _BrokenSettings, lambda s, base_dir: _BreaksAfterOneBatch(records)
        )
    )
    try:
        job = Job.from_dict(
            {
                "source": {"connector": "breaks"},
                "target": {
                    "connector": "sql",
                    "url": f"sqlite:///{tmp_path / 't.db'}",
                    "table": "c",
                    "key": "customer_no",
                },
                "mapping": {"preset": "erp_customer"},
            },
            base_dir=tmp_path,
        )
        with caplog.at_level(logging.ERROR, logger="custsync"):
            result = job.run()
    finally:
        plugins.unregister("source", "breaks")

    assert result.status == "failed"
    assert result.error == "unexpected ValueError: the third-party source broke"
    assert result.inserted == 5  # the batch before the error is committed
    worker_logs = [
        r.getMessage() for r in caplog.records if "worker process failed" in r.getMessage()
    ]
    assert len(worker_logs) == 1
    assert "Traceback" in worker_logs[0]
    assert ", in read\n" in worker_logs[0]  # the worker's own frames, not the run's
    assert "ValueError: the third-party source broke" in worker_logs[0]
    assert children() == set()


def test_ctrl_c_to_the_terminal_stops_a_parallel_run_after_the_batch_in_flight(
    tmp_path: Path,
) -> None:
    """Ctrl-C reaches the whole foreground process group: the worker ignores it, the run
    stops after the batch in flight, ends its worker and says "interrupted"; the next run
    completes the job."""
    _, job_file = generated_job(tmp_path, 20_000, seed=9, batch_size=100)
    process = subprocess.Popen(
        command("sync", str(job_file), "--json"),
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        workers = wait_for_worker(process)
        os.killpg(process.pid, signal.SIGINT)
        stdout, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    summary = json.loads(stdout.strip().splitlines()[-1])
    assert process.returncode == 1
    assert summary["status"] == "interrupted"
    assert 0 < summary["read"] < 20_000
    assert not any(alive(pid) for pid in workers)
    again = Job.from_file(job_file).run()
    assert again.status == "ok"
    assert again.inserted + again.unchanged == 20_000


def test_the_workers_pipe_holds_about_a_batch() -> None:
    # A batch of 1,000 customers pickles to about 1 MB: the worker hands it over and reads
    # on, where a pipe of the default 64 KiB kept it waiting for the writer.
    import fcntl

    receiver, sender = os.pipe()
    try:
        _widen(sender)
        assert fcntl.fcntl(sender, fcntl.F_GETPIPE_SZ) >= 1 << 20
    finally:
        os.close(receiver)
        os.close(sender)


# Runs `custsync sync` in this process, noting at each fork whether SQLAlchemy is loaded.
SYNC_NOTING_FORKS = """
import os, sys
loaded_at_fork = []
os.register_at_fork(before=lambda: loaded_at_fork.append("sqlalchemy" in sys.modules))
from custsync.cli import main
code = main(["sync", sys.argv[1], "--json"])
print("forks:", loaded_at_fork, "sqlalchemy at the end:", "sqlalchemy" in sys.modules)
sys.exit(code)
"""


def test_the_worker_starts_before_the_run_imports_sqlalchemy(tmp_path: Path) -> None:
    """The worker reads while the run imports SQLAlchemy (a fifth of a second) for the
    target: the job, the state and the lock need none of it. A later run with nothing to
    write never imports it."""
    _, job_file = generated_job(tmp_path, 500, seed=5, batch_size=100)

    def run() -> str:
        done = subprocess.run(
            [sys.executable, "-c", SYNC_NOTING_FORKS, str(job_file)],
            cwd=tmp_path,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()[-1]

    assert run() == "forks: [False] sqlalchemy at the end: True"
    assert run() == "forks: [False] sqlalchemy at the end: False"
    with sqlite3.connect(tmp_path / "target.db") as db:
        assert db.execute("SELECT count(*) FROM customers").fetchone() == (500,)
