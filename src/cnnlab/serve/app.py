"""The HTTP API and web page of a trained run: ``create_app(run_dir)`` returns a FastAPI app.

Routes:
    GET  /         a self-contained page: draw a digit (one-channel models) or upload an image, see the
                   prediction and a bar chart of probabilities.
    GET  /health   {status, model, step, classes, dataset, data_shape, input_size, batching counters}
    POST /predict  body: an image file (multipart form field, or the raw bytes with an image/* type), or JSON
                   {"images": [base64 image files or pixel arrays]}. Query: top_k (default 3), invert
                   (auto|yes|no, as `cnnlab predict`; default: as the run recorded), centre (true|false: frame a
                   grayscale digit as MNIST does, as `cnnlab predict --centre`). Answers {class, label, probability, probabilities, top_k}
                   for a file, {"predictions": [...]} for a JSON batch; errors {"error": message} with a 4xx.

The model is loaded once, when the app is created; requests are batched by a `MicroBatcher`.
"""

from __future__ import annotations

import json
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

from ..infer import TrainedModel, describe_predictions, load_trained, select_device
from .batcher import MicroBatcher
from .decode import BadRequest, image_file_batch, json_batch

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_IMAGES = 256  # per JSON request


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413, whether or not they declare a
    Content-Length (a chunked body is counted as it arrives and cut off at the limit)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            response = _error(413, f"request body over the limit of {self.max_bytes:,} bytes")
            return await response(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BadRequest(f"request body over the limit of {self.max_bytes:,} bytes", 413)
            return message

        return await self.app(scope, counted_receive, send)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def page_html(trained: TrainedModel) -> str:
    """The web page with the model's facts filled in (JSON in a script tag; '<' escaped so no text in class
    names can close the tag)."""
    page = resources.files("cnnlab.serve").joinpath("page.html").read_text(encoding="utf-8")
    facts = {"model": trained.model.meta.name, "classes": trained.classes, "data_shape": list(trained.data_shape),
             "step": trained.step, "dataset": trained.dataset, "draw": trained.data_shape[0] == 1}
    return page.replace("/*CNNLAB_FACTS*/{}", json.dumps(facts).replace("<", "\\u003c"))


def create_app(run: str | Path, *, device: str = "cpu", max_batch: int = 64, max_wait_ms: float = 5.0,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_images: int = MAX_IMAGES,
               trained: TrainedModel | None = None) -> FastAPI:
    """Build the app for a run directory or checkpoint file (loaded now, once).

    Args:
        run: Run directory (newest checkpoint) or checkpoint file.
        device: 'cpu', 'cuda' or 'auto'.
        max_batch: Most images per forward pass.
        max_wait_ms: How long a request waits for others to share its forward pass.
        max_upload_bytes: Largest request body accepted (413 above).
        max_images: Most images in one JSON request (413 above).
        trained: An already loaded model (then ``run`` only names it).

    Raises:
        CnnlabError: The run has no usable checkpoint (raised here, before any port is opened).
    """
    trained = trained or load_trained(run, select_device(device))
    model = trained.model
    shape = tuple(trained.data_shape)

    @torch.inference_mode()
    def forward(images: torch.Tensor) -> torch.Tensor:  # uint8 [N,C,H,W] -> probabilities [N,K]; worker thread
        # the run's recorded TTA, precision, layout and crop, as `cnnlab predict` and `evaluate`
        return torch.softmax(trained.logits(images, batch_size=max(max_batch, len(images))), 1)

    batcher = MicroBatcher(forward, max_batch=max_batch, max_wait_ms=max_wait_ms)
    html = page_html(trained)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title=f"cnnlab: {model.meta.name}", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.trained, app.state.batcher = trained, batcher
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return _error(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_params(request: Request, exc: RequestValidationError):
        msgs = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg', '')}" for e in exc.errors()]
        return _error(422, "; ".join(msgs) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(html)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model.meta.name, "step": trained.step, "classes": trained.classes,
                "dataset": trained.dataset, "data_shape": list(shape), "input_size": list(model.meta.input_size),
                "batching": {"max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1000,
                             **batcher.stats.as_dict()}}

    @app.post("/predict")
    async def predict(request: Request, top_k: int = Query(3, ge=1, le=1000),
                      invert: Literal["auto", "yes", "no"] | None = None, centre: bool = False) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        invert = invert or trained.preprocess.invert  # the run's recorded polarity unless the query overrides it
        if kind == "multipart/form-data":
            images = await run_in_threadpool(image_file_batch, await _form_file(request, max_upload_bytes),
                                             shape, invert, centre)
        elif kind == "application/json":
            try:
                payload = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as e:
                raise BadRequest(f"body is not valid JSON ({str(e)[:80]})") from None
            images = await run_in_threadpool(json_batch, payload, shape, invert, max_images, centre)
        elif kind.startswith("image/") or kind == "application/octet-stream":
            images = await run_in_threadpool(image_file_batch, await request.body(), shape, invert, centre)
        else:
            raise BadRequest(f"unsupported content type {kind or '(none)'!r}: send an image file (multipart form "
                             "or image/png, image/jpeg body) or JSON {\"images\": [...]}", 415)
        try:
            probs = await batcher.submit(images)
        except RuntimeError as e:
            return _error(503, str(e))
        preds = describe_predictions(probs, trained.classes, top_k)
        return JSONResponse({"predictions": preds} if kind == "application/json" else preds[0])

    return app


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
