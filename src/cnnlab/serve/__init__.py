"""Serve a trained run over HTTP: a JSON/image API with micro-batching and a web page to draw or upload.

Needs the 'serve' extra (fastapi, uvicorn, python-multipart, and httptools for the C HTTP parser):
``pip install 'cnnlab[serve]'``.

    from cnnlab.serve import create_app, background_server
    with background_server(create_app("runs/lenet5-mnist")) as srv:
        print(srv.url)
"""

from __future__ import annotations

from ..extras import require_extra

_NEEDED = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart"}


def require_serve() -> None:
    """Raise a one-line `CnnlabError` naming the missing packages when the 'serve' extra is not installed."""
    require_extra(_NEEDED, "serve", "serving")


def __getattr__(name: str):
    # Lazy: importing cnnlab.serve (e.g. for require_serve) must work without the extra installed.
    if name in ("create_app", "MAX_UPLOAD_BYTES"):
        from . import app

        return getattr(app, name)
    if name in ("background_server", "serve_forever", "BackgroundServer", "is_loopback"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'cnnlab.serve' has no attribute {name!r}")


__all__ = [
    "MAX_UPLOAD_BYTES",
    "BackgroundServer",
    "background_server",
    "create_app",
    "is_loopback",
    "require_serve",
    "serve_forever",
]
