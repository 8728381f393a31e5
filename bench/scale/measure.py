#!/usr/bin/python3
"""Times commands at scale: wall, user and system time (wait4), peak anonymous
memory (RssAnon of the process and its children, sampled every 20 ms) and
the load average when each run starts. Runs of several commands are
interleaved (A B A B ...), so that a change in the disk's speed during the
bench hits both alike.

Usage: measure.py CACHE RUNS TIMEOUT SPEC [SPEC ...]
  CACHE   cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before each run;
          warm:PATH[:PATH...]: those folders read whole (into the page cache)
          before each run, after the previous outputs were removed.
  SPEC    LABEL|OUTPUT|COMMAND (OUTPUT removed before each run; '-' for none;
          COMMAND run by sh; its stdout goes to $LOG_DIR/LABEL.out when LOG_DIR
          is set). A run killed after TIMEOUT seconds counts as
          not finished, with the time and memory reached.
Prints one JSON line per label."""
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time


def anon_kib(pid):
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1])
            with open("/proc/%d/task/%d/children" % (p, p)) as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return total


def read_tree(path):
    buf = bytearray(16 << 20)
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def run_once(cmd, timeout, stdout_path):
    peak = [0]
    t0 = time.perf_counter()
    out = open(stdout_path, "w") if stdout_path else subprocess.DEVNULL
    p = subprocess.Popen(cmd, shell=True, start_new_session=True, stdout=out)
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_kib(p.pid))
            done.wait(0.02)

    th = threading.Thread(target=sample)
    th.start()
    timer = threading.Timer(timeout, lambda: os.killpg(p.pid, signal.SIGKILL))
    timer.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    timer.cancel()
    done.set()
    th.join()
    code = os.waitstatus_to_exitcode(status)
    return {"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "anon_mib": peak[0] / 1024,
            "maxrss_mib": ru.ru_maxrss / 1024, "exit": code, "finished": code >= 0}


def main():
    cache, runs, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    specs = [s.split("|", 2) for s in sys.argv[4:]]
    results = {label: [] for label, _, _ in specs}
    for _ in range(runs):
        for label, out, cmd in specs:
            for _, o, _ in specs:
                if o != "-":
                    shutil.rmtree(o, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            if cache == "cold":
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
            else:
                for path in cache.split(":")[1:]:
                    read_tree(path)
            log = os.environ.get("LOG_DIR")
            r = run_once(cmd, timeout, os.path.join(log, label + ".out") if log else None)
            r["load"] = os.getloadavg()[0]
            results[label].append(r)
            print("  %-14s %-5s wall %7.1f s  user %6.1f  sys %6.1f  anon %7.1f MiB  load %.2f%s" % (
                label, cache.split(":")[0], r["wall"], r["user"], r["sys"], r["anon_mib"], r["load"],
                "" if r["exit"] == 0 else "  (exit %d%s)" % (r["exit"], ", killed at timeout" if r["exit"] < 0 else "")),
                file=sys.stderr, flush=True)
    for label, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("wall", "user", "sys", "anon_mib", "load")}
        med["anon_mib"] = max(r["anon_mib"] for r in rs)  # the peak over runs
        print(json.dumps({"label": label, "cache": cache.split(":")[0], "runs": rs, **med}), flush=True)


if __name__ == "__main__":
    main()
