"""The 30-second locust smoke run of the issue, through the same runner people use:
`python -m load_tests.run` against the session's tiny-model server, generous thresholds
(a busy 2-core CI machine), exit code 0 wanted: every response checked, none failed."""
from __future__ import annotations

import os
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


def test_a_stream_is_timed_to_its_last_byte(tmp_path):
    """Locust times a response to its headers, which a stream sends with its first event: the
    stream latency it reported was about the time to first token."""
    import csv
    import http.server
    import json
    import threading
    import time

    class SlowStream(http.server.BaseHTTPRequestHandler):  # two events, 0.25 s apart
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for part in (f'data: {{"seed": {body["seed"]}}}\n\n', "data: [DONE]\n\n"):
                time.sleep(0.25)
                data = part.encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowStream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        subprocess.run([str(Path(sys.executable).parent / "locust"), "-f", "load_tests/locustfile.py", "StreamingUser",
                        "--headless", "-u", "1", "-r", "1", "-t", "3s", "--only-summary",
                        "--host", f"http://127.0.0.1:{server.server_address[1]}", "--csv", str(tmp_path / "loc")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    row = next(r for r in csv.DictReader(open(tmp_path / "loc_stats.csv")) if r["Name"] == "/complete stream")
    assert int(row["Request Count"]) >= 2 and int(row["Failure Count"]) == 0, row
    assert float(row["Median Response Time"]) >= 450, row  # the whole stream: 500 ms


def _kill_with_children(proc: subprocess.Popen) -> None:
    """SIGKILL a test's process and the children it forked (which share what is measured)."""
    for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        os.kill(int(child), 9)
    proc.kill()
    proc.wait()


def test_the_soak_counts_pages_shared_between_processes_once():
    """It summed each process's RSS: pages a worker shares with its engine processes (torch's
    libraries) counted once per process, which made a growth in percent look smaller."""
    from load_tests.soak import pss_bytes

    code = ("import os, sys, time\nb = bytearray(64 << 20)\nb[::4096] = b'x' * len(b[::4096])\n"
            "if os.fork():\n    print('ready', flush=True)\ntime.sleep(60)\n")  # the child shares all 64 MiB
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        total = pss_bytes(proc.pid) / 2**20
    finally:
        _kill_with_children(proc)
    assert 64 < total < 110, total  # summed RSS: about 2 x (64 + the interpreter)


def test_a_wrong_body_with_status_200_is_a_failure(tmp_path):
    """Every response's body is checked: a server answering 200 with the wrong seed, no choices
    and no images must fail every request (a success() after the check used to hide it)."""
    import csv
    import http.server
    import threading

    class Wrong(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            data = b'{"seed": -1, "choices": [], "images": [], "usage": {"completion_tokens": 0}}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Wrong)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        subprocess.run([str(Path(sys.executable).parent / "locust"), "-f", "load_tests/locustfile.py",
                        "CompletionUser", "ImageUser", "--headless", "-u", "2", "-r", "2", "-t", "3s", "--only-summary",
                        "--host", f"http://127.0.0.1:{server.server_address[1]}", "--csv", str(tmp_path / "loc")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
    row = next(r for r in csv.DictReader(open(tmp_path / "loc_stats.csv")) if r["Name"] == "Aggregated")
    assert int(row["Request Count"]) >= 2 and row["Failure Count"] == row["Request Count"], row


def test_a_text_only_server_with_a_key_gets_text_users_sending_the_key(tmp_path):
    """Against a text-only server every image request failed with 404, and against a server
    with CONDGEN_API_KEY every request failed with 401: the users now follow GET /models and
    send the key of the environment."""
    import csv
    import http.server
    import json
    import threading

    seen = {"unauthorized": 0, "generate": 0}

    class TextOnly(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def answer(self, data: bytes, ctype: str = "application/json", status: int = 200):
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def authorized(self) -> bool:
            if self.headers.get("authorization") == "Bearer s3cret":
                return True
            seen["unauthorized"] += 1
            self.answer(b'{"error": {"message": "missing API key"}}', status=401)
            return False

        def do_GET(self):
            if self.authorized():
                self.answer(b'{"object": "list", "data": [{"id": "gpt:x", "kind": "text"}]}')

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            if not self.authorized():
                return
            if self.path != "/complete":
                seen["generate"] += 1
                return self.answer(b'{"error": {"message": "no image model"}}', status=404)
            choice = {"text": " x", "finish_reason": "length"}
            if body.get("stream"):
                return self.answer(f'data: {json.dumps({"seed": body["seed"], **choice})}\n\ndata: [DONE]\n\n'.encode(),
                                   "text/event-stream")
            self.answer(json.dumps({"seed": body["seed"], "choices": [choice], "usage": {"completion_tokens": 1}}).encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TextOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "load_tests.run", "--host", f"http://127.0.0.1:{server.server_address[1]}",
             "--users", "4", "--spawn-rate", "4", "--run-time", "3s", "--out", str(tmp_path / "run")],
            cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, "CONDGEN_API_KEY": " s3cret\n"})
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = {r["Name"] for r in csv.DictReader(open(tmp_path / "run_stats.csv"))}
    assert {"/complete", "/complete stream"} <= names and not any("generate" in n for n in names), names
    assert seen == {"unauthorized": 0, "generate": 0}


def test_the_chat_user_runs_against_a_server_with_a_chat_template(server, tmp_path):
    """The session's server has the example template: its OpenAPI document lists the route."""
    import csv

    proc = subprocess.run([str(Path(sys.executable).parent / "locust"), "-f", "load_tests/locustfile.py", "ChatUser",
                           "--headless", "-u", "2", "-r", "2", "-t", "4s", "--only-summary", "--host", server.url,
                           "--csv", str(tmp_path / "loc")], cwd=REPO, capture_output=True, text=True, timeout=60)
    rows = {r["Name"]: r for r in csv.DictReader(open(tmp_path / "loc_stats.csv"))}
    assert "/v1/chat/completions" in rows, proc.stderr[-3000:]
    row = rows["/v1/chat/completions"]
    assert int(row["Request Count"]) >= 2 and int(row["Failure Count"]) == 0, (row, proc.stderr[-3000:])


def test_the_soak_refuses_a_pid_it_cannot_measure(capsys):
    """A wrong --pid measured 0 bytes and divided by zero at the end of the run."""
    import pytest

    from load_tests.soak import main as soak
    with pytest.raises(SystemExit) as e:
        soak(["--host", "http://127.0.0.1:1", "--pid", "999999999", "--minutes", "0.02"])
    assert e.value.code == 2 and "--pid 999999999" in capsys.readouterr().err


def test_the_soak_measures_the_server_listening_on_its_host_port(capsys):
    """`make soak` took the oldest `bentoml serve` on the machine (`pgrep -o`), which need not be
    the server at --host: the soak finds the process listening on the host's port, the first of
    its tree to hold the socket (bentoml serve; its workers inherit it)."""
    import pytest

    from load_tests.soak import listening_pid, main as soak

    code = ("import os, socket, time\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\ns.listen()\n"
            "if os.fork():\n    print(s.getsockname()[1], flush=True)\ntime.sleep(60)\n")  # the child inherits it
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        assert listening_pid(port) == proc.pid
    finally:
        _kill_with_children(proc)
    assert listening_pid(port) is None
    with pytest.raises(SystemExit) as exit_info:
        soak(["--host", f"http://127.0.0.1:{port}", "--minutes", "0.02"])
    assert exit_info.value.code == 2 and "--pid" in capsys.readouterr().err


def test_the_runner_refuses_a_run_that_would_not_end_and_never_reads_an_earlier_run(tmp_path, capsys):
    """Locust runs forever for --run-time 0s, and a run time it cannot read failed only in its
    own output, after which the previous run's statistics were printed as this run's, exit 0."""
    import pytest

    from load_tests.run import main as run
    from load_tests.soak import main as soak

    for bad in (["--run-time", "0s"], ["--run-time", "3x"], ["--users", "0"]):
        with pytest.raises(SystemExit) as e:
            run(["--host", "http://127.0.0.1:1", "--out", str(tmp_path / "run"), *bad])
        assert e.value.code == 2, bad
    with pytest.raises(SystemExit):
        soak(["--host", "http://127.0.0.1:1", "--minutes", "0"])
    assert "--minutes must make at least a second" in capsys.readouterr().err
    stale = tmp_path / "run_stats.csv"  # an earlier run's, that passed
    stale.write_text("Type,Name,Request Count,Failure Count,Requests/s,50%,95%\n,Aggregated,10,0,1.0,5,9\n")
    code = run(["--host", "http://127.0.0.1:1", "--out", str(tmp_path / "run"), "--run-time", "2s",
                "--user-classes", "NoSuchUser"])  # locust itself fails
    assert code == 2 and "locust failed" in capsys.readouterr().err and not stale.exists()


def test_the_fuzzer_reads_the_load_test_s_key_and_fails_a_run_that_only_met_the_key_check(monkeypatch, capsys):
    from collections import Counter

    import load_tests.fuzz as fuzz

    sent = {}

    def only_401s(host, cases, headers, seed):
        sent.update(headers)
        return fuzz.Outcome(cases=3, statuses=Counter({401: 3}))

    monkeypatch.setattr(fuzz, "fuzz", only_401s)
    monkeypatch.setenv("CONDGEN_API_KEY", " s3cret\n")
    assert fuzz.main(["--host", "http://127.0.0.1:1", "--cases", "3"]) == 1
    assert sent == {"Authorization": "Bearer s3cret"} and "every answer was a 401" in capsys.readouterr().err
