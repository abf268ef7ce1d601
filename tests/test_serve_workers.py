"""`cnnlab serve --workers N`: forked server processes sharing the port, supervised, each with its forward passes
on its own event loop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab import Classifier, load_dataset
from cnnlab.errors import ConfigError

pytest.importorskip("fastapi", reason="the 'serve' extra is not installed")
pytest.importorskip("uvicorn", reason="the 'serve' extra is not installed")

from test_serve import digit_png, fetch

from cnnlab.serve.batcher import MicroBatcher
from cnnlab.serve.server import RESTART_AFTER_S, run_workers, serve_process

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads workers from /proc (Linux)")


def children(pid: int) -> set[int]:
    """The live child processes of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(p) for p in text.split()}


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def predict_all(url: str, pngs: list[bytes]) -> list[list[float]]:
    """POST every PNG at once from its own thread; the probabilities in order."""
    results: list = [None] * len(pngs)

    def client(i: int) -> None:
        status, body = fetch(url + "/predict", "POST", pngs[i], {"Content-Type": "image/png"})
        results[i] = json.loads(body)["probabilities"] if status == 200 else status

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(pngs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


# ----------------------------------------------------------------------------- the batcher on the event loop


def test_inline_batcher_runs_passes_on_the_loop_thread_with_its_thread_count():
    seen: list[tuple[int, int, int]] = []  # (thread, torch threads, batch size) of each pass
    mine = 1 if torch.get_num_threads() > 1 else 2
    before = torch.get_num_threads()

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.append((threading.get_ident(), torch.get_num_threads(), len(x)))
        if (x == 99).any():
            raise ValueError("bad batch")
        return x.float() * 3

    async def scenario() -> None:
        b = MicroBatcher(forward, max_batch=4, max_wait_ms=50, threads=mine, inline=True)
        await b.start()
        try:
            outs = await asyncio.gather(*(b.submit(torch.full((1, 1), i)) for i in range(6)))
            assert [o.item() for o in outs] == [3 * i for i in range(6)]
            with pytest.raises(ValueError, match="bad batch"):
                await b.submit(torch.full((1, 1), 99))
            assert (await b.submit(torch.ones(1, 1))).item() == 3  # a failed pass does not stop the collector
        finally:
            await b.stop()

    try:
        asyncio.run(scenario())
        loop_thread = threading.get_ident()  # asyncio.run runs the loop on the calling thread
        assert {s[0] for s in seen} == {loop_thread}
        assert {s[1] for s in seen} == {mine}
        assert [s[2] for s in seen] == [4, 2, 1, 1]  # concurrent requests still share passes, at most 4
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the supervisor

WORKER_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from cnnlab.serve.server import run_workers

    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "nofork":
        real_fork, forks = os.fork, []

        def fork():  # the first fork works, the second is refused as a full process table would refuse it
            forks.append(1)
            if len(forks) > 1:
                raise BlockingIOError(11, "Resource temporarily unavailable")
            return real_fork()

        os.fork = fork

    def target():
        (out / str(os.getpid())).write_text("")
        if mode == "fail":
            return False
        if mode == "raise":
            raise RuntimeError("worker broke")
        time.sleep(600)
        return True

    sys.exit(run_workers(target, 2, label="test"))
""")


def start_supervisor(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "workers.py"
    script.write_text(WORKER_SCRIPT)
    out = tmp_path / "pids"
    out.mkdir()
    return subprocess.Popen([sys.executable, str(script), str(out), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("mode, message", [("fail", "exited with code 3 right after its start; stopping"),
                                           ("raise", "exited with code 1 right after its start; stopping"),
                                           ("nofork", "cannot start a worker: Resource temporarily unavailable; "
                                                      "stopping")])
def test_a_worker_that_fails_at_start_stops_the_supervisor(tmp_path, mode, message):
    proc = start_supervisor(tmp_path, mode)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert message in err
    if mode == "raise":
        assert "RuntimeError: worker broke" in err  # the worker's own traceback
    for pid in (int(p.name) for p in (tmp_path / "pids").iterdir()):
        assert not alive(pid)


def test_sigterm_stops_every_worker_and_exits_0(tmp_path):
    proc = start_supervisor(tmp_path, "sleep")
    try:
        wait_for(lambda: len(list((tmp_path / "pids").iterdir())) == 2, what="two workers")
        workers = children(proc.pid)
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 0
    assert not any(alive(pid) for pid in workers)


def test_run_workers_refuses_to_fork_beside_other_threads():
    release = threading.Event()
    t = threading.Thread(target=release.wait)
    t.start()
    try:
        with pytest.raises(ConfigError, match="other threads"):
            run_workers(lambda: True, 2)
    finally:
        release.set()
        t.join()


# ----------------------------------------------------------------------------- cnnlab serve --workers


def test_workers_answer_like_the_python_api_and_a_dead_worker_is_replaced(tiny_run):
    images = load_dataset("mnist", "test", data_dir=tiny_run.data).images
    pngs = [digit_png(images, i) for i in range(16)]
    want = [p["probabilities"] for p in Classifier(model_dir=tiny_run.path).predict(images[:16])]
    with serve_process(tiny_run.path, "--workers", "2") as server:
        started = time.monotonic()
        wait_for(lambda: len(children(server.pid)) == 2, what="two workers")
        first = children(server.pid)
        assert np.allclose(predict_all(server.url, pngs), want, atol=1e-5)

        time.sleep(max(0.0, RESTART_AFTER_S + 0.5 - (time.monotonic() - started)))
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(children(server.pid)) == 2 and victim not in children(server.pid),
                 what="a new worker")
        assert len(children(server.pid) - first) == 1
        assert np.allclose(predict_all(server.url, pngs), want, atol=1e-5)
        workers = children(server.pid)
        health = json.loads(fetch(server.url + "/health")[1])
        assert health["status"] == "ok" and health["workers"] == 2 and health["worker_pid"] in workers
    assert server.proc.returncode == 0  # terminated: the workers finished and the supervisor exited cleanly
    assert f"worker {victim} was killed by signal 9; starting another" in server.log()
    assert "2 worker processes" in server.log()
    assert not any(alive(pid) for pid in workers)


def test_workers_die_with_a_killed_supervisor(tiny_run):
    with serve_process(tiny_run.path, "--workers", "2") as server:
        wait_for(lambda: len(children(server.pid)) == 2, what="two workers")
        workers = children(server.pid)
        server.proc.kill()
        server.proc.wait()
        wait_for(lambda: not any(alive(pid) for pid in workers), what="the workers to end")


def test_worker_threads_and_the_cpu_only_rule(monkeypatch):
    from cnnlab import cli

    before = torch.get_num_threads()
    try:
        assert cli._serve_worker_threads(1, torch.device("cpu")) is None
        with pytest.raises(ConfigError, match="CPU only"):
            cli._serve_worker_threads(2, torch.device("cuda"))
        monkeypatch.setattr("cnnlab.runtime.available_cpus", lambda: 8)
        assert cli._serve_worker_threads(2, torch.device("cpu")) == 4
        assert torch.get_num_threads() == 1  # the supervisor never starts torch's thread pool before forking
        assert cli._serve_worker_threads(3, torch.device("cpu")) == 2
        assert cli._serve_worker_threads(16, torch.device("cpu")) == 1
    finally:
        torch.set_num_threads(before)
