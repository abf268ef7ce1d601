"""A lean path for ``POST /predict`` with a raw image body (``Content-Type: image/png`` and the like).

The full FastAPI path spends most of a small request's time outside the model: routing, query models, four
middleware layers, and two hops to a worker thread to read a header and decode a few hundred bytes. This
path answers the same requests with the same answers and errors, and keeps every limit of the full path:
body size (413), body deadline (408), the body's bytes and the decoded pixels reserved in the in-flight
budget (503 with Retry-After), per-request pixels read from the header before decoding (413). Small bodies
and images are read and decoded on the event loop (a 28x28 PNG costs less than a hop to a thread); larger
ones still go to a worker thread so the loop keeps answering. A small PNG is priced from its IHDR chunk, so
PIL opens it at most once (a plain one not at all: see `decode.plain_png`), and the answer is written from JSON
pieces encoded once (`Answers`).

It takes only requests whose route, content type, length and query it understands completely (see
`raw_image_route`): anything else (a chunked body, a query FastAPI would refuse or read differently) goes
through the full path, which answers it as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import torch
from starlette.concurrency import run_in_threadpool

from .batcher import MicroBatcher
from .decode import PNG_IHDR_HEAD, Pending, decode, max_pixels, plan_file
from .limits import BadRequest, Limits, PixelBudget, check_request_pixels
from .server import BODY_RECEIVED

INLINE_BYTES = 64 * 1024  # bodies up to this have their header read on the event loop
INLINE_PIXELS = 256 * 256  # images up to this are decoded on the event loop (well under a millisecond)
MAX_TOP_K = 1000  # as the full path's `top_k` query parameter
INVERTS = (b"auto", b"yes", b"no")
CENTRES = {b"true": True, b"false": False, b"1": True, b"0": False}
log = logging.getLogger("cnnlab.serve")


class RawImageRequest(NamedTuple):
    """What `raw_image_route` read from a request's head (a tuple: made per request, at half a frozen dataclass's
    cost)."""

    length: int  # Content-Length
    top_k: int = 3
    invert: str | None = None  # None: as the run recorded
    centre: bool = False


def raw_image_route(scope: dict) -> RawImageRequest | None:
    """The request's parameters if it is ``POST /predict`` with one image content type (image/* or
    application/octet-stream), one Content-Length and no Transfer-Encoding, and a query of at most one each of
    ``top_k`` (1..1000 in plain digits), ``invert`` (auto|yes|no) and ``centre`` (true|false|1|0); else None,
    and the full path takes it."""
    if scope["method"] != "POST" or scope["path"] != "/predict":
        return None
    kind = length = None
    for name, value in scope["headers"]:
        if name == b"content-type":
            if kind is not None:
                return None
            kind = value
        elif name == b"content-length":
            if length is not None:
                return None
            length = value
        elif name == b"transfer-encoding":
            return None
    if kind is None or length is None or not length.isdigit():
        return None
    kind = kind.split(b";", 1)[0].strip().lower()
    if not (kind.startswith(b"image/") or kind == b"application/octet-stream"):
        return None
    return _query(scope.get("query_string", b""), int(length))


def _query(query: bytes, length: int) -> RawImageRequest | None:
    """The query's parameters, or None for anything the full path should judge (escapes, repeats, unknown
    names, values outside the plain forms)."""
    if not query:  # the common case: every parameter at its default
        return RawImageRequest(length)
    if b"%" in query or b"+" in query:
        return None
    params: dict[bytes, bytes] = {}
    for part in query.split(b"&"):
        name, eq, value = part.partition(b"=")
        if not eq or name in params:
            return None
        params[name] = value
    top_k, invert, centre = params.pop(b"top_k", b"3"), params.pop(b"invert", None), params.pop(b"centre", b"false")
    if params or not top_k.isdigit() or not 1 <= int(top_k) <= MAX_TOP_K or centre not in CENTRES:
        return None
    if invert is not None and invert not in INVERTS:
        return None
    return RawImageRequest(length, int(top_k), invert.decode() if invert else None, CENTRES[centre])


def plan_png(data: bytes) -> list[Pending] | None:
    """`plan_file` for a PNG read from its IHDR chunk alone (its width and height are the decoded size), without
    opening it in PIL; None when ``data`` does not start as a PNG or claims no or too many pixels.

    Whatever this lets through is still fully checked: the decoder opens the file as `plan_file` would, and
    every refusal on the lean path is re-derived through `plan_file` (see `fast_predict_handler`).
    """
    if len(data) < 24 or not data.startswith(PNG_IHDR_HEAD):
        return None
    width, height = struct.unpack(">II", data[16:24])
    if not 0 < width * height <= max_pixels():
        return None
    return [Pending(data, width * height, "upload")]


def describe_row(probs: torch.Tensor, labels: list[str], top_k: int) -> dict:
    """`cnnlab.infer.describe_predictions` for one row of probabilities [K] (the same dict): one ``topk`` and two
    ``tolist`` instead of a tensor index per number."""
    vals, idx = probs.topk(max(1, min(top_k, probs.shape[0])))
    values, order = probs.tolist(), idx.tolist()
    return {"class": order[0], "label": labels[order[0]], "probability": values[order[0]],
            "top_k": [{"class": i, "label": labels[i], "probability": values[i]} for i in order],
            "probabilities": values}


class Answers:
    """The lean path's answer to a prediction, written from pieces encoded once: byte for byte the JSON of
    `describe_row` as `json_body` encodes it (and so the full path's), at a fraction of the encoder's cost.

    Args:
        labels: Printable class names.
    """

    def __init__(self, labels: list[str]):
        self.labels = labels
        # '"class":3,"label":"3","probability":' for each class; JSON floats are Python's float repr
        self._heads = [f'"class":{i},"label":{json.dumps(label, ensure_ascii=False)},"probability":'
                       for i, label in enumerate(labels)]

    def body(self, values: list[float], top_k: int) -> bytes:
        """The JSON body for one row of float32 probabilities [K] as Python floats (as
        `json_body(describe_row(torch.tensor(values), labels, top_k))`)."""
        k = max(1, min(top_k, len(values)))
        if not all(map(math.isfinite, values)):  # the encoder refuses NaN and infinity: let it, as the full path
            return json_body(describe_row(torch.tensor(values, dtype=torch.float32), self.labels, top_k))
        if len(set(values)) == len(values):  # no ties: the order is the values' alone, as topk's
            order = sorted(range(len(values)), key=values.__getitem__, reverse=True)[:k]
        else:  # equal values come in whatever order topk gives them: ask it (the same float32 row as the full path's)
            order = torch.tensor(values, dtype=torch.float32).topk(k)[1].tolist()
        heads, text = self._heads, list(map(repr, values))
        top = order[0]
        top_k_items = ",".join(["{" + heads[i] + text[i] + "}" for i in order])
        return "".join(["{", heads[top], text[top], ',"top_k":[', top_k_items, '],"probabilities":[', ",".join(text),
                        "]}"]).encode()


def json_body(payload) -> bytes:
    """``payload`` as Starlette's JSONResponse encodes it (so both paths answer the same bytes)."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


async def send_json(send, status: int, payload, headers: dict[str, str] | None = None) -> None:
    """A complete JSON response with a Content-Length (``payload``: an object, or its JSON body already encoded)."""
    body = payload if isinstance(payload, bytes) else json_body(payload)
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    raw += [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive, limit: int, deadline: float | None, timeout: float) -> bytes | None:
    """The request body, or None when the client hung up; BadRequest 413 past ``limit`` bytes and 408 when it
    has not all arrived by ``deadline`` (event-loop time; ``timeout`` names it in the message; None: the server
    has the whole body already, see `BODY_RECEIVED`, so no timer is armed)."""
    if deadline is None:
        return await _read_chunks(receive, limit)
    try:
        async with asyncio.timeout_at(deadline):
            return await _read_chunks(receive, limit)
    except TimeoutError:
        raise BadRequest(f"request body not received within {timeout:g} s", 408) from None


async def _read_chunks(receive, limit: int) -> bytes | None:
    chunks, seen = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise BadRequest(f"request body over the limit of {limit:,} bytes", 413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def fast_predict_handler(*, limits: Limits, budget: PixelBudget, batcher: MicroBatcher,
                         shape: tuple[int, int, int], labels: list[str], invert: str, resize: str,
                         read_timeout: float, interpolation: str = "bilinear") -> Callable[..., Awaitable[None]]:
    """The ASGI handler (scope, receive, send, `RawImageRequest`) of the lean path for one app.

    Args:
        limits: The app's request limits.
        budget: The app's in-flight budget (body bytes and decoded pixels are reserved in it).
        batcher: The app's micro-batcher (its results: rows of probabilities as lists of floats).
        shape: The model's input (C, H, W).
        labels: Printable class names.
        invert: The run's recorded polarity ('auto', 'yes', 'no'), used when the query does not override it.
        resize: The run's recorded resize ('stretch' or 'shorter-crop').
        interpolation: The run's recorded resampling filter.
        read_timeout: Seconds within which the body must have arrived (408 after).
    """

    answers = Answers(labels)

    async def predict(body: bytes, req: RawImageRequest) -> bytes:
        small = len(body) <= INLINE_BYTES
        pending = plan_png(body) if small else None
        if pending is not None:  # priced from the PNG header without opening the file twice
            try:
                return await answer(body, pending, req, small)
            except BadRequest:
                # The full path refuses a file that PIL cannot open before anything else: so does this one, with
                # the same message; else the refusal stands.
                plan_file(body, shape, req.centre)
                raise
        pending = plan_file(body, shape, req.centre) if small else await run_in_threadpool(
            plan_file, body, shape, req.centre)
        return await answer(body, pending, req, small)

    async def answer(body: bytes, pending: list[Pending], req: RawImageRequest, small: bool) -> bytes:
        pixels = check_request_pixels([p.pixels for p in pending], limits.max_request_pixels)
        cost = sum(p.cost for p in pending)
        budget.take(cost)  # as budget.hold, without a context manager's generator per request
        try:
            args = (pending, shape, req.invert or invert, req.centre, resize, interpolation)
            images = decode(*args) if small and pixels <= INLINE_PIXELS else await run_in_threadpool(decode, *args)
            try:
                rows = await batcher.submit(images)  # [[K floats]] (see create_app's forward_rows)
            except RuntimeError as e:  # shutting down
                raise BadRequest(str(e), 503, {"Retry-After": "1"}) from None
        finally:
            budget.give(cost)
        return answers.body(rows[0], req.top_k)

    async def handle(scope, receive, send, req: RawImageRequest) -> None:
        deadline = None if scope.get(BODY_RECEIVED) else asyncio.get_running_loop().time() + read_timeout
        headers = None
        try:
            if req.length > limits.max_upload_bytes:
                raise BadRequest(f"request body over the limit of {limits.max_upload_bytes:,} bytes", 413)
            if req.length:
                budget.take(req.length, "its body")
            try:
                body = await read_body(receive, limits.max_upload_bytes, deadline, read_timeout)
                if body is None:
                    return  # the client hung up: nobody to answer
                status, payload = 200, await predict(body, req)
            finally:
                if req.length:
                    budget.give(req.length)
        except BadRequest as e:
            status, payload, headers = e.status, {"error": str(e)}, e.headers
        except MemoryError:
            log.error("out of memory answering POST /predict")
            status, payload, headers = 503, {"error": "server out of memory; retry later"}, {"Retry-After": "1"}
        except Exception:  # the full path's net: logged, a generic 500
            log.exception("internal error answering POST /predict")
            status, payload = 500, {"error": "internal server error (logged)"}
        await send_json(send, status, payload, headers)

    return handle
