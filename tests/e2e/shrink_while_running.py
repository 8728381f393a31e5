"""Runs a command and shrinks one of its input files while it runs.

Usage: shrink_while_running.py FILE SIZE STDOUT STDERR -- CMD...

Starts CMD, waits until FILE is mapped into the process (/proc/PID/maps) or
open (/proc/PID/fd), stops it (SIGSTOP), truncates FILE to SIZE bytes,
lets it go on (SIGCONT) and exits with its exit code (128 + N when killed by
signal N). The input is big enough in the tests that the command has not
finished reading it when it is stopped.
"""
import os
import signal
import subprocess
import sys
import time

path, size, out, err = sys.argv[1:5]
assert sys.argv[5] == "--"
cmd = sys.argv[6:]
target = os.path.realpath(path)


def holds(pid):
    try:
        with open(f"/proc/{pid}/maps") as f:
            if any(line.rstrip("\n").endswith(" " + target) for line in f):
                return True
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.path.realpath(f"/proc/{pid}/fd/{fd}") == target:
                return True
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return False


with open(out, "wb") as o, open(err, "wb") as e:
    p = subprocess.Popen(cmd, stdout=o, stderr=e)
    deadline = time.monotonic() + 30
    while p.poll() is None and not holds(p.pid) and time.monotonic() < deadline:
        pass
    if p.poll() is None:
        os.kill(p.pid, signal.SIGSTOP)
        os.truncate(path, int(size))
        os.kill(p.pid, signal.SIGCONT)
    else:
        print("shrink_while_running: the command ended before it opened the file", file=sys.stderr)
    rc = p.wait()
sys.exit(128 - rc if rc < 0 else rc)
