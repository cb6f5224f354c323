"""A broken model in the store: the service starts, never becomes ready (/readyz 503, the
routes 503 with the reason), and its log names the bad file in one line. Three servers, one
per fault, start side by side on copies of the session store."""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import _stop, launch_server, wait_ready
from test_reliability_unit import FAULTS
from test_service_http import metric, scrape

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
    log = srv.log.read_text(errors="replace")
    started = _engine_pids(log, "text") + _engine_pids(log, "image")
    gone_by = time.monotonic() + 30  # the engines that did start are stopped: nothing left holding memory
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in started):
        assert time.monotonic() < gone_by, f"engine processes {started} still running after the failed load"
        time.sleep(0.25)
    r = httpx.get(f"{srv.url}/readyz", timeout=10)
    assert r.status_code == 503 and httpx.get(f"{srv.url}/health", timeout=10).status_code == 503
    assert httpx.get(f"{srv.url}/livez", timeout=10).status_code == 200  # alive, just not ready
    errors = [ln for ln in httpx.get(f"{srv.url}/metrics", timeout=10).text.splitlines()
              if ln.startswith("condgen_request_errors_total{")]
    assert not [ln for ln in errors if '"/health"' in ln], errors  # a probe's answer, not an error
    r = httpx.post(f"{srv.url}/complete", json={"prompt": "Hi"}, timeout=30)
    message = r.json()["error"]["message"]
    assert r.status_code == 503 and f"{bad.parent.parent.name}:{bad.parent.name}/{bad.name}" in message, message
    assert str(bad.parent) not in message  # the model's tag, not where the store is on disk
    # it lasts until the server is started again: no Retry-After to wait out
    assert r.json()["error"]["code"] == "model_load_failed" and "retry-after" not in r.headers


# ---- an engine process that dies after start-up -----------------------------------------------

def _engine_pids(log: str, which: str, model: str = "") -> list[int]:
    """The processes the server said its engines run in ("the text engine of gpt:... runs in process N"),
    of the models whose tags start with `model`."""
    return [int(pid) for pid in re.findall(rf"the {which} engine of {model}\S+ runs in process (\d+)", log)]


def test_a_dead_engine_process_is_started_again_while_the_other_models_serve(
        bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """The text engine and the image worker run in child processes of the server worker. One
    killed (out of memory, say): its routes answer 503 with a reason, never 500 or a hang, the
    other models go on serving, and the worker starts it again by itself. It used to shut the
    whole worker down for BentoML to start another, which left a one-worker server answering
    nothing, whatever model a request wanted, until the new worker had loaded every model."""
    root = tmp_path_factory.mktemp("dead_engines")
    proc, srv = launch_server(bentoml_home, root / "serve.log", {})
    complete = ("/complete", {"prompt": "Hi", "max_tokens": 3})
    generate = ("/generate", {"prompt": "a red circle"})

    def post(route: tuple[str, dict]) -> httpx.Response:
        return httpx.post(srv.url + route[0], json=route[1], timeout=60)

    def until_back(route: tuple[str, dict]) -> list[int]:
        answers: list[int] = []
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and answers[-1:] != [200]:
            r = post(route)
            answers.append(r.status_code)
            # the dead engine's 503 until the fresh one is loaded
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert r.json()["error"]["type"] == "server_error" and "engine" in r.json()["error"]["message"]
                # it passes: a client may retry, and is told when (the OpenAI client waits that long)
                assert r.json()["error"]["code"] == "unavailable" and r.headers["retry-after"] == "1"
                time.sleep(0.25)
        return answers

    try:
        wait_ready(proc, srv)
        assert post(complete).status_code == 200
        log = srv.log.read_text(errors="replace")
        text, images = _engine_pids(log, "text"), _engine_pids(log, "image")
        assert len(text) == 1 and len(images) >= 1, log[-3000:]
        worker = psutil.Process(text[0]).ppid()

        os.kill(text[0], signal.SIGKILL)
        assert post(generate).status_code == 200  # the image model serves on
        assert until_back(complete)[-1] == 200, srv.log_tail()
        for pid in images:
            os.kill(pid, signal.SIGKILL)
        assert post(complete).status_code == 200  # and the text model while the image engine is down
        assert until_back(generate)[-1] == 200, srv.log_tail()

        log = srv.log.read_text(errors="replace")
        assert "the text engine has died: starting it again" in log and "the text engine is back after" in log
        assert "the image worker exited (code -9)" in log and "is back after" in log
        fresh_text, fresh_images = _engine_pids(log, "text")[1:], _engine_pids(log, "image")[len(images):]
        assert len(fresh_text) == 1 and len(fresh_images) == len(images)
        assert all(psutil.Process(pid).ppid() == worker for pid in fresh_text + fresh_images)  # the same worker
        deadline = time.monotonic() + WAIT_S  # every image model back (the default one answered above)
        while httpx.get(f"{srv.url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.25)
        assert httpx.get(f"{srv.url}/livez", timeout=10).status_code == 200
        assert srv.log.read_text(errors="replace").count("is back after") == 1 + len(images)
        # each death counted once, by model, however many tries the start took
        deaths = scrape(httpx.Client(base_url=srv.url, timeout=10))
        assert metric(deaths, "condgen_engine_deaths_total", model="gpt") == 1
        assert metric(deaths, "condgen_engine_deaths_total", model="gan") == 1
        _stop(proc)  # a graceful stop ends the engines: none of that is a death to recover from
        stopping = srv.log.read_text(errors="replace").split("Running cleanup hook")[-1]
        assert "has died" not in stopping and "runs in process" not in stopping, stopping
    finally:
        _stop(proc)


def test_a_hung_engine_process_is_stopped_and_started_again(bentoml_home: Path,
                                                            tmp_path_factory: pytest.TempPathFactory):
    """An engine process that hangs (a deadlock, a GPU that stopped answering; here SIGSTOP) is
    alive to every check: its requests waited for their deadline (504) while /readyz said 200.
    With no progress for CONDGEN_ENGINE_STALL_S it is killed and started again: idle, when it
    does not answer the watchdog's probe (/readyz 503 meanwhile, before any request meets it);
    with work in hand, when it takes no step, its requests getting a 503 that says why."""
    root = tmp_path_factory.mktemp("hung_engines")
    proc, srv = launch_server(bentoml_home, root / "serve.log", {"CONDGEN_ENGINE_STALL_S": "2"})
    hung: list[int] = []
    try:
        wait_ready(proc, srv)
        log = srv.log.read_text(errors="replace")
        idle = _engine_pids(log, "text") + _engine_pids(log, "image")
        assert len(idle) >= 2, log[-3000:]
        for pid in idle:
            hung.append(pid)
            os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + WAIT_S  # found without a request; 503, then back by themselves
        while (log := srv.log.read_text(errors="replace")).count("is back after") < len(idle):
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.25)
        assert "the text engine made no progress for" in log and "the image engine of gan:" in log, srv.log_tail()
        assert log.count("while idle (no answer to a probe) (CONDGEN_ENGINE_STALL_S") == len(idle), srv.log_tail()
        wait_ready(proc, srv)

        log = srv.log.read_text(errors="replace")
        busy = [_engine_pids(log, "text")[-1], _engine_pids(log, "image", "gan:")[-1]]  # the fresh ones, as below
        assert not set(busy) & set(idle), log[-3000:]
        for route, body, pid in (("/complete", {"prompt": "Hi", "max_tokens": 3}, busy[0]),
                                 ("/generate", {"prompt": "a red circle"}, busy[1])):
            hung.append(pid)
            os.kill(pid, signal.SIGSTOP)  # just before its request: idle, the probe would find it first
            started = time.monotonic()
            r = httpx.post(srv.url + route, json=body, timeout=60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
            assert "made no progress for" in r.json()["error"]["message"], r.text  # why, for the client too
            assert "with work in hand" in r.json()["error"]["message"], r.text
            assert time.monotonic() - started < 30  # 2 s of silence, then the watchdog's next looks
            deadline = time.monotonic() + WAIT_S
            while (r := httpx.post(srv.url + route, json=body, timeout=60)).status_code != 200:
                assert r.status_code == 503 and time.monotonic() < deadline, (r.text, srv.log_tail())
                time.sleep(0.25)
        log = srv.log.read_text(errors="replace")
        assert log.count("is back after") >= len(idle) + 2, srv.log_tail()
        assert log.count("with work in hand (CONDGEN_ENGINE_STALL_S") == 2, srv.log_tail()
        assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                   for pid in hung)  # killed, not left hanging beside the fresh ones
        deaths = scrape(httpx.Client(base_url=srv.url, timeout=10))
        assert metric(deaths, "condgen_engine_deaths_total", model="gpt") == 2
        assert metric(deaths, "condgen_engine_deaths_total", model="gan") == 2
    finally:
        for pid in hung:  # one left stopped would hold up the server's graceful stop
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGCONT)
        _stop(proc)
