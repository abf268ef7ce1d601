"""What one request, and all requests together, may cost the server: bytes, images, decoded pixels, JSON depth.

A small compressed file can decode to a huge bitmap, so request bodies are limited in bytes *and* in the
decoded pixels their images declare in their headers; the pixel count is checked before anything is decoded.
A global budget caps the pixels held by all requests in flight at once; a request that would exceed it is
answered 503 with Retry-After instead of waiting, so memory stays bounded however many clients connect.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CnnlabError

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_IMAGES = 256  # per JSON request
MAX_REQUEST_PIXELS = 50_000_000  # decoded pixels in one request (sum over its images)
MAX_INFLIGHT_PIXELS = 100_000_000  # decoded pixels of all requests being decoded or predicted at once
MAX_JSON_DEPTH = 32  # {"images": [[[[pixel]]]]} needs 5; deeper bodies are refused before parsing
JSON_UNITS_PER_BYTE = 8  # parsed JSON holds up to ~25 bytes of Python objects per byte of text (`[],[],...`)
RETRY_AFTER_S = 1  # what a 503 for a full pixel budget asks the client to wait


class BadRequest(CnnlabError):
    """A client error (or a full server: 503): answered with ``status`` and the message, never a 500."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class Limits:
    """The request limits of one server (all positive).

    Attributes:
        max_upload_bytes: Largest request body (413 above).
        max_images: Most images in one JSON request (413 above).
        max_request_pixels: Most decoded pixels in one request, summed over its images (413 above).
        max_inflight_pixels: Most decoded pixels of all requests in flight together (503 above).
        max_json_depth: Deepest nesting of arrays/objects in a JSON body (400 above).
    """

    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_images: int = MAX_IMAGES
    max_request_pixels: int = MAX_REQUEST_PIXELS
    max_inflight_pixels: int = MAX_INFLIGHT_PIXELS
    max_json_depth: int = MAX_JSON_DEPTH

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise CnnlabError(f"serve limit {name} must be a positive integer, got {value!r}")


class PixelBudget:
    """Memory units reserved by the requests in flight, capped at ``capacity``.

    The unit is one decoded pixel; a request body's byte and a JSON body's parsed objects are counted in the
    same units (`JSON_UNITS_PER_BYTE`), so one budget bounds what all requests hold together. Reservations are
    made before the memory is used and released when the request is answered; one that does not fit is
    refused at once (503) rather than queued, so a burst cannot pile up waiting requests.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self.refused = 0
        self._lock = threading.Lock()  # taken on the event loop, given back from whichever thread finishes

    def take(self, units: int, what: str = "this request") -> None:
        """Reserve ``units``, or raise BadRequest 503 with Retry-After when they do not fit."""
        with self._lock:
            if self.in_use + units <= self.capacity:
                self.in_use += units
                return
            self.refused += 1
            busy = self.in_use
        raise BadRequest(f"server busy: {busy:,} units (decoded pixels or body bytes) in flight, {what} needs "
                         f"{units:,} more (limit {self.capacity:,}); retry later", 503,
                         {"Retry-After": str(RETRY_AFTER_S)})

    def give(self, units: int) -> None:
        """Release ``units`` reserved by `take`."""
        with self._lock:
            self.in_use -= units

    @contextmanager
    def hold(self, units: int, what: str = "this request") -> Iterator[None]:
        """Reserve ``units`` for the ``with`` block (BadRequest 503 when they do not fit)."""
        self.take(units, what)
        try:
            yield
        finally:
            self.give(units)

    def as_dict(self) -> dict:
        return {"in_use": self.in_use, "capacity": self.capacity, "refused": self.refused}


def check_request_pixels(counts: list[int], limit: int) -> int:
    """The total of ``counts`` (decoded pixels of each image), or BadRequest 413 when over ``limit``."""
    total = sum(counts)
    if total > limit:
        raise BadRequest(f"request too large: its {len(counts)} image(s) decode to {total:,} pixels, at most "
                         f"{limit:,} per request", 413)
    return total


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string with its escapes (no backtracking blow-up)
_STEP = np.zeros(256, np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays/objects in a JSON text, brackets inside strings not counted.

    Strings are blanked by one regular-expression pass and the brackets counted with numpy, so a body of
    megabytes is scanned without recursion or a Python loop; the text need not be valid JSON (the parser
    refuses invalid bodies afterwards).
    """
    skeleton = _STRING.sub(b'""', body)
    if not skeleton:
        return 0
    steps = _STEP[np.frombuffer(skeleton, np.uint8)]
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def parse_json(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON body parsed, its depth checked first: BadRequest 400 for too deep or invalid JSON."""
    depth = json_depth(body)
    if depth > max_depth:
        raise BadRequest(f"JSON body nested {depth} levels deep, at most {max_depth}")
    try:
        return json.loads(body)
    except RecursionError:  # cannot happen below max_depth; kept so no parser limit ever becomes a 500
        raise BadRequest(f"JSON body nested too deep (at most {max_depth} levels)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON ({str(e)[:80]})") from None
