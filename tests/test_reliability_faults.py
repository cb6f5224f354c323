"""A broken model in the store: the service starts, never becomes ready (/readyz 503, the
routes 503 with the reason), and its log names the bad file in one line. Three servers, one
per fault, start side by side on copies of the session store."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import _stop, launch_server, wait_ready
from test_reliability_unit import FAULTS

WAIT_S = 180


@pytest.fixture(scope="module")
def broken_servers(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory):
    started = {}
    try:
        for fault, (kind, make) in {"corrupt_weights": ("gpt", FAULTS["corrupt_weights"]),
                                    "mismatched_config": ("gpt", FAULTS["mismatched_config"]),
                                    "missing_tokenizer": ("gan", FAULTS["missing_tokenizer"]),
                                    # weights that only the image worker process reads
                                    "corrupt_image_weights": ("gan", FAULTS["corrupt_weights"])}.items():
            root = tmp_path_factory.mktemp(fault)
            home = root / "bentoml_home"
            shutil.copytree(bentoml_home, home, ignore=shutil.ignore_patterns("bentos", "tmp", "*.log"))
            model_dir = Path(glob.glob(str(home / "models" / kind / "*" / "config.json"))[0]).parent
            bad = model_dir / make(model_dir)
            proc, srv = launch_server(home, root / "serve.log", {})
            started[fault] = (proc, srv, bad)
        yield started
    finally:
        for proc, _, _ in started.values():
            _stop(proc)


@pytest.mark.parametrize("fault", ["corrupt_weights", "mismatched_config", "missing_tokenizer",
                                   "corrupt_image_weights"])
def test_broken_model_keeps_the_service_unready_and_the_log_names_the_file(broken_servers, fault):
    proc, srv, bad = broken_servers[fault]
    deadline = time.monotonic() + WAIT_S
    line = None
    while line is None:
        assert proc.poll() is None or time.monotonic() < deadline, srv.log_tail()
        assert time.monotonic() < deadline, f"no load failure logged after {WAIT_S}s:\n{srv.log_tail()}"
        for candidate in srv.log.read_text(errors="replace").splitlines():
            if "loading the models failed" in candidate:
                line = candidate
        time.sleep(0.25)
    assert str(bad) in line, line  # one line, with the file's full path
    r = httpx.get(f"{srv.url}/readyz", timeout=10)
    assert r.status_code == 503
    assert httpx.get(f"{srv.url}/livez", timeout=10).status_code == 200  # alive, just not ready
    r = httpx.post(f"{srv.url}/complete", json={"prompt": "Hi"}, timeout=30)
    assert r.status_code == 503 and str(bad.name) in r.json()["error"]["message"]


# ---- an engine process that dies after start-up -----------------------------------------------

def test_dead_engine_processes_restart_their_worker(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """The text engine and the image worker run in child processes of the server worker. Killed
    (out of memory, say), their routes answer 503 with a reason, never 500 or a hang, and the
    worker shuts down so that BentoML starts a fresh one, which loads the models again: the
    service comes back by itself."""
    root = tmp_path_factory.mktemp("dead_engines")
    proc, srv = launch_server(bentoml_home, root / "serve.log", {})

    def engines() -> list[psutil.Process]:
        return [p for p in psutil.Process(proc.pid).children(recursive=True)
                if "multiprocessing.spawn" in " ".join(p.cmdline())]

    try:
        wait_ready(proc, srv)
        assert httpx.post(f"{srv.url}/complete", json={"prompt": "Hi", "max_tokens": 3}, timeout=30).status_code == 200
        killed = engines()
        assert len(killed) >= 2, [p.cmdline() for p in psutil.Process(proc.pid).children(recursive=True)]
        for p in killed:
            os.kill(p.pid, signal.SIGKILL)
        answers: list[int] = []
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                r = httpx.post(f"{srv.url}/generate", json={"prompt": "a red circle"}, timeout=60)
            except httpx.TransportError:  # a connection of the worker going down
                continue
            answers.append(r.status_code)
            if r.status_code == 200:
                break
            # the dead engine's, or the fresh worker's "not ready" while it loads
            assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", r.text
            time.sleep(0.5)
        assert answers[-1:] == [200], answers  # back by itself
        assert httpx.post(f"{srv.url}/complete", json={"prompt": "Hi", "max_tokens": 3}, timeout=30).status_code == 200
        assert httpx.get(f"{srv.url}/livez", timeout=10).status_code == 200
        assert not {p.pid for p in killed} & {p.pid for p in engines()}  # fresh engines
        log = srv.log.read_text(errors="replace")
        assert "the image worker exited (code -9)" in log  # logged, as the text engine's
        assert "an engine process has died: shutting this worker down" in log
    finally:
        _stop(proc)
