"""Fixtures for the service tests: a model store with tiny trained models, and one real server.

The store is filled by the real training jobs (`--preset tiny`, seconds each) in a temporary
BENTOML_HOME; `bentoml serve service.app:Generation` then runs as a subprocess on a free
loopback port, once per test session, and is shut down at the end. Set
CONDGEN_TEST_BENTOML_HOME to an existing store to skip training (handy while iterating).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 180
CHAT_TEMPLATE = REPO / "docs" / "chat_template.jinja"  # the README's example


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(jobs: list[list[str]], env: dict[str, str], logs: Path) -> None:
    """Run the training jobs side by side (each takes seconds); fail with the log of any that fails."""
    running = []
    for args in jobs:
        log = logs / f"{args[0]}.log"
        with open(log, "w") as fh:
            running.append((args, log, subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env,
                                                        stdout=fh, stderr=subprocess.STDOUT)))
    for args, log, proc in running:
        try:
            code = proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        if code != 0:
            raise RuntimeError(f"`python -m {' '.join(args)}` failed ({code}):\n" + log.read_text()[-3000:])


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BENTOML_HOME holding `gpt`, `gan` and `ar_image`, trained by the real jobs with --preset tiny."""
    if preset := os.environ.get("CONDGEN_TEST_BENTOML_HOME"):
        return Path(preset)
    root = tmp_path_factory.mktemp("store")
    home = root / "bentoml_home"
    env = {**os.environ, "BENTOML_HOME": str(home)}
    _train([["training.train_gpt", "--preset", "tiny", f"--run_dir={root / 'runs' / 'gpt'}"],
            ["training.train_gan", "--preset", "tiny", f"--out={root / 'runs' / 'gan'}"],
            ["training.train_ar_image", "--preset", "tiny", f"--out={root / 'runs' / 'ar_image'}"]], env, root)
    return home


@dataclass
class Server:
    url: str
    log: Path
    pid: int  # `bentoml serve`; its engine processes are among its descendants

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


@pytest.fixture(scope="session")
def server(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`bentoml serve` as a real subprocess, with the example chat template (so that
    /v1/chat/completions exists); yields once /readyz answers 200."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    proc, srv = launch_server(bentoml_home, log, {"CONDGEN_CHAT_TEMPLATE": str(CHAT_TEMPLATE)})
    try:
        wait_ready(proc, srv)
        yield srv
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# ---- more servers, for the reliability tests ------------------------------------------------

API_KEY = "test-key-0123456789"
CORS_ORIGIN = "http://allowed.example"
GUARDED_MAX_INFLIGHT = 4


def private_home(home: Path, where: Path) -> Path:
    """A BENTOML_HOME of its own that shares `home`'s model store. BentoML keeps per-server
    state there (the Prometheus multiprocess directory, wiped when a server starts), so two
    servers on one BENTOML_HOME would erase each other's metrics."""
    where.mkdir(parents=True, exist_ok=True)
    if not (where / "models").exists():
        (where / "models").symlink_to(home / "models", target_is_directory=True)
    return where


def launch_server(home: Path, log: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen, Server]:
    """Start `bentoml serve` on a free port with extra environment, in a BENTOML_HOME of its
    own over the same models; does not wait."""
    port = free_port()
    home = private_home(home, log.parent / "bentoml_home")
    env = {**os.environ, "BENTOML_HOME": str(home), "CONDGEN_BATCH_WAIT_MS": "20", **env_extra}
    with open(log, "w") as fh:
        # Its own session (process group), so that shutting down reaches the workers too.
        proc = subprocess.Popen([str(BIN / "bentoml"), "serve", "service.app:Generation",
                                 "--host", "127.0.0.1", "--port", str(port)],
                                cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, Server(f"http://127.0.0.1:{port}", log, proc.pid)


def wait_ready(proc: subprocess.Popen, srv: Server) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{srv.log_tail()}")
        if "loading the models failed" in srv.log.read_text(errors="replace"):
            raise RuntimeError(f"the service could not load its models:\n{srv.log_tail(8000)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"/readyz not 200 after {READY_TIMEOUT_S}s:\n{srv.log_tail()}")
        try:
            if httpx.get(f"{srv.url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)


@dataclass
class GuardedServer:
    """A second server with an API key, one CORS origin, small limits (4 requests in
    flight, 4 queued images, 2 queued completions, 2 s for a request body) and the optional AR
    image model turned off."""
    server: Server
    proc: subprocess.Popen
    key: str = API_KEY

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(scope="module")  # module: its last test shuts it down with SIGTERM
def guarded_server(bentoml_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuardedServer]:
    log = tmp_path_factory.mktemp("guarded") / "serve.log"
    proc, srv = launch_server(bentoml_home, log, {
        "CONDGEN_API_KEY": API_KEY, "CONDGEN_CORS_ORIGINS": CORS_ORIGIN,
        "CONDGEN_MAX_INFLIGHT": str(GUARDED_MAX_INFLIGHT), "CONDGEN_MAX_QUEUE": "4",
        "CONDGEN_TEXT_MAX_WAITING": "2", "CONDGEN_RETRY_AFTER": "2", "AR_IMAGE_MODEL": "",
        "CONDGEN_BODY_TIMEOUT_S": "2"})
    try:
        wait_ready(proc, srv)
        yield GuardedServer(srv, proc)
    finally:
        _stop(proc)
