"""The 30-second locust smoke run of the issue, through the same runner people use:
`python -m load_tests.run` against the session's tiny-model server, generous thresholds
(a busy 2-core CI machine), exit code 0 wanted: every response checked, none failed."""
from __future__ import annotations

import subprocess
import sys

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_locust_smoke_run_passes_its_thresholds(server, tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run(
        [sys.executable, "-m", "load_tests.run", "--host", server.url, "--users", "4", "--spawn-rate", "4",
         "--run-time", "30s", "--max-failure-ratio", "0.01", "--max-p95-ms", "60000", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "smoke_stats.csv").is_file() and (tmp_path / "smoke.html").is_file()
    assert "ALL" in proc.stdout
