"""Soak test: steady load for --minutes while sampling the server's memory.

    python -m load_tests.soak --host http://127.0.0.1:3000 --minutes 30

Runs the locust users headless (load_tests/locustfile.py, all classes unless --user-classes)
against a running server, reads the proportional set size (PSS) of the server's process (by
default the one listening on --host's port, which must be on this machine; else --pid) and all its
descendants (BentoML's arbiter, its workers, their engine processes) from /proc every
--interval seconds, and compares the mean of the last tenth of the run with that of the first
tenth after --warmup seconds. PSS, not RSS: resident pages the processes share (torch's
libraries) count once in all, not once per process, which made a growth in percent look
smaller (a summed RSS of 663 MiB was 501 MiB of PSS for three processes importing torch).
Prints the growth, writes the samples as CSV, and exits non-zero when the growth is above
--max-growth-pct or locust saw failures above --max-failure-ratio. Starts no server.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks import cli

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def listening_pid(port: int) -> int | None:
    """The process that listens on `port` here, the first of its tree to hold the socket
    (bentoml serve, whose workers inherit it); None if no process we can see does."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # local address (hex ip:port), ..., state (0A: LISTEN), ..., inode
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                sockets.add(f"socket:[{fields[9]}]")
    holders: dict[int, int] = {}  # pid -> parent pid
    for entry in os.listdir("/proc"):
        try:
            fds = os.listdir(f"/proc/{entry}/fd") if entry.isdigit() else []
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in sockets for fd in fds):
                holders[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue  # gone, or not ours to read
    roots = [pid for pid, parent in holders.items() if parent not in holders]
    return min(roots) if roots else None


def pss_bytes(pid: int) -> int:
    """Proportional set size of `pid` and its descendants (processes that vanish count 0)."""
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("Pss:")) * 1024
        except (OSError, StopIteration, IndexError, ValueError):
            pass
    return total


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", required=True, help="base URL of a running service")
    ap.add_argument("--pid", type=int, default=None,
                    help="the server's main process (bentoml serve); default: the one listening on --host's port")
    ap.add_argument("--minutes", type=float, default=30, help="length of the steady load")
    ap.add_argument("--users", type=cli.at_least(1), default=8, help="concurrent simulated users")
    ap.add_argument("--warmup", type=float, default=60, help="seconds of load before the baseline window")
    ap.add_argument("--interval", type=cli.positive, default=5, help="seconds between memory samples")
    ap.add_argument("--user-classes", nargs="*", default=[], help="locust user classes (default: all)")
    ap.add_argument("--out", default="load_tests/reports/soak", help="prefix for the CSV files")
    ap.add_argument("--max-growth-pct", type=float, default=10.0, help="fail above this memory (PSS) growth")
    ap.add_argument("--max-failure-ratio", type=float, default=0.01, help="fail above this share of failures")
    args = ap.parse_args(argv)
    if not 1 <= args.minutes * 60 < math.inf:  # locust runs forever for 0s (and NaN is no length)
        ap.error(f"--minutes must make at least a second, got {args.minutes:g}")
    if args.pid is None:
        url = urlsplit(args.host)
        args.pid = listening_pid(url.port or (443 if url.scheme == "https" else 80))
        if args.pid is None:
            ap.error(f"no process on this machine listens on {args.host}'s port: give the server's --pid")
    if pss_bytes(args.pid) == 0:  # a wrong pid would measure nothing and divide by zero at the end
        ap.error(f"--pid {args.pid}: no such process, or its memory cannot be read (give bentoml serve's pid)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    total_s = args.minutes * 60
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", args.host,
           "-u", str(args.users), "-r", str(args.users), "--run-time", f"{int(total_s)}s", "--csv", str(out),
           "--only-summary", "--exit-code-on-error", "0", *args.user_classes]
    log = Path(f"{out}_locust.log")
    with log.open("w") as sink:
        locust = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    samples: list[tuple[float, int]] = []
    try:
        while locust.poll() is None:
            samples.append((time.monotonic() - t0, pss_bytes(args.pid)))
            time.sleep(args.interval)
    finally:
        if locust.poll() is None:
            locust.terminate()
        locust.wait()
    if locust.returncode != 0:  # (failed requests do not count here)
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
        print(f"{tail}locust failed (exit code {locust.returncode}); its output: {log}", file=sys.stderr)
        return 2
    with open(f"{out}_pss.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["seconds", "pss_bytes"])
        w.writerows(samples)

    steady = [(t, r) for t, r in samples if t >= args.warmup]
    if len(steady) < 4:
        print(f"too few samples after the {args.warmup:g}s warm-up ({len(steady)})", file=sys.stderr)
        return 2
    k = max(1, len(steady) // 10)
    first, last = mean([r for _, r in steady[:k]]), mean([r for _, r in steady[-k:]])
    growth = 100 * (last - first) / first
    peak = max(r for _, r in steady)

    fails, reqs = 0, 0
    stats = Path(f"{out}_stats.csv")
    if stats.is_file():
        for row in csv.DictReader(stats.open()):
            if row["Name"] == "Aggregated":
                reqs, fails = int(row["Request Count"]), int(row["Failure Count"])
    print(f"soak: {args.minutes:g} min, {args.users} users, {reqs} requests, {fails} failures; PSS "
          f"{first / 2**20:.0f} MiB -> {last / 2**20:.0f} MiB (peak {peak / 2**20:.0f} MiB), growth {growth:+.1f}%")
    problems = []
    if growth > args.max_growth_pct:
        problems.append(f"PSS grew {growth:.1f}% > {args.max_growth_pct}%")
    if reqs == 0 or fails / reqs > args.max_failure_ratio:
        problems.append(f"{fails} failures in {reqs} requests")
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
