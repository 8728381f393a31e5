"""Runs a shell command N times (each after removing its output and `sync`)
and prints the median wall time and the largest peak RSS (wait4: the child
and every descendant it waited for).
Usage: measure.py LABEL RUNS OUTPUT_PATH_TO_REMOVE -- COMMAND..."""
import os
import shutil
import statistics
import subprocess
import sys
import time


def main():
    label, runs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    times, rss = [], 0
    for _ in range(runs):
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd)
        _, status, usage = os.wait4(p.pid, 0)
        times.append(time.perf_counter() - t0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit("%s: command failed: %s" % (label, " ".join(cmd)))
        rss = max(rss, usage.ru_maxrss)
    print("%s %.3f %d %s" % (label, statistics.median(times), rss // 1024, ",".join("%.3f" % t for t in times)))


if __name__ == "__main__":
    main()
