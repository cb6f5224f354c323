"""Headless load test with pass/fail thresholds; starts no server itself.

    python -m load_tests.run --host http://127.0.0.1:3000 --users 8 --spawn-rate 4 --run-time 30s \
        --max-failure-ratio 0.01 --max-p95-ms 5000

Writes CSV files and an HTML report under --out, prints per-endpoint figures, and exits
non-zero when the failure ratio or any endpoint's p95 latency exceeds its threshold.
"""
from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
from pathlib import Path

from benchmarks import cli

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
TIME_SPAN = re.compile(r"(\d+)|(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")  # locust's: 90, 30s, 5m, 1h30m


def run_time(text: str) -> str:
    """A locust duration above zero: locust runs forever for 0s, and refuses what it cannot read
    only in its own output, after which the previous run's statistics were taken for this one."""
    match = TIME_SPAN.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30s, 5m or 1h30m")
    if not any(int(part or 0) for part in match.groups()):
        raise argparse.ArgumentTypeError(f"{text!r}: must be above zero (locust takes 0 as no end)")
    return text.strip()


def milliseconds(text: str) -> float:
    """A CSV latency cell: locust writes N/A where no request finished."""
    try:
        return float(text or 0)
    except ValueError:
        return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", required=True, help="base URL of a running service")
    ap.add_argument("--users", type=cli.at_least(1), default=8, help="concurrent simulated users")
    ap.add_argument("--spawn-rate", type=float, default=4, help="users started per second")
    ap.add_argument("--run-time", type=run_time, default="30s", help="locust duration, e.g. 30s, 5m")
    ap.add_argument("--user-classes", nargs="*", default=[], help="locust user classes (default: all)")
    ap.add_argument("--out", default="load_tests/reports/run", help="prefix for CSV and HTML reports")
    ap.add_argument("--max-failure-ratio", type=float, default=0.01, help="fail above this share of failures")
    ap.add_argument("--max-p95-ms", type=float, default=10_000, help="fail when an endpoint's p95 exceeds this")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", args.host,
           "-u", str(args.users), "-r", str(args.spawn_rate), "--run-time", args.run_time,
           "--csv", str(out), "--html", f"{out}.html", "--only-summary", "--exit-code-on-error", "0",
           *args.user_classes]
    stats_file = Path(f"{out}_stats.csv")
    stats_file.unlink(missing_ok=True)  # an earlier run's, which a failed locust would leave to be read
    if (code := subprocess.run(cmd, check=False).returncode) != 0:  # (failed requests do not count here)
        print(f"locust failed (exit code {code}); see its output above", file=sys.stderr)
        return 2
    if not stats_file.is_file():
        print(f"locust wrote no statistics ({stats_file})", file=sys.stderr)
        return 2
    rows = list(csv.DictReader(stats_file.open()))
    problems = []
    print(f"{'endpoint':<22} {'requests':>8} {'fails':>6} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8}")
    for row in rows:
        name = row["Name"] if row["Name"] != "Aggregated" else "ALL"
        reqs, fails = int(row["Request Count"]), int(row["Failure Count"])
        p50, p95 = milliseconds(row["50%"]), milliseconds(row["95%"])
        print(f"{name:<22} {reqs:>8} {fails:>6} {float(row['Requests/s']):>7.2f} {p50:>8.0f} {p95:>8.0f}")
        if name == "ALL":
            ratio = fails / reqs if reqs else 1.0
            if reqs == 0:
                problems.append("no requests completed")
            if ratio > args.max_failure_ratio:
                problems.append(f"failure ratio {ratio:.3f} > {args.max_failure_ratio}")
        elif p95 > args.max_p95_ms:
            problems.append(f"{name}: p95 {p95:.0f} ms > {args.max_p95_ms:.0f} ms")
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
