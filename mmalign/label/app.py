"""The labelling web app (Starlette) and its server (uvicorn, on 127.0.0.1 only).

GET  /                 the page (mmalign.label.page)
GET  /api/pairs        every pair with its answer, and the progress
POST /api/label        {"index": i, "answer": "left" | "right" | "tie" | "clear", "expected": the answer
                       the page saw} -> the same as /api/pairs; 409 (and the file's pairs) when the pair
                       was answered meanwhile in another tab
GET  /media/<file>     a file named by a pair (nothing else of the disk)
"""

from __future__ import annotations

import html
import socket
from pathlib import Path

from mmalign.label.page import PAGE
from mmalign.label.store import LabelError, LabelStore, StaleAnswer

HOST = "127.0.0.1"


def create_app(directory: str | Path):
    """The Starlette app serving DIR's pairs; raises LabelError when DIR has no pairs."""
    # deferred: starlette is the `ui` extra
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.routing import Route

    store = LabelStore(directory)

    async def page(request: Request):
        return HTMLResponse(PAGE.replace("{{DIR}}", html.escape(str(store.dir))))

    async def pairs(request: Request):
        return JSONResponse(store.summary())

    async def label(request: Request):
        try:
            body = await request.json()
            expected = body.get("expected")
            store.answer(int(body["index"]), str(body["answer"]), None if expected is None else str(expected))
        except StaleAnswer as e:  # the page's view is out of date: send it the file's
            return JSONResponse({"error": str(e), **store.summary()}, status_code=409)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # LabelError is a ValueError
            return JSONResponse({"error": str(e)}, status_code=400)
        return JSONResponse(store.summary())

    async def media(request: Request):
        path = store.media_path(request.path_params["path"])
        if path is None:
            return PlainTextResponse("not a file of this round", status_code=404)
        return FileResponse(path)

    routes = [
        Route("/", page),
        Route("/api/pairs", pairs),
        Route("/api/label", label, methods=["POST"]),
        Route("/media/{path:path}", media),
    ]
    # a page on another site cannot reach the server through a DNS name pointing at 127.0.0.1
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=[HOST, "localhost"])]
    return Starlette(routes=routes, middleware=middleware)


def check_port(port: int) -> None:
    """LabelError naming the port when something already listens on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed server's port is free
        try:
            s.bind((HOST, port))
        except OSError:
            raise LabelError(f"port {port} is in use on {HOST}; give another with --port") from None


def serve(directory: str | Path, port: int = 8765, open_browser: bool = False) -> None:
    """Serve the labelling page of DIR on http://127.0.0.1:PORT until interrupted."""
    import uvicorn  # deferred: the `ui` extra

    app = create_app(directory)
    check_port(port)
    url = f"http://{HOST}:{port}/"
    print(
        f"labelling {Path(directory) / 'pairs.jsonl'} at {url} (Ctrl+C to stop; every answer is saved at once)",
        flush=True,
    )
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    uvicorn.run(app, host=HOST, port=port, log_level="warning")
