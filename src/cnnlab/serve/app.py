"""The HTTP API and web page of a trained run: ``create_app(run_dir)`` returns a FastAPI app.

Routes:
    GET  /         a self-contained page: draw a digit (one-channel models) or upload an image, see the
                   prediction and a bar chart of probabilities.
    GET  /health   {status, model, step, classes, dataset, data_shape, input_size, batching counters,
                   in_flight: the memory budget's use, capacity and refusals}
    POST /predict  body: an image file (multipart form field, or the raw bytes with an image/* type), or JSON
                   {"images": [base64 image files or pixel arrays]}. Query: top_k (default 3), invert
                   (auto|yes|no, as `cnnlab predict`; default: as the run recorded), centre (true|false: frame a
                   grayscale digit as MNIST does, as `cnnlab predict --centre`). Answers {class, label,
                   probability, probabilities, top_k} for a file, {"predictions": [...]} for a JSON batch; errors
                   {"error": message} with a 4xx.

The model is loaded and checked once, when the app is created; requests are batched by a `MicroBatcher`.
``POST /predict`` with a raw image body takes a lean path (`fastpath`) with the same answers and limits.
Every error is a JSON ``{"error": message}``: 4xx for the client's mistakes, 503 (with Retry-After) when the
server's memory budget for requests in flight is full; see `limits` for what a request may cost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CheckpointError, CnnlabError
from ..infer import TrainedModel, describe_predictions, load_trained, select_device
from ..labels import printable
from .batcher import MicroBatcher
from .decode import decode, plan_file, plan_json
from .fastpath import fast_predict_handler, raw_image_route
from .limits import (
    JSON_UNITS_PER_BYTE,
    MAX_IMAGES,
    MAX_UPLOAD_BYTES,
    BadRequest,
    Limits,
    PixelBudget,
    check_request_pixels,
    parse_json,
)

READ_TIMEOUT_S = 30.0  # a request body must arrive within this (slow senders would hold memory for ever)
log = logging.getLogger("cnnlab.serve")


class BodyLimit:
    """ASGI middleware guarding request bodies: over ``max_bytes`` is 413, whether or not a Content-Length is
    declared (a chunked body is counted as it arrives and cut off at the limit); a body that has not fully
    arrived ``read_timeout`` seconds after the request began is 408; a body's bytes are reserved in
    ``budget`` while its request is in flight (503 when the budget is full)."""

    def __init__(self, app, max_bytes: int, budget: PixelBudget | None = None, read_timeout: float = READ_TIMEOUT_S):
        self.app, self.max_bytes, self.budget, self.read_timeout = app, max_bytes, budget, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _error(413, f"request body over the limit of {self.max_bytes:,} bytes")(scope, receive, send)
        held = 0
        if self.budget is not None and declared is not None and int(declared) > 0:
            try:
                self.budget.take(int(declared), "its body")
            except BadRequest as e:
                return await _error(e.status, str(e), e.headers)(scope, receive, send)
            held = int(declared)
        seen, done = 0, False
        deadline = time.monotonic() + self.read_timeout

        async def guarded_receive():
            nonlocal seen, done, held
            if done:  # the body is in: what follows is a disconnect notice, which may come at any time
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise BadRequest(f"request body not received within {self.read_timeout:g} s", 408) from None
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                seen += chunk
                if seen > self.max_bytes:
                    raise BadRequest(f"request body over the limit of {self.max_bytes:,} bytes", 413)
                if self.budget is not None and seen > held:  # chunked: reserve as it arrives
                    self.budget.take(seen - held, "its body")
                    held = seen
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        try:
            return await self.app(scope, guarded_receive, send)
        finally:
            if held:
                self.budget.give(held)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class ServeApp(FastAPI):
    """The FastAPI app with a lean path in front for the commonest request, ``POST /predict`` with a raw image
    body (see `raw_image_route`): it skips FastAPI's routing, parameter models and middleware, and keeps every
    limit of the full path. Everything else goes through FastAPI as usual."""

    fast_predict = None  # set by create_app: an ASGI callable for the requests `raw_image_route` accepts

    async def __call__(self, scope, receive, send) -> None:
        if self.fast_predict is not None and scope["type"] == "http":
            request = raw_image_route(scope)
            if request is not None:
                return await self.fast_predict(scope, receive, send, request)
        return await super().__call__(scope, receive, send)


def page_html(trained: TrainedModel) -> str:
    """The web page with the model's facts filled in (JSON in a script tag; '<' escaped so no text in class
    names can close the tag)."""
    page = resources.files("cnnlab.serve").joinpath("page.html").read_text(encoding="utf-8")
    facts = {"model": trained.model.meta.name, "classes": [printable(c) for c in trained.classes],
             "data_shape": list(trained.data_shape), "step": trained.step, "dataset": trained.dataset,
             "draw": trained.data_shape[0] == 1}
    return page.replace("/*CNNLAB_FACTS*/{}", json.dumps(facts).replace("<", "\\u003c"))


def create_app(run: str | Path, *, device: str = "cpu", max_batch: int = 64, max_wait_ms: float = 5.0,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_images: int = MAX_IMAGES,
               limits: Limits | None = None, read_timeout: float = READ_TIMEOUT_S,
               trained: TrainedModel | None = None, workers: int = 1,
               forward_threads: int | None = None) -> ServeApp:
    """Build the app for a run directory or checkpoint file (loaded and checked now, once).

    Args:
        run: Run directory (newest checkpoint) or checkpoint file.
        device: 'cpu', 'cuda' or 'auto'.
        max_batch: Most images per forward pass.
        max_wait_ms: How long a request waits for others to share its forward pass.
        max_upload_bytes: Largest request body accepted (413 above); ignored when ``limits`` is given.
        max_images: Most images in one JSON request (413 above); ignored when ``limits`` is given.
        limits: All request limits (bytes, images, pixels per request and in flight, JSON depth).
        read_timeout: Seconds within which a request's body must have arrived (408 after).
        trained: An already loaded model (then ``run`` only names it).
        workers: How many processes will serve the app (`serve_forever`'s ``workers``). Above 1, each runs its
            forward passes on its event loop's thread (`MicroBatcher`'s ``inline``); ``/health`` reports the
            count and the process that answered, whose counters it shows.
        forward_threads: torch threads of the forward passes (None: see `MicroBatcher`).

    Raises:
        CnnlabError: The run has no usable checkpoint, or its model cannot serve (non-finite weights, fewer
            class names than outputs); raised here, before any port is opened.
    """
    limits = limits or Limits(max_upload_bytes=max_upload_bytes, max_images=max_images)
    trained = trained or load_trained(run, select_device(device))
    model = trained.model
    shape = tuple(trained.data_shape)

    @torch.inference_mode()
    def forward(images: torch.Tensor) -> torch.Tensor:  # uint8 [N,C,H,W] -> probabilities [N,K]; worker thread
        # the run's recorded TTA, precision, layout and crop, as `cnnlab predict` and `evaluate`
        return torch.softmax(trained.logits(images, batch_size=max(max_batch, len(images))), 1)

    def forward_rows(images: torch.Tensor) -> list[list[float]]:  # worker thread
        # One tolist() per batch, off the event loop: each request then gets its rows as a slice of a list,
        # where slicing and converting a tensor view per request would cost the loop several calls into torch.
        # float32 -> Python float is exact, so `torch.tensor(rows)` gives the same probabilities back.
        return forward(images).tolist()

    check_servable(trained, forward)
    labels = [printable(c) for c in trained.classes]
    budget = PixelBudget(limits.max_inflight_pixels)
    batcher = MicroBatcher(forward_rows, max_batch=max_batch, max_wait_ms=max_wait_ms, threads=forward_threads,
                           inline=workers > 1)
    html = page_html(trained)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = ServeApp(title=f"cnnlab: {model.meta.name}", lifespan=lifespan, docs_url=None, redoc_url=None,
                   openapi_url=None)
    app.state.trained, app.state.batcher, app.state.budget, app.state.limits = trained, batcher, budget, limits
    app.fast_predict = fast_predict_handler(limits=limits, budget=budget, batcher=batcher, shape=shape, labels=labels,
                                            invert=trained.preprocess.invert, resize=trained.preprocess.resize,
                                            interpolation=trained.preprocess.interpolation,
                                            read_timeout=read_timeout)
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes, budget=budget, read_timeout=read_timeout)
    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(html)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model.meta.name, "step": trained.step, "classes": labels,
                "dataset": trained.dataset, "data_shape": list(shape), "input_size": list(model.meta.input_size),
                "batching": {"max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1000,
                             **batcher.stats.as_dict()},
                "in_flight": budget.as_dict(), "workers": workers, "worker_pid": os.getpid()}

    async def pending_images(request: Request, kind: str, centre: bool) -> list:
        """The request's images with headers read and nothing decoded (see `decode`)."""
        if kind == "multipart/form-data":
            data = await _form_file(request, limits.max_upload_bytes)
            return await run_in_threadpool(plan_file, data, shape, centre)
        if kind == "application/json":
            body = await request.body()
            # Parsed JSON holds several times its text in Python objects: reserve that while it is alive.
            with budget.hold(JSON_UNITS_PER_BYTE * len(body), "parsing its JSON body"):
                payload = await run_in_threadpool(parse_json, body, limits.max_json_depth)
                return await run_in_threadpool(plan_json, payload, shape, limits.max_images, centre)
        if kind.startswith("image/") or kind == "application/octet-stream":
            return await run_in_threadpool(plan_file, await request.body(), shape, centre)
        raise BadRequest(f"unsupported content type {kind or '(none)'!r}: send an image file (multipart form "
                         "or image/png, image/jpeg body) or JSON {\"images\": [...]}", 415)

    @app.post("/predict")
    async def predict(request: Request, top_k: int = Query(3, ge=1, le=1000),
                      invert: Literal["auto", "yes", "no"] | None = None, centre: bool = False) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        invert = invert or trained.preprocess.invert  # the run's recorded polarity unless the query overrides it
        pending = await pending_images(request, kind, centre)
        # Priced from the headers alone: nothing is decoded unless the request fits both budgets.
        check_request_pixels([p.pixels for p in pending], limits.max_request_pixels)
        with budget.hold(sum(p.cost for p in pending)):
            images = await run_in_threadpool(decode, pending, shape, invert, centre, trained.preprocess.resize,
                                            trained.preprocess.interpolation)
            try:
                rows = await batcher.submit(images)
            except RuntimeError as e:  # shutting down
                raise BadRequest(str(e), 503, {"Retry-After": "1"}) from None
        preds = describe_predictions(torch.tensor(rows, dtype=torch.float32), labels, top_k)
        return JSONResponse({"predictions": preds} if kind == "application/json" else preds[0])

    return app


def check_servable(trained: TrainedModel, forward) -> None:
    """Refuse, at start-up, a model that would fail or mislead on every request.

    Checks that every weight and buffer is finite, that there is a class name for each output, and that one
    blank image of the recorded shape goes through ``forward`` to finite probabilities of the right width.

    Raises:
        CheckpointError: One line naming the checkpoint and what is wrong.
    """
    where = str(trained.path)
    for name, t in [*trained.model.named_parameters(), *trained.model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where}: weight {name} holds NaN or infinite values; the model cannot serve")
    outputs = trained.model.meta.num_classes
    if len(trained.classes) < outputs:
        raise CheckpointError(f"{where}: {len(trained.classes)} class names for {outputs} outputs")
    if not all(isinstance(c, str) for c in trained.classes):
        raise CheckpointError(f"{where}: class names must be strings")
    try:
        probs = forward(torch.zeros((1, *trained.data_shape), dtype=torch.uint8))
    except CnnlabError as e:
        raise CheckpointError(f"{where}: the model cannot run on its recorded input {list(trained.data_shape)}: "
                              f"{e}") from None
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{where}: the model cannot run on its recorded input {list(trained.data_shape)}: "
                              f"{str(e).splitlines()[0][:160]}") from None
    if probs.ndim != 2 or probs.shape[1] > len(trained.classes):
        raise CheckpointError(f"{where}: the model gives {list(probs.shape[1:])} outputs for "
                              f"{len(trained.classes)} class names")
    if not bool(torch.isfinite(probs).all()):
        raise CheckpointError(f"{where}: the model's output on a blank image is not finite (NaN or overflow)")


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answered as JSON {"error": ...}: the client's as 4xx, a full server as 503, and anything
    unforeseen as a logged, generic 500 (the causes found are fixed at their source; this is the net)."""

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return _error(exc.status, str(exc), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_params(request: Request, exc: RequestValidationError):
        msgs = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg', '')}" for e in exc.errors()]
        return _error(422, "; ".join(msgs) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unforeseen(request: Request, exc: Exception):
        if isinstance(exc, MemoryError):
            log.error("out of memory answering %s %s", request.method, request.url.path)
            return _error(503, "server out of memory; retry later", {"Retry-After": "1"})
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return _error(500, "internal server error (logged)")


async def _form_file(request: Request, limit: int) -> bytes:
    """The bytes of the (first) file field of a multipart form."""
    form = await request.form(max_files=1, max_fields=16, max_part_size=limit)
    try:
        for value in form.values():
            if isinstance(value, UploadFile):
                return await value.read()
    finally:
        await form.close()
    raise BadRequest("multipart form has no file field (send the image as e.g. -F file=@digit.png)")
