"""Run one command and report its wall time and peak RSS: a lean parent for run.py.

    python -I -S bench/_measure.py RESULT_FILE -- COMMAND [ARG...]

Why a separate process: Linux carries the high-water RSS of the address space a child
leaves at ``exec`` into that child's ``ru_maxrss``. A child forked (or vforked) from
run.py, which holds hundreds of MB after generating a million records, reports at least
run.py's own peak, whatever it used itself. Forked from this interpreter, started with
no site packages and importing nothing heavy, the floor is a few MB, under any tool's
real figure. Writes ``{"wall_s", "maxrss_kb", "exit_code"}`` to RESULT_FILE and exits
with the command's exit code.
"""

import json
import os
import sys
import time


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
    # run.py's timeout kills the whole process group, this process and the child alike.
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    with open(result_file, "w", encoding="utf-8") as out:
        json.dump({"wall_s": wall, "maxrss_kb": usage.ru_maxrss, "exit_code": code}, out)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
