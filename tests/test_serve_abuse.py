"""The server under hostile or careless clients: pixel amplification, a full in-flight budget, deep JSON,
slow and idle connections, malformed bodies (a fuzz), broken models and hostile class names.

No test measures time or memory: budgets are checked through what the server decided (status, counters,
whether the decoder ran), and the slow-client tests wait for an event (a closed socket, an answer) with a
generous bound that only a hang would exceed.
"""

from __future__ import annotations

import base64
import copy
import http.client
import io
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from cnnlab.cli import main
from cnnlab.errors import CheckpointError
from cnnlab.labels import printable

pytest.importorskip("fastapi", reason="the 'serve' extra is not installed")
pytest.importorskip("uvicorn", reason="the 'serve' extra is not installed")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnlab.infer import load_trained
from cnnlab.serve import app as app_module
from cnnlab.serve import background_server, create_app
from cnnlab.serve.decode import decode_file, plan_file
from cnnlab.serve.limits import BadRequest, Limits, PixelBudget, json_depth
from cnnlab.serve.server import (
    ConnectionLimits,
    guarded_h11,
    guarded_httptools,
    httptools_available,
    uvloop_available,
)

pytestmark = pytest.mark.robust
WAIT_S = 30.0  # upper bound for events that must happen; reached only if the server hangs
NO_HTTPTOOLS = pytest.mark.skipif(not httptools_available(), reason="httptools is not installed")
# Each connection guard is tested on both HTTP parsers the server can run.
PROTOCOLS = [pytest.param("h11", id="h11"), pytest.param("httptools", id="httptools", marks=NO_HTTPTOOLS)]
# ... and the lean path with the guards on both event loops.
LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(not uvloop_available(),
                                                                     reason="uvloop is not installed"))]


def request(url: str, method: str = "GET", body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One request; returns (status, headers, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body,
                     headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def settled(budget: PixelBudget) -> int:
    """The budget in use once finished requests have given theirs back (a client can read its answer a
    moment before the server's request task has finished)."""
    deadline = time.monotonic() + WAIT_S
    while budget.in_use and time.monotonic() < deadline:
        time.sleep(0.005)
    return budget.in_use


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def post_json(url: str, payload) -> tuple[int, dict, bytes]:
    return request(url + "/predict", "POST", json.dumps(payload).encode(), {"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def trained(tiny_run):
    return load_trained(tiny_run.path)


@pytest.fixture(scope="module")
def server(trained):
    """A server with the default limits, except a small per-request pixel budget for the sum test."""
    app = create_app(trained.path, trained=trained, max_wait_ms=1)
    with background_server(app) as srv:
        yield srv, app


# ----------------------------------------------------------------------------- pixel amplification


def test_many_large_tiny_byte_images_are_refused_from_their_headers(server, monkeypatch):
    srv, app = server
    decoded = []
    monkeypatch.setattr(app_module, "decode", lambda *a, **k: decoded.append(a) or pytest.fail("decoded"))
    bomb = png(Image.new("1", (5000, 5000)))  # 25 megapixels in a few kilobytes
    assert len(bomb) < 10_000
    status, _, body = post_json(srv.url, {"images": [base64.b64encode(bomb).decode()] * 40})
    assert status == 413, body
    assert "1,000,000,000 pixels" in json.loads(body)["error"]
    assert decoded == []  # refused on the headers alone
    assert settled(app.state.budget) == 0
    assert request(srv.url + "/health")[0] == 200


def test_request_pixel_budget_is_a_sum_over_images(trained):
    app = create_app(trained.path, trained=trained, limits=Limits(max_request_pixels=100_000), max_wait_ms=1)
    item = base64.b64encode(png(Image.new("L", (200, 200)))).decode()  # 40,000 pixels each
    with background_server(app) as srv:
        assert post_json(srv.url, {"images": [item, item]})[0] == 200
        status, _, body = post_json(srv.url, {"images": [item] * 3})
        assert status == 413 and "120,000 pixels" in json.loads(body)["error"]
        status, _, _ = request(srv.url + "/predict", "POST", png(Image.new("L", (400, 300))),
                               {"Content-Type": "image/png"})
        assert status == 413


def test_large_jpeg_is_priced_and_decoded_at_draft_size():
    buf = io.BytesIO()
    Image.new("RGB", (1600, 1200), (200, 30, 30)).save(buf, format="JPEG")
    [p] = plan_file(buf.getvalue(), (3, 32, 32))
    assert p.pixels == 200 * 150  # the decoder scales by 1/8 and keeps at least twice the input size
    assert decode_file(p.source, (32, 32), False, "x").size == (200, 150)
    assert decode_file(p.source, (32, 32), True, "x").size == (1600, 1200)  # framing a digit needs it all


# ----------------------------------------------------------------------------- the in-flight budget


def test_full_inflight_budget_answers_503_with_retry_after(trained):
    body = png(Image.new("L", (28, 28)))
    one = len(body) + 28 * 28  # a request holds its body's bytes and its decoded pixels
    app = create_app(trained.path, trained=trained, limits=Limits(max_inflight_pixels=one + one // 2),
                     max_wait_ms=1)
    gate, forward = threading.Event(), app.state.batcher.forward
    app.state.batcher.forward = lambda x: (gate.wait(WAIT_S), forward(x))[1]
    budget: PixelBudget = app.state.budget
    with background_server(app) as srv:
        first: list = []
        t = threading.Thread(target=lambda: first.append(
            request(srv.url + "/predict", "POST", body, {"Content-Type": "image/png"})))
        t.start()
        deadline = time.monotonic() + WAIT_S
        while budget.in_use < one and time.monotonic() < deadline:  # the first request is held in the batcher
            time.sleep(0.01)
        assert budget.in_use == one
        status, headers, answer = request(srv.url + "/predict", "POST", body, {"Content-Type": "image/png"})
        assert status == 503 and headers.get("retry-after") == "1"
        assert "server busy" in json.loads(answer)["error"]
        assert request(srv.url + "/health")[0] == 200  # costs nothing, so it still answers
        gate.set()
        t.join(WAIT_S)
        assert first and first[0][0] == 200
        assert settled(budget) == 0 and budget.refused == 1


def test_pixel_budget_releases_on_error():
    budget = PixelBudget(10)
    with pytest.raises(ValueError), budget.hold(8):
        raise ValueError("boom")
    assert budget.in_use == 0
    with budget.hold(10), pytest.raises(BadRequest) as e:
        budget.take(1)
    assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"} and budget.in_use == 0


# ----------------------------------------------------------------------------- JSON


def test_deeply_nested_json_is_400_not_500(server):
    srv, _ = server
    for body in (b"[" * 200_000 + b"]" * 200_000, b'{"images": ' + b"[" * 40 + b"]" * 40 + b"}"):
        status, _, answer = request(srv.url + "/predict", "POST", body, {"Content-Type": "application/json"})
        assert status == 400 and "nested" in json.loads(answer)["error"]


def test_json_depth_ignores_brackets_in_strings():
    assert json_depth(b"") == 0 and json_depth(b"[[1], [2, [3]]]") == 3
    assert json_depth(b'{"a": "[[[[{{"}') == 1
    assert json_depth(b'["\\"[[[", "\\\\", [1]]') == 2  # an escaped quote does not end the string
    nested = {"images": [[[[0]]]]}
    assert json_depth(json.dumps(nested).encode()) == 5


# ----------------------------------------------------------------------------- slow and idle clients


def test_uvicorn_is_configured_with_the_connection_guards(server):
    srv, _ = server
    cfg = srv.config
    assert cfg.timeout_keep_alive == 5 and cfg.h11_max_incomplete_event_size == 16 * 1024 and cfg.backlog == 64
    assert cfg.http.__name__ == ("GuardedHttpToolsProtocol" if httptools_available() else "GuardedH11Protocol")
    assert cfg.limit_concurrency is None  # see uvicorn_config: it would count idle connections against /health


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` (whatever it still sends first is read and dropped)."""
    sock.settimeout(WAIT_S)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("http", PROTOCOLS)
def test_half_open_request_head_is_dropped_and_health_answers(trained, http):
    app = create_app(trained.path, trained=trained, max_wait_ms=1)
    with background_server(app, limits=ConnectionLimits(head_timeout=0.2, http=http)) as srv:
        port = urlsplit(srv.url).port
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty")  # and nothing more
            assert _closed_by_server(s)
        with socket.create_connection(("127.0.0.1", port)) as s:  # a keep-alive client that stalls later
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(WAIT_S)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            s.sendall(b"GET /hea")  # (any rest of the first answer is read by _closed_by_server)
            assert _closed_by_server(s)
        assert request(srv.url + "/health")[0] == 200


@pytest.mark.parametrize("http", PROTOCOLS)
def test_head_deadline_restarts_after_a_request_slower_than_it(trained, http):
    """A request whose body takes longer than the head timeout is answered (the deadline covers heads only), and
    the connection's next head must again arrive within the timeout: a stalled one is dropped."""
    app = create_app(trained.path, trained=trained, max_wait_ms=1)
    digit = png(Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)))
    with background_server(app, limits=ConnectionLimits(head_timeout=0.2, http=http)) as srv:
        with socket.create_connection(("127.0.0.1", urlsplit(srv.url).port)) as s:
            s.settimeout(WAIT_S)
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: "
                      + str(len(digit)).encode() + b"\r\n\r\n")
            time.sleep(0.5)  # past the head deadline while the request is under way
            s.sendall(digit)
            answer = b""
            while not answer.rstrip().endswith(b"}"):
                chunk = s.recv(65536)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200")
            s.sendall(b"GET /hea")  # and nothing more
            assert _closed_by_server(s)


@pytest.mark.parametrize("http", PROTOCOLS)
def test_connection_cap_drops_the_oldest_idle_connection_for_a_new_one(trained, http):
    app = create_app(trained.path, trained=trained, max_wait_ms=1)
    with background_server(app, limits=ConnectionLimits(max_connections=4, head_timeout=600, http=http)) as srv:
        port = urlsplit(srv.url).port
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
        try:
            assert request(srv.url + "/health")[0] == 200
            assert all(_closed_by_server(s) for s in idle[:3])  # 7 connections for 4 places
            idle[-1].setblocking(False)
            with pytest.raises(BlockingIOError):  # the newest idle connection is still open
                idle[-1].recv(1)
        finally:
            for s in idle:
                s.close()


@pytest.mark.parametrize("http", PROTOCOLS)
@pytest.mark.parametrize("kind", ["image/png", "application/json"])  # the lean path and the full one
def test_slow_body_is_408(trained, http, kind):
    app = create_app(trained.path, trained=trained, max_wait_ms=1, read_timeout=0.2)
    with background_server(app, limits=ConnectionLimits(http=http)) as srv:
        with socket.create_connection(("127.0.0.1", urlsplit(srv.url).port)) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: " + kind.encode() + b"\r\n"
                      b"Content-Length: 1000\r\n\r\n" + b"\x89PNG" * 4)
            s.settimeout(WAIT_S)
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408")
        assert "not received within" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert settled(app.state.budget) == 0


@pytest.mark.parametrize("http", PROTOCOLS)
def test_guarded_protocol_classes_do_not_share_waiting_lists(http):
    make = guarded_h11 if http == "h11" else guarded_httptools
    a, b = make(ConnectionLimits(8)), make(ConnectionLimits(8))
    assert a.waiting is not b.waiting and a.limits.max_connections == 8


def test_unknown_or_missing_http_parser_is_a_config_error(monkeypatch):
    from cnnlab.errors import ConfigError
    from cnnlab.serve import server as server_module

    with pytest.raises(ConfigError, match="unknown HTTP protocol 'h3'"):
        ConnectionLimits(http="h3")
    monkeypatch.setattr(server_module, "httptools_available", lambda: False)
    with pytest.raises(ConfigError, match="httptools HTTP parser is not installed"):
        ConnectionLimits(http="httptools")
    assert server_module.guarded_protocol(ConnectionLimits()).__name__ == "GuardedH11Protocol"


def test_unknown_or_missing_event_loop_is_a_config_error(monkeypatch):
    from cnnlab.errors import ConfigError
    from cnnlab.serve import server as server_module

    with pytest.raises(ConfigError, match="unknown event loop 'trio'"):
        server_module.uvicorn_config(None, loop="trio")
    monkeypatch.setattr(server_module, "uvloop_available", lambda: False)
    with pytest.raises(ConfigError, match="uvloop event loop is not installed"):
        server_module.BackgroundServer(None, loop="uvloop")
    assert server_module.uvicorn_config(None, loop="auto").loop == "auto"  # uvicorn's own fallback to asyncio


class _Responses:
    """Reads responses with a Content-Length one after another from a socket (one read may hold several)."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def _more(self, what: str) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"connection closed {what}: {self.buf!r}"
        self.buf += chunk

    def next(self) -> tuple[bytes, dict[bytes, bytes], bytes]:
        """(status line, headers lower-cased, body) of the next response."""
        while b"\r\n\r\n" not in self.buf:
            self._more("before a response head")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status, *lines = head.split(b"\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines)}
        size = int(headers[b"content-length"])
        while len(self.buf) < size:
            self._more("inside a response body")
        body, self.buf = self.buf[:size], self.buf[size:]
        return status, headers, body


@NO_HTTPTOOLS
def test_http10_keep_alive_is_answered_and_kept_open(server_httptools):
    """An HTTP/1.0 client asking for keep-alive (as ApacheBench -k) gets it, on the lean path and the full one;
    one that does not ask is closed after its answer."""
    srv, _ = server_httptools
    digit = png(Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)))
    post = (b"POST /predict HTTP/1.0\r\nConnection: Keep-Alive\r\nContent-Type: image/png\r\n"
            b"Content-Length: " + str(len(digit)).encode() + b"\r\n\r\n" + digit)
    get = b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    with socket.create_connection(("127.0.0.1", urlsplit(srv.url).port)) as s:
        s.settimeout(WAIT_S)
        responses = _Responses(s)
        for message in (post, get, post):  # three requests on one connection
            s.sendall(message)
            status, headers, body = responses.next()
            assert status.endswith(b" 200 OK") and headers[b"connection"] == b"keep-alive"
            assert json.loads(body)
    with socket.create_connection(("127.0.0.1", urlsplit(srv.url).port)) as s:
        s.sendall(post.replace(b"Connection: Keep-Alive\r\n", b""))
        s.settimeout(WAIT_S)
        status, headers, _ = _Responses(s).next()
        assert status.endswith(b" 200 OK") and headers.get(b"connection") == b"close"
        assert _closed_by_server(s)


@pytest.mark.parametrize("loop", LOOPS)
def test_lean_path_and_guards_on_each_event_loop(trained, loop):
    """The server on asyncio's loop and on uvloop: kept-alive HTTP/1.0 requests on the lean path get the full
    path's answer, a stalled request head is dropped at its deadline, a stalled body is 408, /health answers."""
    app = create_app(trained.path, trained=trained, max_wait_ms=1, read_timeout=0.2)
    digit = png(Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)))
    head = (b"POST /predict%s HTTP/1.0\r\nConnection: keep-alive\r\nContent-Type: image/png\r\n"
            b"Content-Length: %d\r\n\r\n")
    with background_server(app, limits=ConnectionLimits(head_timeout=0.2), loop=loop) as srv:
        assert type(app.state.batcher._task.get_loop()).__module__.startswith(loop)
        port = urlsplit(srv.url).port
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(WAIT_S)
            responses = _Responses(s)
            bodies = []
            for query in (b"", b"?top_k=%33", b""):  # lean, full (an escaped query), lean
                s.sendall(head % (query, len(digit)) + digit)
                status, headers, body = responses.next()
                assert status.endswith(b" 200 OK") and headers[b"connection"] == b"keep-alive"
                bodies.append(json.loads(body))
            assert bodies[0]["top_k"] == bodies[1]["top_k"] == bodies[2]["top_k"]
            assert np.allclose(bodies[0]["probabilities"], bodies[1]["probabilities"], atol=1e-6)
            s.sendall(b"GET /hea")  # a head that never completes
            assert _closed_by_server(s)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(head % (b"", 1000) + digit[:10])  # a body that never completes
            s.settimeout(WAIT_S)
            status, _, body = _Responses(s).next()
            assert status.endswith(b" 408 Request Timeout") and "not received within" in json.loads(body)["error"]
        assert request(srv.url + "/health")[0] == 200
    assert settled(app.state.budget) == 0


def test_coalesced_writes_send_a_response_head_with_its_body():
    from cnnlab.serve.server import CoalescedWrites

    class Transport:
        def __init__(self):
            self.sent, self.closed = [], False

        def write(self, data):
            self.sent.append(data)

        def is_closing(self):
            return self.closed

        def close(self):
            self.closed = True

        def get_extra_info(self, name):
            return name

    class Loop:
        def __init__(self):
            self.soon = []

        def call_soon(self, fn):
            self.soon.append(fn)

    t, loop = Transport(), Loop()
    w = CoalescedWrites(t, loop)
    w.write(b"HEAD")
    assert t.sent == []
    w.write(b"body")
    w.write(b"more")
    assert t.sent == [b"HEADbody", b"more"]
    loop.soon[0]()  # the end-of-turn flush has nothing left to send
    assert t.sent == [b"HEADbody", b"more"] and w.get_extra_info("peername") == "peername"
    t2 = Transport()
    w2 = CoalescedWrites(t2, Loop())
    w2.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # a head with no body yet: sent at close at the latest
    w2.close()
    assert t2.sent == [b"HTTP/1.1 100 Continue\r\n\r\n"] and t2.closed and w2.is_closing()


@pytest.fixture(scope="module")
def server_httptools(trained):
    app = create_app(trained.path, trained=trained, max_wait_ms=1)
    with background_server(app, limits=ConnectionLimits(http="httptools")) as srv:
        yield srv, app


# ----------------------------------------------------------------------------- fuzz: never a 500

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-300, 10**30) | st.floats(allow_nan=False)
                     | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                     max_leaves=30)
_VALID_PNG = png(Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)))


@st.composite
def _mutated_png(draw) -> bytes:
    data = bytearray(_VALID_PNG)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(8, len(data)))
    return bytes(data[:cut])


_BODIES = st.one_of(
    st.tuples(st.just("application/json"), _JSON.map(lambda v: json.dumps(v).encode())),
    st.tuples(st.just("application/json"), st.lists(_JSON | st.text(max_size=12).map(
        lambda t: base64.b64encode(t.encode()).decode()), max_size=4).map(
        lambda v: json.dumps({"images": v}).encode())),
    st.tuples(st.just("application/json"), _mutated_png().map(
        lambda b: json.dumps({"images": [base64.b64encode(b).decode()]}).encode())),
    st.tuples(st.sampled_from(["application/json", "image/png", "multipart/form-data; boundary=xx",
                               "application/octet-stream", "text/plain", ""]), st.binary(max_size=300)),
    st.tuples(st.sampled_from(["image/png", "image/jpeg"]), _mutated_png()),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_BODIES, query=st.sampled_from(["", "?top_k=2", "?invert=yes&centre=true", "?top_k=-1"]))
def test_fuzzed_bodies_never_get_a_500(server, case, query):
    srv, app = server
    kind, body = case
    status, _, answer = request(srv.url + "/predict" + query, "POST", body,
                                {"Content-Type": kind} if kind else {})
    assert status in (200, 400, 408, 413, 415, 422, 503), (status, answer[:200])
    reply = json.loads(answer)
    assert ("error" in reply) == (status != 200)
    assert settled(app.state.budget) == 0


# ----------------------------------------------------------------------------- broken models, hostile names


def test_nan_weights_or_missing_class_names_fail_at_startup(trained):
    broken = copy.deepcopy(trained)
    next(broken.model.parameters()).data[0].fill_(float("nan"))
    with pytest.raises(CheckpointError, match="NaN"):
        create_app(trained.path, trained=broken)
    short = copy.copy(trained)
    short.classes = trained.classes[:7]
    with pytest.raises(CheckpointError, match="7 class names for 10 outputs"):
        create_app(trained.path, trained=short)


def _rewrite_checkpoint(src, dst, change) -> None:
    from safetensors.torch import save_file

    from cnnlab.checkpoint import load_checkpoint

    tensors, meta = load_checkpoint(src)
    change(tensors, meta)
    save_file(tensors, str(dst), metadata={"cnnlab": json.dumps(meta)})


def test_cli_serve_refuses_a_nan_checkpoint_in_one_line(trained, tmp_path, capsys):
    bad = tmp_path / "ckpt-00000004.safetensors"

    def poison(tensors, meta):
        for k, v in tensors.items():
            if k.startswith(("model/", "ema/")) and v.is_floating_point():
                v.fill_(float("nan"))
    _rewrite_checkpoint(trained.path, bad, poison)
    assert main(["serve", str(bad), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cnnlab: error:") and len(err.splitlines()) == 1 and "NaN" in err


HOSTILE = ["zero\nFAKE: 9 (1.000)", "\u202eevil", "esc\x1b[2J", "sep\u2028x"] + [f"c{i}" for i in range(6)]


def test_hostile_class_names_are_escaped_in_serve_and_predict(trained, tmp_path, capsys):
    named = copy.copy(trained)
    named.classes = HOSTILE
    with background_server(create_app(trained.path, trained=named, max_wait_ms=1)) as srv:
        health = json.loads(request(srv.url + "/health")[2])
        assert health["classes"][:4] == ["zero\\nFAKE: 9 (1.000)", "\\u202eevil", "esc\\x1b[2J", "sep\\u2028x"]
        status, _, body = request(srv.url + "/predict?top_k=10", "POST", _VALID_PNG, {"Content-Type": "image/png"})
        labels = [t["label"] for t in json.loads(body)["top_k"]]
        assert status == 200 and sorted(labels) == sorted(printable(c) for c in HOSTILE)

    run = tmp_path / "run"
    run.mkdir()
    _rewrite_checkpoint(trained.path, run / trained.path.name,
                        lambda tensors, meta: meta["data"].__setitem__("classes", HOSTILE))
    image = tmp_path / "digit.png"
    image.write_bytes(_VALID_PNG)
    assert main(["predict", str(run), str(image), "--top-k", "10"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and "\u202e" not in out and "\x1b" not in out
    assert "zero\\nFAKE: 9 (1.000)" in out


def test_printable_keeps_ordinary_text():
    assert printable("chat noir") == "chat noir" and printable("猫 قطة") == "猫 قطة"
    assert printable("a\tb\u200fc") == "a\\tb\\u200fc"


def test_cli_serve_defaults_are_the_library_limits():
    from cnnlab.cli import build_parser
    from cnnlab.serve import limits

    args = build_parser().parse_args(["serve", "run"])
    assert (args.max_batch_images, args.max_request_pixels, args.max_inflight_pixels) == (
        limits.MAX_IMAGES, limits.MAX_REQUEST_PIXELS, limits.MAX_INFLIGHT_PIXELS)
    assert int(args.max_upload_mb * 1024 * 1024) == limits.MAX_UPLOAD_BYTES


def test_server_allocator_setting_honours_the_opt_out(monkeypatch):
    import sys as _sys

    from cnnlab.serve.server import bound_allocator

    monkeypatch.setenv("CNNLAB_MALLOC", "system")
    assert bound_allocator() is False
    monkeypatch.delenv("CNNLAB_MALLOC")
    if _sys.platform.startswith("linux"):
        assert bound_allocator() is True


@pytest.mark.parametrize("http", PROTOCOLS)
def test_request_head_growing_past_the_limit_is_refused(trained, http):
    app = create_app(trained.path, trained=trained, max_wait_ms=1)
    with background_server(app, limits=ConnectionLimits(http=http)) as srv:
        with socket.create_connection(("127.0.0.1", urlsplit(srv.url).port)) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 20_000)  # no end of head: it would grow
            s.settimeout(WAIT_S)
            assert s.recv(65536).startswith(b"HTTP/1.1 400")
            assert _closed_by_server(s)
        assert request(srv.url + "/health")[0] == 200


@NO_HTTPTOOLS
def test_pipelined_request_head_growing_past_the_limit_is_refused(trained):
    """A head that grows behind a request still being answered is capped at once (h11 caps it once the answer
    is out), and no head deadline can be what closes it here."""
    app = create_app(trained.path, trained=trained, max_wait_ms=1)
    gate, forward = threading.Event(), app.state.batcher.forward
    app.state.batcher.forward = lambda x: (gate.wait(3 * WAIT_S), forward(x))[1]  # the first request is held
    digit = png(Image.new("L", (28, 28)))
    try:
        with background_server(app, limits=ConnectionLimits(head_timeout=600, http="httptools")) as srv:
            with socket.create_connection(("127.0.0.1", urlsplit(srv.url).port)) as s:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: "
                          + str(len(digit)).encode() + b"\r\n\r\n" + digit
                          + b"GET /health HTTP/1.1\r\nHost: x\r\nX-Junk: ")
                # More than one read of the server's (256 KiB): the head is counted from its second read on.
                try:
                    s.sendall(b"a" * 600_000)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # closed while sending: what is wanted
                assert _closed_by_server(s)
            gate.set()
            assert request(srv.url + "/health")[0] == 200
    finally:
        gate.set()


@pytest.mark.parametrize("http", PROTOCOLS)
def test_a_large_body_before_a_pipelined_head_is_not_counted_as_head(trained, http):
    app = create_app(trained.path, trained=trained, max_wait_ms=1)
    body = b'{"images": [[[0, 255], [255, 0]]]}' + b" " * 40_000  # valid JSON, well over the head limit
    first = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
             + str(len(body)).encode() + b"\r\n\r\n" + body)
    with background_server(app, limits=ConnectionLimits(head_timeout=600, http=http)) as srv:
        with socket.create_connection(("127.0.0.1", urlsplit(srv.url).port)) as s:
            s.settimeout(WAIT_S)
            s.sendall(first + b"GET /health HTTP/1.1\r\nHo")  # the second head completes in a later read
            s.sendall(b"st: x\r\n\r\n")
            responses = _Responses(s)
            assert responses.next()[0].endswith(b" 200 OK")
            assert responses.next()[0].endswith(b" 200 OK")
