"""Micro-batching: requests that arrive within a few milliseconds of each other share one forward pass.

Each request puts its images (uint8 [n, C, H, W], already the training shape) on a queue with a future and
wakes the collector. One collector task takes the first waiting request, runs the model once on it and
whatever else is queued (up to ``max_batch`` images) in a worker thread (so the event loop keeps accepting and
decoding requests meanwhile), and hands each request its rows of the result. A request that finds the model
idle waits up to ``max_wait_ms`` for company; requests that queued up while a pass ran go into the next pass
at once, so under load batches form by themselves and the model works while the next requests are decoded.
With ``inline``, the pass runs on the event loop's thread instead (for servers of several processes).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..runtime import available_cpus


@dataclass
class BatchStats:
    """Counters since start-up (read by /health, tests and the load benchmark)."""

    requests: int = 0
    images: int = 0
    forward_passes: int = 0
    largest_batch: int = 0
    busy_seconds: float = 0.0  # time spent inside forward passes

    def as_dict(self) -> dict:
        mean = self.images / self.forward_passes if self.forward_passes else 0.0
        return {"requests": self.requests, "images": self.images, "forward_passes": self.forward_passes,
                "mean_batch": round(mean, 2), "largest_batch": self.largest_batch,
                "busy_seconds": round(self.busy_seconds, 3)}


def forward_threads(cpus: int | None = None, torch_threads: int | None = None) -> int:
    """Intra-op threads for the forward passes: torch's setting, but at most one fewer than the CPUs.

    The event loop decodes and answers requests on one core while the model runs, so a forward pass spread over
    every core makes its threads wait on one another whenever the loop holds one of their cores (OpenMP's
    waiting threads spin, charging CPU time for nothing); one core left to the loop keeps both busy.
    """
    cpus = available_cpus() if cpus is None else cpus
    torch_threads = torch.get_num_threads() if torch_threads is None else torch_threads
    return max(1, min(torch_threads, cpus - 1))


def _set_thread_count(n: int) -> None:
    """Give the calling thread ``n`` torch intra-op threads."""
    # torch sets up a thread's count from its process-wide default at the thread's first query, overwriting an
    # earlier set_num_threads: query first.
    torch.get_num_threads()
    torch.set_num_threads(n)


class MicroBatcher:
    """Gathers concurrent requests into batches for ``forward``.

    Args:
        forward: Maps uint8 images [N, C, H, W] to N results (a tensor [N, ...] or a list of N rows); runs in
            one worker thread. Each request gets its slice of them.
        max_batch: Most images in one forward pass (a single larger request still runs, alone).
        max_wait_ms: How long a request that finds the model idle waits for company (requests that queued
            while a forward pass ran go into the next pass at once).
        threads: torch intra-op threads of the worker thread (None: `forward_threads`). torch's thread count is
            per thread once set, so the caller's own threads keep theirs. With ``inline``: the event loop
            thread's count, set at `start` (None: the count torch has now).
        inline: Run ``forward`` on the event loop's own thread, with the process's torch threads. The loop then
            waits during each pass, but the pass never waits for the loop: with a worker thread, each of a pass's
            calls into torch hands the GIL back and forth with the loop decoding the next requests. For a server
            of several processes, each with one core (`serve_forever`'s ``workers``).
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], max_batch: int = 64,
                 max_wait_ms: float = 5.0, threads: int | None = None, inline: bool = False):
        self.forward = forward
        self.max_batch = max(1, int(max_batch))
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.inline = inline
        if threads is None:
            threads = torch.get_num_threads() if inline else forward_threads()
        self.threads = max(1, int(threads))
        self.stats = BatchStats()
        # A deque and one Event instead of an asyncio.Queue: a put and a timed get on a Queue cost a future, a
        # task and a timer per request; here a request costs an append and a set.
        self._queue: deque[tuple[torch.Tensor, asyncio.Future]] | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._carry: tuple[torch.Tensor, asyncio.Future] | None = None  # taken but did not fit the last batch

    async def start(self) -> None:
        """Start the collector on the running event loop."""
        self._queue, self._wake = deque(), asyncio.Event()
        if self.inline:
            _set_thread_count(self.threads)
        else:
            await self._start_pool()
        self._task = asyncio.create_task(self._run(), name="cnnlab-batcher")

    async def _start_pool(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnlab-forward",
                                        initializer=_set_thread_count, initargs=(self.threads,))
        # Setting a thread's count also makes it torch's default for threads started later: start the worker
        # now and give the default back, so only the worker runs with its own count.
        mine = torch.get_num_threads()
        await asyncio.get_running_loop().run_in_executor(self._pool, int)
        torch.set_num_threads(mine)

    async def stop(self) -> None:
        """Stop collecting; requests still waiting get an error instead of hanging."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        waiting = [self._carry] if self._carry else []
        while self._queue:
            waiting.append(self._queue.popleft())
        for _, fut in waiting:
            if not fut.done():
                fut.set_exception(RuntimeError("server is shutting down"))
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._task = self._pool = self._carry = None

    async def submit(self, images: torch.Tensor):
        """The forward result for ``images`` [n, C, H, W] (its n rows of ``forward``'s result), computed together
        with whatever else is waiting."""
        if self._queue is None or self._task is None or self._task.done():
            raise RuntimeError("batcher is not running")
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((images, fut))
        self._wake.set()
        return await fut

    async def _next(self, deadline: float | None) -> tuple[torch.Tensor, asyncio.Future] | None:
        """The next queued request, waiting for one until ``deadline`` (loop time; None: for ever), or None."""
        while not self._queue:
            self._wake.clear()
            if deadline is None:
                await self._wake.wait()
                continue
            if deadline <= asyncio.get_running_loop().time():
                return None
            try:
                async with asyncio.timeout_at(deadline):
                    await self._wake.wait()
            except TimeoutError:
                return None
        return self._queue.popleft()

    async def _gather(self) -> list[tuple[torch.Tensor, asyncio.Future]]:
        # Requests that queued up while the last forward pass ran have waited already: they go at once, with
        # whatever else is queued, so the next pass overlaps with the decoding of the requests still arriving
        # (waiting for them would let the model and the event loop take turns instead of working together).
        # Only a request that finds the model idle waits up to max_wait for company.
        first, self._carry = self._carry or (self._queue.popleft() if self._queue else None), None
        busy = first is not None
        if first is None:
            first = await self._next(None)
        items, count = [first], first[0].shape[0]  # shape[0]: len() of a tensor is a Python-level call
        deadline = asyncio.get_running_loop().time() + (0.0 if busy else self.max_wait)
        while count < self.max_batch:
            # Take what is already queued without waiting, then wait out the rest of the window.
            item = await self._next(deadline)
            if item is None:
                break
            if count + item[0].shape[0] > self.max_batch:
                self._carry = item  # it opens the next batch, so it cannot be overtaken for ever
                break
            items.append(item)
            count += item[0].shape[0]
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._gather()
            items = [(x, f) for x, f in items if not f.cancelled()]  # clients that hung up
            if not items:
                continue
            batch = torch.cat([x for x, _ in items])
            t0 = time.perf_counter()
            try:
                out = (self.forward(batch) if self._pool is None else
                       await loop.run_in_executor(self._pool, self.forward, batch))
            except (Exception, asyncio.CancelledError) as e:  # every waiter hears of it, none hangs
                for _, f in items:
                    if not f.done():
                        f.set_exception(e if isinstance(e, Exception) else RuntimeError("server is shutting down"))
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue  # a failed batch does not stop the collector
            finally:
                self.stats.busy_seconds += time.perf_counter() - t0
            self.stats.forward_passes += 1
            self.stats.requests += len(items)
            self.stats.images += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            start = 0
            for x, f in items:
                n = x.shape[0]
                if not f.done():
                    f.set_result(out[start:start + n])
                start += n
