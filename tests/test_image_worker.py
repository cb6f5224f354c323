"""The image worker process, over its pipe, on the event loops the server may run (uvloop
and asyncio): large replies, a failing batch, a worker that fails to load or dies."""
import asyncio
import io
import os
import signal

import pytest
from PIL import Image

from models.image_engine import ImageRequest
from service.image_worker import ImageWorker, WorkerDied, WorkerError
from tests_support import NoiseImageEngine, until

LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(
    not __import__("importlib").util.find_spec("uvloop"), reason="uvloop is not installed"))]


def run(loop: str, coro):
    if loop == "uvloop":
        import uvloop
        return uvloop.run(coro)
    return asyncio.run(coro)


@pytest.fixture
def worker():
    w = ImageWorker(NoiseImageEngine, "unused", "cpu", 1, 64)
    w.wait_started()
    yield w
    w.shutdown()


def batch(prompt: str, requests: int, n: int) -> tuple[list[ImageRequest], list[list[dict]]]:
    reqs = [ImageRequest(prompt=prompt, seed=i, n=n) for i in range(requests)]
    return reqs, [[{"prompt": prompt, "seed": i}] * n for i in range(requests)]


@pytest.mark.parametrize("loop", LOOPS)
def test_replies_larger_than_a_pipe_buffer_arrive_whole(worker, loop):
    """uvloop makes a watched descriptor non-blocking: reading a reply that had not fully
    arrived failed half-way, and the server took its worker for dead."""
    async def two_batches():
        return await asyncio.gather(worker.generate_pngs(*batch("a", 2, 16)), worker.generate_pngs(*batch("b", 1, 16)))
    first, second = run(loop, two_batches())
    pngs = [png for request in first + second for png in request]
    assert len(pngs) == 48 and sum(map(len, pngs)) > 2**21  # replies of over 1 MB: far past a pipe's buffer
    assert all(Image.open(io.BytesIO(png)).size == (128, 128) for png in pngs)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_failing_batch_fails_its_requests_not_the_worker(worker, loop):
    async def fail_then_succeed():
        with pytest.raises(WorkerError, match="ValueError: this batch fails"):
            await worker.generate_pngs(*batch("fail", 1, 1))
        return await worker.generate_pngs(*batch("ok", 1, 2))
    assert len(run(loop, fail_then_succeed())[0]) == 2
    assert worker.failure is None


def test_a_worker_that_cannot_load_names_the_error():
    w = ImageWorker(NoiseImageEngine, "missing", "cpu", 1, 64)
    with pytest.raises(WorkerError, match="ArtifactError: missing/model.safetensors"):
        w.wait_started()
    assert not w.alive
    w.shutdown()


def test_a_worker_whose_load_hangs_is_killed_after_the_start_timeout():
    """wait_started waited forever: the service never became ready, never recorded a failure,
    and /livez stayed 200 (the text engine's process already had a timeout)."""
    w = ImageWorker(NoiseImageEngine, "hang", "cpu", 1, 64)
    with pytest.raises(WorkerDied, match="did not start within 2 s"):
        w.wait_started(timeout_s=2)
    assert not w.alive and not w._proc.is_alive()
    w.shutdown()


def test_an_idle_worker_that_dies_is_seen_dead_without_a_batch(worker):
    assert worker.alive
    os.kill(worker._proc.pid, signal.SIGKILL)
    worker._proc.join(timeout=5)
    assert not worker.alive  # what /readyz and /livez read: no request has to fail first
    assert worker.failure == f"the image worker exited (code {-signal.SIGKILL})"  # the 503s' reason


def test_a_dead_worker_fails_the_batch_in_flight_and_the_next(worker):
    async def kill_mid_batch():
        pending = asyncio.ensure_future(worker.generate_pngs(*batch("a", 4, 16)))
        await asyncio.sleep(0)  # the batch is sent
        os.kill(worker._proc.pid, signal.SIGKILL)
        with pytest.raises(WorkerDied):
            await pending
        with pytest.raises(WorkerDied):
            await worker.generate_pngs(*batch("b", 1, 1))
    asyncio.run(kill_mid_batch())


@pytest.mark.parametrize("in_a_thread", [False, True])
def test_a_batch_in_flight_at_shutdown_fails_instead_of_waiting_forever(worker, in_a_thread):
    """Shutdown stopped reading replies with a batch in flight, whose caller then waited
    forever; the server detaches on the loop and stops the process in a thread."""
    async def shut_down_mid_batch():
        pending = asyncio.ensure_future(worker.generate_pngs(*batch("a", 4, 16)))
        await asyncio.sleep(0)  # the batch is sent
        if in_a_thread:
            worker.detach()
            await asyncio.to_thread(worker.shutdown)
        else:
            worker.shutdown()
        with pytest.raises(WorkerDied, match="shut down"):
            await asyncio.wait_for(pending, timeout=10)
        assert not worker.alive
    asyncio.run(shut_down_mid_batch())


def test_a_request_larger_than_max_images_runs_in_several_passes():
    """CONDGEN_IMAGE_MAX_BATCH bounds a forward pass, also for one request of more images
    (it used to run a request of n = 16 in one pass whatever the setting)."""
    w = ImageWorker(NoiseImageEngine, "unused", "cpu", 1, 4)
    w.wait_started()
    try:
        reqs = [ImageRequest(prompt="count", seed=0, n=16), ImageRequest(prompt="count", seed=50, n=3)]
        pngs = asyncio.run(w.generate_pngs(reqs, [[{}] * 16, [{}] * 3]))
    finally:
        w.shutdown()
    assert [len(p) for p in pngs] == [16, 3]
    per_pass = [Image.open(io.BytesIO(png)).getpixel((0, 0))[0] for p in pngs for png in p]
    assert per_pass == [4] * 16 + [3] * 3


@pytest.mark.parametrize("loop", LOOPS)
def test_a_death_seen_from_another_thread_wakes_the_batch_on_the_loop(loop):
    """The health checks and the engine watchdog read `alive` on their own threads: the death
    they saw was handled there, resolving the loop's futures from the wrong thread, and the
    batch waiting on the loop slept until something else woke it."""
    import multiprocessing as mp
    import threading
    import time

    class DeadProc:  # the child has just died (killed for memory, say); its EOF not yet read
        exitcode = -9

        def is_alive(self):
            return False

        def join(self, timeout=None):
            pass

    w = ImageWorker.__new__(ImageWorker)
    w._conn, child_end = mp.Pipe()
    w._proc, w._pending, w._sent, w._loop, w.failure = DeadProc(), {}, 0, None, None
    w._stopped_because, w._progress_at, w._probed_at = None, 0.0, None

    async def main():
        batch = asyncio.ensure_future(w.generate_pngs([], []))
        await asyncio.sleep(0.05)
        threading.Thread(target=lambda: w.alive).start()
        start = time.monotonic()
        done, _ = await asyncio.wait({batch}, timeout=3)
        return batch in done and isinstance(batch.exception(), WorkerDied), time.monotonic() - start

    woken, waited = run(loop, main())
    child_end.close()
    assert woken and waited < 1, waited


def test_a_program_that_forgets_shutdown_still_exits(tmp_path):
    """multiprocessing's exit handler waited forever on the worker, which ignores SIGTERM and
    waits on a pipe the exiting program still holds; EngineProcess had an atexit shutdown."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("from service.image_worker import ImageWorker\nfrom tests_support import NoiseImageEngine\n"
            "if __name__ == '__main__':\n"
            "    w = ImageWorker(NoiseImageEngine, 'unused', 'cpu', 1, 4)\n    w.wait_started()\n")
    script = tmp_path / "forgets.py"
    script.write_text(code)
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": f"{here.parent}{os.pathsep}{here}"}
    done = subprocess.run([sys.executable, str(script)], env=env, timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_hung_worker_is_stuck_while_it_holds_a_batch_or_a_probe_and_stopping_it_fails_the_batch(worker):
    """A worker that hangs stays alive: the server's watchdog (service/engines.py) probes it,
    reads `seconds_stuck` and kills it with `stop_stuck`. A hung worker is stuck from its first
    batch, or idle from the probe it does not answer, before it has met an event loop too; one
    that answers again is not."""
    def answered(probed_at: float) -> bool:
        """The probe sent at `probed_at` answered: the next `probe` reads it and sends another."""
        worker.probe()
        return worker._probed_at is None or worker._probed_at > probed_at

    async def main():
        os.kill(worker.pid, signal.SIGSTOP)  # hung while idle
        await asyncio.sleep(0.3)
        assert worker.seconds_stuck() == 0.0  # nothing asked of it yet
        worker.probe()  # on the watchdog's own pipe: no event loop needed
        await asyncio.sleep(1.0)
        probed_at = worker._probed_at
        worker.probe()  # one probe out at a time
        assert worker._probed_at == probed_at and 0.95 < worker.seconds_stuck() < 5  # from the probe
        assert worker._loop is None
        early = asyncio.ensure_future(worker.generate_pngs(*batch("a", 1, 1)))  # no fresh start: the probe
        await asyncio.sleep(0.3)
        assert 1.25 < worker.seconds_stuck() < 6  # from the probe it has not answered, not from the batch
        os.kill(worker.pid, signal.SIGCONT)  # it answers again
        assert len((await asyncio.wait_for(early, timeout=60))[0]) == 1
        await until(lambda: answered(probed_at), "the answer to the probe sent while it hung")
        healthy = worker._probed_at
        await until(lambda: answered(healthy), "the idle worker's answer")

        os.kill(worker.pid, signal.SIGSTOP)  # hung (a probe just out: its clock would start about now too)
        worker._progress_at -= 100  # its last reply, long ago
        first = asyncio.ensure_future(worker.generate_pngs(*batch("b", 1, 1)))
        await asyncio.sleep(0.3)
        second = asyncio.ensure_future(worker.generate_pngs(*batch("c", 1, 1)))  # the clock goes on
        await asyncio.sleep(0.3)
        assert 0.5 < worker.seconds_stuck() < 5  # from the first batch, not the last reply nor the latest batch
        os.kill(worker.pid, signal.SIGCONT)
        assert [len((await asyncio.wait_for(p, timeout=60))[0]) for p in (first, second)] == [1, 1]
        assert worker.seconds_stuck() == 0.0

        os.kill(worker.pid, signal.SIGSTOP)
        pending = asyncio.ensure_future(worker.generate_pngs(*batch("d", 1, 1)))
        await asyncio.sleep(0.3)
        worker._proc.kill = lambda: None  # a kill that has not taken yet (a process inside a GPU driver's call)
        worker.stop_stuck("the image engine made no progress for 0 s")
        assert not worker.alive and worker.seconds_stuck() == 0.0  # dead at once
        assert worker.down_because == "the image engine made no progress for 0 s"  # before the loop has run
        with pytest.raises(WorkerDied, match="made no progress"):  # fails, with the reason, without the pipe
            await asyncio.wait_for(pending, timeout=2)
        del worker._proc.kill  # shutdown() kills it for real
    asyncio.run(main())


def test_the_worker_answers_a_probe_from_the_loop_that_runs_its_batches(worker):
    """A probe must show a stuck batch loop: a helper thread that answered would answer while
    the loop hangs. Sent while a batch runs, it is answered only after the batch."""
    async def main():
        running = asyncio.ensure_future(worker.generate_pngs(*batch("slow", 1, 1)))
        await asyncio.sleep(0.3)  # the batch has begun
        worker._probes.send(("ping", 0, None))  # by hand: `probe` sends none to a busy worker
        assert not worker._probes.poll(0.5)  # no answer while the batch runs
        await asyncio.wait_for(running, timeout=30)
        assert worker._probes.poll(5)  # then the answer
    asyncio.run(main())
