"""Run one command and report its wall time and peak RSS: a lean parent for run.py.

    python -I -S bench/_measure.py RESULT_FILE -- COMMAND [ARG...]

Why a separate process: Linux carries the high-water RSS of the address space a child
leaves at ``exec`` into that child's ``ru_maxrss``. A child forked (or vforked) from
run.py, which holds hundreds of MB after generating a million records, reports at least
run.py's own peak, whatever it used itself. Forked from this interpreter, started with
no site packages and importing nothing heavy, the floor is a few MB, under any tool's
real figure. Writes ``{"wall_s", "maxrss_kb", "exit_code", "processes"}`` to RESULT_FILE
and exits with the command's exit code.

A tool may run in more than one process (custsync's parallel runs fork a worker). The
kernel's ``ru_maxrss`` is then the largest single process's peak, not their sum, so a
watcher thread reads every descendant's own peak (``VmHWM`` in /proc) every 20 ms, and
``maxrss_kb`` is the sum of those peaks when it is larger: an upper bound of what the
processes held at once (pages a fork shares are counted in each), never an under-count.
"""

import json
import os
import sys
import threading
import time

POLL_S = 0.02


def _descendants(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    pending.extend(int(child) for child in children.read().split())
        except OSError:
            continue
    return found


def _peak_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _watch(pid: int, peaks: dict[int, int], done: threading.Event) -> None:
    """Each process's own peak RSS, as last seen while it ran."""
    while not done.wait(POLL_S):
        for process in _descendants(pid):
            peak = _peak_kb(process)
            if peak > peaks.get(process, 0):
                peaks[process] = peak


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.stderr.write("usage: _measure.py RESULT_FILE -- COMMAND [ARG...]\n")
        return 2
    result_file, cmd = sys.argv[1], sys.argv[3:]
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: become the command
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    peaks: dict[int, int] = {}
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(pid, peaks, done), daemon=True)
    if os.path.isdir("/proc"):
        watcher.start()
    # run.py's timeout kills the whole process group, this process and the child alike.
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    done.set()
    code = os.waitstatus_to_exitcode(status)
    tree = sum(peaks.values()) if len(peaks) > 1 else 0
    result = {
        "wall_s": wall,
        "maxrss_kb": max(usage.ru_maxrss, tree),
        "exit_code": code,
        "processes": len(peaks) or 1,
    }
    with open(result_file, "w", encoding="utf-8") as out:
        json.dump(result, out)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
