"""Running the app with uvicorn: in the foreground (``cnnlab serve``) or in a background thread (tests, benchmarks).

Connections are guarded against slow or idle clients (see `ConnectionLimits`): uvicorn times out idle
keep-alive connections, but not a connection that never finishes sending a request head, and it accepts
connections until the process runs out of file descriptors. `guarded_protocol` adds a deadline for the
request head and a connection cap that drops the longest-waiting connection without a complete head to make
room, so a crowd of half-open connections cannot lock out real clients (or `/health`). The HTTP parser is
httptools (C) when it is installed, else h11 (pure Python); both carry the same guards. The event loop is
uvloop (libuv, C) when it is installed, else asyncio's own (uvicorn's 'auto'); the guards, timers and the
batcher's hand-offs use only the loop API both provide. `serve_forever` can serve from several forked
worker processes that share the listening socket (`run_workers`).
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, ClassVar

from ..errors import ConfigError

HEAD_TIMEOUT_S = 10.0  # a connection must send a complete request head within this (else it is closed)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
MAX_HEAD_BYTES = 16 * 1024  # request line + headers; a larger head is a 400
# asyncio accepts up to `backlog` connections per event-loop turn, and a connection closed to make room frees
# its descriptor a turn or two later: keeping a few batches' worth of descriptors free (plus a margin for
# logs, the listening socket and the model's files) means accept() never meets the open-file limit.
ACCEPT_BATCH = 64  # uvicorn's backlog: the listen queue and the accepts per event-loop turn
FD_RESERVE = 32 + 4 * ACCEPT_BATCH


# A key of the ASGI scope, set (True) once the whole request body is in the server's buffer: the app's first
# receive() then returns it at once, so it needs no deadline for the body (httptools protocol only).
BODY_RECEIVED = "cnnlab.body_received"


SERVE_MMAP_THRESHOLD = 1 << 20  # bytes: image buffers above this are mapped alone and unmapped when freed
SERVE_TRIM_THRESHOLD = 32 << 20  # bytes of free heap top a malloc arena may keep


def bound_allocator() -> bool:
    """Make glibc malloc give large freed blocks back to the kernel, for a server whose memory must stay bounded.

    The CLI's `tune_allocator` keeps freed memory for training's reuse; a server decodes images of any size in
    several threads, and each thread's arena would keep its share. Fixed thresholds (which also switch off
    glibc's adaptive mmap threshold) map each image buffer on its own and unmap it when freed. No-op (False) off
    Linux/glibc or with ``CNNLAB_MALLOC=system``.
    """
    import ctypes

    from ..runtime import _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD

    if os.environ.get("CNNLAB_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, SERVE_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                  SERVE_TRIM_THRESHOLD))


def default_max_connections() -> int:
    """At most 1000 connections, and fewer than this process may open files (so accept() never fails)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1000
    return max(8, min(1000, soft - FD_RESERVE))


HTTP_PROTOCOLS = ("auto", "httptools", "h11")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")  # uvicorn's names; 'auto': uvloop when it is installed


def _importable(module: str) -> bool:
    """Whether ``module`` imports (an import, not only a lookup: a broken install counts as missing)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def httptools_available() -> bool:
    """Whether the C HTTP parser (the 'httptools' package) can be imported."""
    return _importable("httptools")


def uvloop_available() -> bool:
    """Whether the libuv event loop (the 'uvloop' package) can be imported: uvicorn's 'auto' loop then uses it."""
    return _importable("uvloop")


def check_loop(loop: str) -> str:
    """``loop`` if it names an event loop this machine has (see `EVENT_LOOPS`), else ConfigError in one line."""
    if loop not in EVENT_LOOPS:
        raise ConfigError(f"unknown event loop {loop!r}; expected one of: {', '.join(EVENT_LOOPS)}")
    if loop == "uvloop" and not uvloop_available():
        raise ConfigError("the uvloop event loop is not installed (pip install uvloop)")
    return loop


@dataclass(frozen=True)
class ConnectionLimits:
    """How the server treats connections.

    Attributes:
        max_connections: Open connections at most; beyond it the oldest connection still waiting for its
            request head is closed (or the new one, when every connection is busy with a request).
        head_timeout: Seconds a connection may take to send a complete request head (from connecting, or
            from the end of its previous response).
        keep_alive: Seconds an idle keep-alive connection is kept.
        max_head_bytes: Most bytes of a request head (request line and headers) buffered while it is still
            incomplete (400 beyond).
        http: The HTTP parser: 'httptools' (C; HTTP/1.0 keep-alive too), 'h11' (pure Python) or 'auto'
            (httptools when it is installed).
    """

    max_connections: int = 0  # 0: `default_max_connections()`
    head_timeout: float = HEAD_TIMEOUT_S
    keep_alive: int = KEEP_ALIVE_S
    max_head_bytes: int = MAX_HEAD_BYTES
    http: str = "auto"

    def __post_init__(self):
        if self.http not in HTTP_PROTOCOLS:
            raise ConfigError(f"unknown HTTP protocol {self.http!r}; expected one of: {', '.join(HTTP_PROTOCOLS)}")
        if self.http == "httptools" and not httptools_available():
            raise ConfigError("the httptools HTTP parser is not installed (pip install httptools)")

    def resolved(self) -> ConnectionLimits:
        """These limits with the default connection cap filled in."""
        if self.max_connections:
            return self
        return replace(self, max_connections=default_max_connections())


class _Guards:
    """The connection guards, mixed into a uvicorn HTTP protocol class (see `guarded_protocol`).

    A connection is *waiting* from when it connects, or finishes a response, until its next request head is
    complete; a waiting connection is closed at its head deadline, or to make room when the cap is reached.
    Subclasses call `_await_head` / `_head_received` at those moments.
    """

    limits: ClassVar[ConnectionLimits]
    waiting: ClassVar[dict]  # connections without a complete request head, oldest first (a dict keeps order)
    dropped: ClassVar[int]  # connections closed for being slow or to make room

    def _guard_new_connection(self) -> None:
        self._head_timer = None
        self._head_deadline = 0.0
        self._head_bytes = 0
        self._await_head()
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def _make_room(self) -> None:
        oldest = next((c for c in self.waiting if c is not self), self)
        type(self).dropped += 1
        oldest._drop()

    def _await_head(self) -> None:
        # One timer per connection rather than one per request (a kept-alive connection answers many requests
        # within one head timeout): armed when none is pending; when it fires it closes the connection if it is
        # waiting past its deadline, waits on if the deadline has moved, and lapses if a request is being answered.
        self._head_deadline = self.loop.time() + self.limits.head_timeout
        self.waiting[self] = None
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_deadline, self._head_timed_out)

    def _head_received(self) -> None:
        self.waiting.pop(self, None)

    def _forget(self) -> None:
        """The connection is closed: no longer waiting, and no timer for it."""
        self._head_received()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self not in self.waiting:
            return  # answering a request: its response's end arms a new timer
        if self.loop.time() < self._head_deadline:
            self._head_timer = self.loop.call_at(self._head_deadline, self._head_timed_out)
            return
        type(self).dropped += 1
        self._drop()

    def _drop(self) -> None:
        self._forget()
        if not self.transport.is_closing():
            self.transport.close()


def guarded_h11(limits: ConnectionLimits) -> type:
    """uvicorn's h11 protocol with a request-head deadline and a connection cap (a new class per server, so
    servers in one process do not share their list of waiting connections).

    h11 closes every HTTP/1.0 connection after its response, keep-alive asked or not; `guarded_httptools`
    keeps them open."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(_Guards, H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._guard_new_connection()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._head_received()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._await_head()  # before super(): it may start a pipelined request at once
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._forget()
            super().connection_lost(exc)

    GuardedH11Protocol.limits, GuardedH11Protocol.waiting, GuardedH11Protocol.dropped = limits.resolved(), {}, 0
    return GuardedH11Protocol


KEEP_ALIVE_HEADER = (b"connection", b"keep-alive")


class CoalescedWrites:
    """Stands in for the transport of one request/response cycle so that a response's head and its body leave
    in one send() (uvicorn writes them separately: two system calls, and two TCP segments to the client).

    The first write (the head, or a 100 Continue) is held until the next write or the end of the event-loop
    turn, whichever comes first; everything else goes straight through, in order.
    """

    __slots__ = ("_transport", "_loop", "_held", "_first")

    def __init__(self, transport, loop):
        self._transport, self._loop, self._held, self._first = transport, loop, None, True

    def write(self, data: bytes) -> None:
        if self._first:
            self._first, self._held = False, data
            self._loop.call_soon(self.flush)
            return
        if self._held is not None:
            data, self._held = self._held + data, None
        self._transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def guarded_httptools(limits: ConnectionLimits) -> type:
    """uvicorn's httptools protocol (a C parser) with the guards of `guarded_h11`, a cap on the bytes of an
    incomplete request head (400 beyond ``limits.max_head_bytes``, as h11's limit), HTTP/1.0 keep-alive, and
    each response's head and body written together (`CoalescedWrites`).

    An HTTP/1.0 client that sends ``Connection: keep-alive`` (ApacheBench's -k, some proxies) is answered
    with ``connection: keep-alive`` and the connection stays open; uvicorn itself closes every HTTP/1.0
    connection, so such a client would pay a new TCP connection per request. Every response of this app
    carries a Content-Length, which an HTTP/1.0 client needs to find the end of a kept-alive response.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(_Guards, HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            self._messages, self._in_head, self._in_body = 0, False, False  # the parser's position
            super().connection_made(transport)
            self._guard_new_connection()

        def data_received(self, data: bytes) -> None:
            # The parser keeps an incomplete head (a header's value, say) in memory, so its size is capped as
            # h11 caps it. A read's bytes count towards a head when the read went on with that head or began
            # with it; a head that begins after other bytes of a read counts from the next read (so the
            # memory held is the cap plus one read at most, and a body before a head is never counted).
            messages, in_head, in_body = self._messages, self._in_head, self._in_body
            super().data_received(data)
            if not self._in_head or self.transport.is_closing():
                return
            if self._messages == messages:
                self._head_bytes += len(data)
            elif self._messages == messages + 1 and not in_head and not in_body:
                self._head_bytes = len(data)
            else:
                self._head_bytes = 0
            if self._head_bytes > self.limits.max_head_bytes:
                self._head_received()
                self.send_400_response("Request head too large.")

        def on_message_begin(self) -> None:
            self._messages, self._in_head, self._head_bytes = self._messages + 1, True, 0
            super().on_message_begin()

        def on_message_complete(self) -> None:
            self._in_body = False
            if self.cycle is not None:  # the app may read the body without arming a timeout (see BODY_RECEIVED)
                self.cycle.scope[BODY_RECEIVED] = True
            super().on_message_complete()

        def on_headers_complete(self) -> None:
            self._in_head, self._in_body = False, True
            self._head_received()
            before = self.cycle
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is before:  # an upgrade request: no cycle was made
                return
            cycle.transport = CoalescedWrites(self.transport, self.loop)
            if self.scope["http_version"] == "1.0" and self.parser.should_keep_alive():
                cycle.keep_alive = True
                cycle.default_headers = [*cycle.default_headers, KEEP_ALIVE_HEADER]

        def on_response_complete(self) -> None:
            # A pipelined request whose head has already arrived starts now (in super()): nothing to wait for.
            if not self.transport.is_closing() and not self.pipeline:
                self._await_head()
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._forget()
            super().connection_lost(exc)

    GuardedHttpToolsProtocol.limits = limits.resolved()
    GuardedHttpToolsProtocol.waiting, GuardedHttpToolsProtocol.dropped = {}, 0
    return GuardedHttpToolsProtocol


def guarded_protocol(limits: ConnectionLimits) -> type:
    """The guarded protocol class ``limits.http`` names ('auto': httptools when it is installed, else h11)."""
    if limits.http == "httptools" or (limits.http == "auto" and httptools_available()):
        return guarded_httptools(limits)
    return guarded_h11(limits)


def uvicorn_config(app, limits: ConnectionLimits | None = None, loop: str = "auto", **kw):
    """A uvicorn Config for ``app`` with the connection guards of ``limits`` on the event loop ``loop`` (see
    `EVENT_LOOPS`; others: uvicorn's keywords)."""
    import uvicorn

    limits = (limits or ConnectionLimits()).resolved()
    # limit_concurrency is left off on purpose: uvicorn counts idle connections towards it and would answer
    # /health 503 while half-open connections wait for their deadline; the cap above evicts those instead.
    return uvicorn.Config(app, http=guarded_protocol(limits), loop=check_loop(loop),
                          timeout_keep_alive=limits.keep_alive, h11_max_incomplete_event_size=limits.max_head_bytes,
                          backlog=ACCEPT_BATCH, access_log=False, **kw)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port), or ConfigError in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve_forever(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  limits: ConnectionLimits | None = None, workers: int = 1) -> int:
    """Serve ``app`` until interrupted (Ctrl-C / SIGTERM); the exit code.

    With ``workers`` > 1 the app is served by that many forked copies of this process, which share the listening
    socket (see `run_workers`). Each copy has the app's model already loaded (pages shared with this process);
    build the app for that (``create_app(..., workers=N)``, one torch thread per core and worker).
    """
    import uvicorn

    bound_allocator()
    sock = bind_socket(host, port)
    config = uvicorn_config(app, limits, log_level=log_level, timeout_graceful_shutdown=5)

    def serve() -> bool:
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
        return server.started

    if workers <= 1:
        return 0 if serve() else STARTUP_FAILED
    return run_workers(serve, workers)


STARTUP_FAILED = 3  # a worker's exit code when its server did not start (uvicorn's own code for that)
RESTART_AFTER_S = 1.0  # a worker that dies sooner after its start is not replaced: its copy would die the same way
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_workers(target: Callable[[], bool], workers: int, label: str = "cnnlab serve") -> int:
    """Run ``target`` in ``workers`` forked processes until this process gets SIGINT or SIGTERM; the exit code.

    A prefork supervisor, as gunicorn's: the signal is passed on to the workers (SIGTERM: each finishes its
    requests), and their ends are awaited. A worker that ends while no stop was asked for is replaced by a new
    fork, unless it ended within `RESTART_AFTER_S` of its start or ``target`` returned False (did not start):
    then every worker is stopped and the code is 1. Forking needs a process that runs no other thread, as this
    one when it only loaded the model; each worker dies with this process (Linux), so none is left behind even
    when the supervisor is killed.

    Not uvicorn's own supervisor (``--workers``): it starts fresh interpreters and pickles its Config to them,
    and ours holds an app object and protocol classes built per `ConnectionLimits`, which do not pickle; each
    worker would also import torch and load the model again. A fork inherits all of it, loaded once.
    """
    if threading.active_count() > 1:  # a fork copies one thread: another thread's locks would stay held for ever
        raise ConfigError("cannot fork workers: this process already runs other threads")
    parent = os.getpid()
    running: dict[int, float] = {}  # pid -> its start (monotonic)
    state = {"stopping": False, "code": 0}

    def stop(signum: int | None = None, frame=None) -> None:
        state["stopping"] = True
        for pid in running:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def start() -> None:
        try:
            pid = _fork_worker(target, parent)
        except OSError as e:  # the system refuses another process: stop rather than serve on with fewer
            print(f"{label}: cannot start a worker: {e.strerror or e}; stopping", file=sys.stderr, flush=True)
            state["code"] = 1
            stop()
            return
        running[pid] = time.monotonic()
        if state["stopping"]:  # the stop came during the fork, before the worker was in the table
            os.kill(pid, signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in _STOP_SIGNALS}
    try:
        for _ in range(workers):
            start()
        while running:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            began = running.pop(pid, None)
            if began is None or state["stopping"]:
                continue
            code = os.waitstatus_to_exitcode(status)
            how = f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
            ended = f"worker {pid} {how}"
            if code == STARTUP_FAILED or time.monotonic() - began < RESTART_AFTER_S:
                print(f"{label}: {ended} right after its start; stopping", file=sys.stderr, flush=True)
                state["code"] = 1
                stop()
            else:
                print(f"{label}: {ended}; starting another", file=sys.stderr, flush=True)
                start()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return state["code"]


def _fork_worker(target: Callable[[], bool], parent: int) -> int:
    """Fork one worker running ``target``; its pid. The worker never returns: it exits with 0, `STARTUP_FAILED`
    (``target`` returned False) or 1 (an exception, printed)."""
    sys.stdout.flush()
    sys.stderr.flush()  # else a worker would print this process's buffered output a second time
    # The stop signals wait until the worker has its own handlers: the supervisor's would act on its copy of
    # the worker table.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        pid = os.fork()
    finally:
        if os.getpid() == parent:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if pid:
        return pid
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with_parent(parent)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        code = 0 if target() else STARTUP_FAILED
    except KeyboardInterrupt:
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` ends (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before the call above
        os._exit(1)


class BackgroundServer:
    """A uvicorn server in a daemon thread; ``url`` is its base address (e.g. http://127.0.0.1:54321).
    ``loop``: the event loop (see `EVENT_LOOPS`)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, limits: ConnectionLimits | None = None,
                 loop: str = "auto"):
        import uvicorn

        self.config = uvicorn_config(app, limits, loop, log_level="warning", timeout_graceful_shutdown=2)
        self.sock = bind_socket(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="cnnlab-server", daemon=True)

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, limits: ConnectionLimits | None = None,
                      loop: str = "auto") -> Iterator[BackgroundServer]:
    """Run ``app`` on a free loopback port for the duration of a ``with`` block (on the event loop ``loop``)."""
    server = BackgroundServer(app, host, port, limits, loop).start()
    try:
        yield server
    finally:
        server.stop()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A ``cnnlab serve`` child process started by `serve_process`.

    Attributes:
        url: Its base address, e.g. http://127.0.0.1:54321.
        proc: The child process.
    """

    url: str
    proc: subprocess.Popen
    _log: IO[bytes]
    _final_log: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far (all of it once it has stopped)."""
        if self._final_log is not None:
            return self._final_log
        # pread, not seek + read: the child writes through the same open file, so moving its offset would make
        # the child overwrite what it wrote before.
        fd = self._log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", errors="replace")


@contextmanager
def serve_process(run_dir: str | Path, *args: str, startup_s: float = 120.0, env: dict[str, str] | None = None,
                  on_spawn: Callable[[subprocess.Popen], None] | None = None) -> Iterator[ServerProcess]:
    """``cnnlab serve RUN_DIR`` in a child process on a free loopback port; yields it once ``/health`` answers,
    and stops it (terminate, then kill) on exit. Its output stays readable (`ServerProcess.log`) after the
    ``with`` block.

    Args:
        run_dir: The trained run to serve.
        *args: More ``cnnlab serve`` options (e.g. ``"--max-batch", "64"``).
        startup_s: How long to wait for ``/health``; the server's output tail is in the error otherwise.
        env: Variables added to this process's environment for the child (e.g. a PYTHONPATH naming another
            source tree, to compare two versions of the server).
        on_spawn: Called with the child right after it is started, long before it listens (importing torch
            takes seconds): e.g. to set its resource limits.

    Raises:
        RuntimeError: It did not answer ``/health`` within ``startup_s`` or exited (its output's tail included).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", str(run_dir), "--host", "127.0.0.1",
                                 "--port", str(port), "--log-level", "warning", *args],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        server = ServerProcess(url, proc, log)
        try:
            if on_spawn is not None:
                on_spawn(proc)
            _wait_healthy(server, startup_s)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            server._final_log = server.log()


def _wait_healthy(server: ServerProcess, timeout: float) -> None:
    """Return once ``server`` answers ``/health`` with 200; RuntimeError if it exits or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"cnnlab serve did not start: {server.log()[-2000:]}")
        time.sleep(0.1)


@contextmanager
def serve_subprocess(run_dir: str | Path, *args: str, startup_s: float = 120.0,
                     env: dict[str, str] | None = None) -> Iterator[str]:
    """`serve_process` yielding only the server's base URL."""
    with serve_process(run_dir, *args, startup_s=startup_s, env=env) as server:
        yield server.url
