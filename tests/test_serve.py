"""The HTTP API on a real uvicorn server on a loopback port: predictions, limits, bad input, batching."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import sys
import threading
import uuid
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab import Classifier, load_dataset
from cnnlab.cli import main

pytest.importorskip("fastapi", reason="the 'serve' extra is not installed")
pytest.importorskip("uvicorn", reason="the 'serve' extra is not installed")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnlab.serve import background_server, create_app
from cnnlab.serve.batcher import MicroBatcher
from cnnlab.serve.limits import BadRequest

UPLOAD_LIMIT = 200_000  # bytes; small so the over-limit tests stay quick


# ----------------------------------------------------------------------------- helpers (also used by test_browser)




def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def multipart(field: str, filename: str, data: bytes, content_type: str = "image/png") -> tuple[bytes, str]:
    """A multipart/form-data body with one file field; returns (body, content type header)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def fetch(url: str, method: str = "GET", body=None, headers: dict | None = None,
         chunked: bool = False) -> tuple[int, bytes]:
    """One request with the standard library; returns (status, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body,
                     headers=headers or {}, encode_chunked=chunked)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def post_json(url: str, payload) -> tuple[int, dict]:
    status, body = fetch(url, "POST", json.dumps(payload).encode(), {"Content-Type": "application/json"})
    return status, json.loads(body)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def served(tiny_run):
    """(server, app, run dir, tiny MNIST test images uint8 [32,1,28,28])."""
    run = tiny_run.path
    images = load_dataset("mnist", "test", data_dir=tiny_run.data).images
    # A 20 ms window makes the batching test independent of how fast this machine is.
    app = create_app(run, max_wait_ms=20, max_upload_bytes=UPLOAD_LIMIT, max_images=8)
    with background_server(app) as server:
        yield server, app, run, images


@pytest.fixture(scope="module")
def python_api(served):
    return Classifier(model_dir=served[2])


def digit_png(images: torch.Tensor, i: int, scale: int = 1) -> bytes:
    im = Image.fromarray(images[i, 0].numpy())
    if scale != 1:
        im = im.resize((28 * scale, 28 * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- API


def test_health_names_the_model(served):
    server, app, run, _ = served
    status, body = fetch(server.url + "/health")
    h = json.loads(body)
    assert status == 200
    assert h["status"] == "ok" and h["model"] == "lenet5" and h["step"] == 4
    assert h["classes"] == [str(i) for i in range(10)] and h["data_shape"] == [1, 28, 28]
    assert h["workers"] == 1 and h["worker_pid"] == os.getpid()  # the background server runs in this process


def test_multipart_and_raw_uploads_predict_like_the_python_api(served, python_api):
    server, _, _, images = served
    for i in (0, 7):
        png = digit_png(images, i, scale=3)  # 84x84: the server resizes it as `cnnlab predict` would
        want = python_api.predict(Image.open(io.BytesIO(png)), top_k=3)[0]
        body, ctype = multipart("file", "digit.png", png)
        s1, r1 = fetch(server.url + "/predict", "POST", body, {"Content-Type": ctype})
        s2, r2 = fetch(server.url + "/predict?top_k=2", "POST", png, {"Content-Type": "image/png"})
        assert s1 == 200 and s2 == 200
        r1, r2 = json.loads(r1), json.loads(r2)
        for r in (r1, r2):
            assert r["class"] == want["class"] and r["label"] == want["label"]
            assert r["probability"] == pytest.approx(want["probability"], abs=1e-6)
            assert np.allclose(r["probabilities"], want["probabilities"], atol=1e-6)
            assert sum(r["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert len(r1["top_k"]) == 3 and len(r2["top_k"]) == 2
        assert r1["top_k"][0]["class"] == r1["class"]


def test_centre_query_frames_a_small_digit_like_the_python_api(served, python_api):
    server, _, _, images = served
    page = np.zeros((280, 280), np.uint8)  # a digit drawn small in a corner of the page's 280x280 canvas
    page[20:76, 200:256] = np.asarray(Image.fromarray(images[3, 0].numpy()).resize((56, 56)))
    buf = io.BytesIO()
    Image.fromarray(page).save(buf, format="PNG")
    answers = {}
    for centre in ("true", "false"):
        status, body = fetch(server.url + f"/predict?centre={centre}", "POST", buf.getvalue(),
                             {"Content-Type": "image/png"})
        assert status == 200
        answers[centre] = json.loads(body)
    want = python_api.predict(Image.fromarray(page), centre=True)[0]
    assert np.allclose(answers["true"]["probabilities"], want["probabilities"], atol=1e-6)
    assert not np.allclose(answers["true"]["probabilities"], answers["false"]["probabilities"], atol=1e-4)


def test_jpeg_upload(served, python_api):
    server, _, _, images = served
    buf = io.BytesIO()
    Image.fromarray(images[3, 0].numpy()).convert("RGB").save(buf, format="JPEG", quality=95)
    status, body = fetch(server.url + "/predict", "POST", buf.getvalue(), {"Content-Type": "image/jpeg"})
    want = python_api.predict(Image.open(io.BytesIO(buf.getvalue())))[0]
    assert status == 200 and json.loads(body)["class"] == want["class"]


def test_json_batch_of_base64_files_and_pixel_arrays(served, python_api):
    server, _, _, images = served
    items = [base64.b64encode(digit_png(images, 0)).decode(),
             "data:image/png;base64," + base64.b64encode(digit_png(images, 1)).decode(),
             images[2, 0].tolist(),  # integers 0..255
             (images[3, 0].float() / 255).tolist()]  # floats in [0, 1]
    status, body = post_json(server.url + "/predict", {"images": items})
    assert status == 200
    got = body["predictions"]
    want = python_api.predict(images[:4])
    assert [g["class"] for g in got] == [w["class"] for w in want]
    for g, w in zip(got, want):
        assert np.allclose(g["probabilities"], w["probabilities"], atol=1e-5)


def test_page_is_self_contained_with_canvas_and_result_area(served):
    server = served[0]
    status, body = fetch(server.url + "/")
    page = body.decode()
    assert status == 200
    for needle in ('<canvas id="canvas" width="280" height="280"', 'id="prediction"', 'id="chart"',
                   'type="file"', 'id="clear"', '"draw": true', '"model": "lenet5"'):
        assert needle in page
    assert "http://" not in page and "https://" not in page and "<link" not in page  # nothing from the network
    assert "/*CNNLAB_FACTS*/" not in page


# ----------------------------------------------------------------------------- bad input: always 4xx with a message


def _bad_requests(images) -> dict:
    png = digit_png(images, 0)
    over = b"\x89PNG" + b"\0" * (UPLOAD_LIMIT + 10)
    big_form, ctype_big_form = multipart("file", "x.png", over)
    text_file, ctype_text = multipart("file", "notes.txt", b"just some text", "text/plain")
    no_file = (b"--xx\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--xx--\r\n",
               "multipart/form-data; boundary=xx")
    b64 = base64.b64encode(png).decode()
    return {
        "over limit (declared length)": (over, {"Content-Type": "image/png"}, False, 413, "over the limit"),
        "over limit (chunked)": ((over[i:i + 65536] for i in range(0, len(over), 65536)),
                                 {"Content-Type": "image/png"}, True, 413, "over the limit"),
        "multipart over limit": (big_form, {"Content-Type": ctype_big_form}, False, 413, "over the limit"),
        "text file in form": (text_file, {"Content-Type": ctype_text}, False, 400, "not an image"),
        "truncated png": (png[: len(png) // 2], {"Content-Type": "image/png"}, False, 400, "not a readable image"),
        "empty body": (b"", {"Content-Type": "image/png"}, False, 400, "empty"),
        "form without file": (no_file[0], {"Content-Type": no_file[1]}, False, 400, "no file field"),
        "unsupported type": (b"hello", {"Content-Type": "text/plain"}, False, 415, "unsupported content type"),
        "no type": (b"hello", {}, False, 415, "unsupported content type"),
        "broken json": (b'{"images": [', {"Content-Type": "application/json"}, False, 400, "not valid JSON"),
        "json without images": (b'{"x": 1}', {"Content-Type": "application/json"}, False, 400, '"images"'),
        "json empty list": (b'{"images": []}', {"Content-Type": "application/json"}, False, 400, "non-empty"),
        "json bad base64": (b'{"images": ["@@@"]}', {"Content-Type": "application/json"}, False, 400, "base64"),
        "json base64 of text": (json.dumps({"images": [base64.b64encode(b"hello").decode()]}).encode(),
                                {"Content-Type": "application/json"}, False, 400, "not an image"),
        "json ragged array": (b'{"images": [[[1, 2], [3]]]}', {"Content-Type": "application/json"}, False, 400,
                              "images[0]"),
        "json pixel out of range": (b'{"images": [[[0, 300]]]}', {"Content-Type": "application/json"}, False, 400,
                                    "0..255"),
        "json float out of range": (b'{"images": [[[0.5, 1.5]]]}', {"Content-Type": "application/json"}, False,
                                    400, "[0, 1]"),
        "json wrong item": (b'{"images": [{"a": 1}]}', {"Content-Type": "application/json"}, False, 400,
                            "base64 string or a nested list"),
        "json too many images": (json.dumps({"images": [b64] * 9}).encode(), {"Content-Type": "application/json"},
                                 False, 413, "too many images"),
    }


BAD_CASES = list(_bad_requests(torch.zeros(1, 1, 28, 28, dtype=torch.uint8)))


@pytest.mark.robust
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_uploads_get_4xx_with_a_message(served, case):
    server, _, _, images = served
    body, headers, chunked, want_status, want_text = _bad_requests(images)[case]
    status, answer = fetch(server.url + "/predict", "POST", body, headers, chunked=chunked)
    assert status == want_status, answer
    message = json.loads(answer)["error"]
    assert want_text in message
    # the server is still fine afterwards
    assert fetch(server.url + "/health")[0] == 200


@pytest.mark.robust
@pytest.mark.parametrize("query", ["top_k=0", "top_k=x", "invert=maybe"])
def test_bad_query_parameters_are_422(served, query):
    server, _, _, images = served
    status, answer = fetch(server.url + f"/predict?{query}", "POST", digit_png(images, 0),
                           {"Content-Type": "image/png"})
    assert status == 422 and json.loads(answer)["error"].split(":")[0] in query


@pytest.mark.robust
def test_decompression_bomb_is_refused(served):
    server = served[0]
    from cnnlab.data.images import MAX_PIXELS

    side = int(MAX_PIXELS ** 0.5) + 1  # one pixel row over the per-image cap shared with `cnnlab predict`
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")  # tens of megapixels of zeros compress to kilobytes
    assert len(buf.getvalue()) < UPLOAD_LIMIT
    status, answer = fetch(server.url + "/predict", "POST", buf.getvalue(), {"Content-Type": "image/png"})
    assert status == 413 and "too large" in json.loads(answer)["error"]


# ----------------------------------------------------------------------------- the lean path for raw image bodies


def _scope(query: bytes = b"", headers=((b"content-type", b"image/png"), (b"content-length", b"10")),
           method: str = "POST", path: str = "/predict") -> dict:
    return {"type": "http", "method": method, "path": path, "query_string": query, "headers": list(headers)}


def test_raw_image_route_takes_only_requests_it_understands_completely():
    from cnnlab.serve.fastpath import RawImageRequest, raw_image_route

    assert raw_image_route(_scope()) == RawImageRequest(10)
    assert raw_image_route(_scope(b"top_k=2&invert=yes&centre=true")) == RawImageRequest(10, 2, "yes", True)
    assert raw_image_route(_scope(b"centre=0&top_k=1000")) == RawImageRequest(10, 1000, None, False)
    octet = ((b"content-type", b"Application/Octet-Stream; x=1"), (b"content-length", b"0"))
    assert raw_image_route(_scope(headers=octet)) == RawImageRequest(0)
    # everything else is left to the full path, which answers it (or refuses it) as it always has
    for query in (b"top_k=0", b"top_k=1001", b"top_k=x", b"top_k=", b"top_k", b"top_k=%33", b"top_k=+3",
                  b"top_k=2&top_k=3", b"invert=maybe", b"centre=on", b"other=1"):
        assert raw_image_route(_scope(query)) is None, query
    for headers in (((b"content-type", b"image/png"),),  # no length: chunked
                    ((b"content-type", b"image/png"), (b"content-length", b"10"), (b"transfer-encoding", b"chunked")),
                    ((b"content-type", b"image/png"), (b"content-length", b"-1")),
                    ((b"content-type", b"application/json"), (b"content-length", b"10")),
                    ((b"content-type", b"image/png"), (b"content-type", b"image/png"), (b"content-length", b"1")),
                    ((b"content-length", b"10"),)):
        assert raw_image_route(_scope(headers=headers)) is None, headers
    assert raw_image_route(_scope(method="GET")) is None and raw_image_route(_scope(path="/health")) is None


def test_describe_row_is_describe_predictions_for_one_row():
    from cnnlab.infer import describe_predictions
    from cnnlab.serve.fastpath import describe_row

    labels = [f"c{i}" for i in range(10)]
    rows = torch.cat([torch.softmax(torch.randn(4, 10, generator=torch.Generator().manual_seed(0)) * 9, 1),
                      torch.tensor([[1.0] + [0.0] * 9, [0.1] * 10])])  # ties: saturated and uniform
    for row in rows:
        for k in (1, 3, 10, 50):
            assert describe_row(row, labels, k) == describe_predictions(row[None], labels, k)[0]


def test_answers_are_the_json_encoders_bytes():
    from cnnlab.infer import describe_predictions
    from cnnlab.serve.fastpath import Answers, json_body

    labels = [f"c{i}" for i in range(9)] + ['é "quoted" \\ \n <tag>']  # escapes, non-ASCII kept as is
    gen = torch.Generator().manual_seed(1)
    rows = torch.cat([torch.softmax(torch.randn(40, 10, generator=gen) * 9, 1),
                      torch.softmax(torch.randn(4, 10, generator=gen) * 300, 1),  # saturated: exact 0s and 1s
                      torch.tensor([[0.1] * 10, [0.3, 0.3, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0]])])  # ties
    answers = Answers(labels)
    for row in rows:
        for k in (1, 3, 10, 50):
            assert answers.body(row.tolist(), k) == json_body(describe_predictions(row[None], labels, k)[0])
    with pytest.raises(ValueError, match="JSON compliant"):  # as the full path's JSONResponse
        answers.body([float("nan")] + [0.1] * 9, 3)


def _encode_png(array: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save)
    return buf.getvalue()


def _with_chunk(data: bytes, kind: bytes, payload: bytes) -> bytes:
    """``data`` with one more chunk right after IHDR (checksum correct)."""
    import struct
    import zlib

    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return data[:33] + chunk + data[33:]


def _ihdr_byte(data: bytes, offset: int, value: int) -> bytes:
    """``data`` with IHDR byte ``offset`` (0: width's first) set to ``value`` and its checksum fixed."""
    import struct
    import zlib

    ihdr = bytearray(data[12:29])
    ihdr[4 + offset] = value
    return data[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + data[33:]


def _decoded_both_ways(data: bytes, shape, invert: str, centre: bool, monkeypatch):
    """`decode` of ``data`` as the server runs it, and with every file going through PIL's opener: each a tensor
    or the BadRequest's (status, message)."""
    from cnnlab.serve import decode as decode_module

    results = []
    for plain in (decode_module.plain_png, lambda data: None):
        monkeypatch.setattr(decode_module, "plain_png", plain)
        try:
            pending = decode_module.plan_file(data, shape, centre)
            results.append(decode_module.decode(pending, shape, invert, centre))
        except BadRequest as e:
            results.append((e.status, str(e)))
    return results


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b


def test_plain_pngs_take_the_short_decoder_and_everything_else_pil(monkeypatch):
    from cnnlab.serve.decode import plain_png

    rng = np.random.default_rng(0)
    gray, rgb = rng.integers(0, 256, (28, 28), dtype=np.uint8), rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    assert plain_png(_encode_png(gray)).mode == "L" and plain_png(_encode_png(rgb)).size == (13, 9)
    base = _encode_png(gray)
    others = {
        "text chunk": _encode_png(gray, pnginfo=_text_info()),
        "transparency": _with_chunk(base, b"tRNS", b"\x00\x07"),
        "exif orientation": _encode_png(gray, exif=_rotated_exif()),
        "16-bit": _encode_png(gray.astype(np.uint16) * 257),
        "palette": _palette_png(gray),
        "gray+alpha": _encode_png(np.stack([gray, gray], -1)),
        "interlaced": _ihdr_byte(base, 12, 1),
        "bad checksum": base[:29] + b"\0\0\0\0" + base[33:],
        "after IEND": base + b"\0",
        "truncated": base[:-20],
        "broken data": base[:45] + bytes([base[45] ^ 0xFF]) + base[46:],
    }
    for name, data in others.items():
        assert plain_png(data) is None, name
    # Whichever way a file goes, it decodes to the same pixels (or the same refusal) as through PIL's opener.
    for name, data in {"gray": base, "rgb": _encode_png(rgb), **others}.items():
        for shape in ((1, 28, 28), (3, 16, 16)):
            for invert in ("auto", "yes", "no"):
                for centre in (False, True):
                    fast, pil = _decoded_both_ways(data, shape, invert, centre, monkeypatch)
                    assert _same(fast, pil), (name, shape, invert, centre)


def test_the_server_resizes_with_the_runs_recorded_filter():
    """`decode` (both server paths) prepares an upload with the recorded interpolation, as `as_batch` does for
    `cnnlab predict`."""
    from cnnlab.data.images import as_batch
    from cnnlab.serve.decode import decode, plan_file

    pixels = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for data in (_encode_png(pixels), _encode_png(pixels[..., 0])):
        seen = {}
        for interpolation in ("bilinear", "nearest", "bicubic"):
            for shape in ((3, 16, 16), (1, 20, 24)):
                got = decode(plan_file(data, shape), shape, "no", False, "shorter-crop", interpolation)
                want = as_batch([Image.open(io.BytesIO(data))], shape[0], shape[1:], "no", False,
                                resize="shorter-crop", interpolation=interpolation)
                assert torch.equal(got, want), (interpolation, shape)
                seen[interpolation, shape] = got
        assert not torch.equal(seen["nearest", (3, 16, 16)], seen["bilinear", (3, 16, 16)])


def _text_info():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "drawn on a phone")
    return info


def _rotated_exif():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    return exif


def _palette_png(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).convert("P").save(buf, format="PNG")
    return buf.getvalue()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_pngs_decode_alike_both_ways(monkeypatch, data):
    """Random images, sizes, polarity rules and damaged bytes: the short decoder and PIL's opener agree."""
    h, w = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    channels = data.draw(st.sampled_from([1, 3]))
    seed = data.draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w) if channels == 1 else (h, w, 3), dtype=np.uint8)
    if data.draw(st.booleans()):  # a light background with a dark stroke, as a digit on paper
        pixels = np.maximum(pixels, 200).astype(np.uint8)
    raw = bytearray(_encode_png(pixels))
    for _ in range(data.draw(st.integers(0, 2))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    shape = data.draw(st.sampled_from([(1, 28, 28), (1, h, w), (3, 8, 8)]))
    invert, centre = data.draw(st.sampled_from(["auto", "yes", "no"])), data.draw(st.booleans())
    fast, pil = _decoded_both_ways(bytes(raw), shape, invert, centre, monkeypatch)
    assert _same(fast, pil)


@pytest.mark.robust
def test_lean_path_answers_as_the_full_path_does(served):
    """The same raw body sent once through the lean path and once with a query only the full path takes
    (``top_k=%33`` is FastAPI's 3): same statuses, same answers, same error messages."""
    server, app, _, images = served
    taken = []
    lean = app.fast_predict

    async def counting(*args):
        taken.append(1)
        return await lean(*args)

    bomb = io.BytesIO()
    Image.new("1", (8000, 8000)).save(bomb, format="PNG")  # over the per-image cap, a few KB
    good = digit_png(images, 3, scale=2)
    broken = bytearray(good)
    broken[-20] ^= 0xFF  # inside the image data: the header reads, the decoder fails
    bodies = {"digit": good, "gray-alpha": png_bytes(np.full((30, 20, 2), 200, np.uint8)),
              "truncated": good[:40], "broken data": bytes(broken), "header only": good[:24], "empty": b"",
              "text": b"hello", "bomb": bomb.getvalue(), "over": b"\x89PNG" + b"\0" * (UPLOAD_LIMIT + 1)}
    app.fast_predict = counting
    try:
        for name, body in bodies.items():
            before = len(taken)
            s1, a1 = fetch(server.url + "/predict?top_k=3", "POST", body, {"Content-Type": "image/png"})
            assert len(taken) == before + 1, name
            s2, a2 = fetch(server.url + "/predict?top_k=%33", "POST", body, {"Content-Type": "image/png"})
            assert len(taken) == before + 1, name
            assert s1 == s2, (name, a1, a2)
            a1, a2 = json.loads(a1), json.loads(a2)
            if s1 == 200:
                assert a1.keys() == a2.keys() and a1["class"] == a2["class"] and len(a1["top_k"]) == 3
                assert np.allclose(a1["probabilities"], a2["probabilities"], atol=1e-6)
            else:
                assert a1 == a2, name
    finally:
        app.fast_predict = lean
    assert settled_budget(app) == 0


def settled_budget(app) -> int:
    """The in-flight budget once finished requests have given theirs back (bounded wait, no timing assertion)."""
    import time

    budget = app.state.budget
    deadline = time.monotonic() + 30
    while budget.in_use and time.monotonic() < deadline:
        time.sleep(0.005)
    return budget.in_use


# ----------------------------------------------------------------------------- batching


def test_concurrent_requests_share_forward_passes(served, python_api):
    server, app, _, images = served
    n = 24
    stats = app.state.batcher.stats
    before = (stats.requests, stats.forward_passes)
    pngs = [digit_png(images, i) for i in range(n)]
    results: list = [None] * n
    start = threading.Barrier(n)

    def client(i: int) -> None:
        start.wait()
        results[i] = fetch(server.url + "/predict", "POST", pngs[i], {"Content-Type": "image/png"})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None and r[0] == 200 for r in results)
    want = python_api.predict(images[:n])
    # each client got the answer for its own image, not a neighbour's in the batch
    for r, w in zip(results, want):
        assert np.allclose(json.loads(r[1])["probabilities"], w["probabilities"], atol=1e-5)
    requests, passes = stats.requests - before[0], stats.forward_passes - before[1]
    assert requests == n
    assert passes < n, f"{n} concurrent requests took {passes} forward passes"
    status, body = fetch(server.url + "/health")
    assert json.loads(body)["batching"]["largest_batch"] > 1


def _run_batcher(coro_fn):
    return asyncio.run(coro_fn())


def test_micro_batcher_splits_results_caps_batches_and_survives_errors():
    calls: list[int] = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        if (x == 99).any():
            raise ValueError("bad batch")
        return x.float() * 2

    async def scenario():
        b = MicroBatcher(forward, max_batch=4, max_wait_ms=50)
        await b.start()
        # 10 single-image requests at once: batches of at most 4, every caller gets its own row back
        outs = await asyncio.gather(*(b.submit(torch.full((1, 1), i)) for i in range(10)))
        assert [o.item() for o in outs] == [2 * i for i in range(10)]
        assert calls == [4, 4, 2]
        # a request larger than max_batch runs alone
        calls.clear()
        big = await b.submit(torch.arange(6).view(6, 1))
        assert big.view(-1).tolist() == [0, 2, 4, 6, 8, 10] and calls == [6]
        # a failing forward pass fails its own callers only; the next batch works
        with pytest.raises(ValueError, match="bad batch"):
            await b.submit(torch.full((1, 1), 99))
        assert (await b.submit(torch.ones(1, 1))).item() == 2
        assert b.stats.forward_passes == 5 and b.stats.largest_batch == 6
        await b.stop()
        with pytest.raises(RuntimeError, match="not running"):
            await b.submit(torch.ones(1, 1))

    _run_batcher(scenario)


# ----------------------------------------------------------------------------- CLI


def test_serve_process_hands_over_the_child_and_its_log(tmp_path):
    from cnnlab.serve.server import serve_process

    spawned = []
    with pytest.raises(RuntimeError, match="did not start") as e:
        with serve_process(tmp_path / "nope", on_spawn=spawned.append, startup_s=120):
            pass
    assert "no such run directory" in str(e.value)  # the child's own error, read from its log
    assert len(spawned) == 1 and spawned[0].poll() is not None


@pytest.mark.robust
def test_cli_serve_bad_run_dir_is_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnlab: error: no such run directory") and len(err.strip().splitlines()) == 1


@pytest.mark.robust
def test_cli_serve_missing_packages_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "python_multipart", None)
    assert main(["serve", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == ("cnnlab: error: serving needs python-multipart: "
                                               "pip install 'cnnlab[serve]'")


@pytest.mark.robust
def test_cli_serve_port_in_use_is_one_line(served, capsys):
    server, _, run, _ = served
    port = urlsplit(server.url).port
    assert main(["serve", str(run), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cnnlab: error: cannot listen on 127.0.0.1:{port}") and len(err.strip().splitlines()) == 1


@pytest.mark.robust
def test_cli_serve_on_an_address_that_does_not_resolve_is_one_line_without_the_warning(served, capsys):
    _, _, run, _ = served
    assert main(["serve", str(run), "--host", "999.1.1.1", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnnlab: error: cannot listen on 999.1.1.1:0") and len(err.strip().splitlines()) == 1


def test_cli_serve_on_every_interface_gets_past_the_address_check(tiny_run, monkeypatch, capsys):
    import cnnlab.serve

    started = []
    monkeypatch.setattr(cnnlab.serve, "serve_forever", lambda app, host, port, **kw: started.append(host) or 0)
    assert main(["serve", str(tiny_run.path), "--host", "", "--port", "0"]) == 0  # '' is INADDR_ANY
    assert started == [""] and "reachable from other machines" in capsys.readouterr().err


def test_page_for_a_colour_model_hides_the_canvas_and_escapes_class_names(tmp_path):
    from cnnlab import create_model
    from cnnlab.infer import TrainedModel
    from cnnlab.serve.app import page_html

    classes = ["cat</script><script>alert(1)</script>"] + [f"c{i}" for i in range(9)]
    trained = TrainedModel(model=create_model("cifar10-prettytensor"), classes=classes, data_shape=(3, 32, 32),
                           dataset="cifar10", step=1, config={}, path=tmp_path / "ckpt")
    page = page_html(trained)
    facts = json.loads(page.split("const FACTS = ", 1)[1].split(";\n", 1)[0])
    assert facts["draw"] is False and facts["classes"] == classes and facts["data_shape"] == [3, 32, 32]
    assert "</script><script>alert" not in page  # a class name cannot end the script block
