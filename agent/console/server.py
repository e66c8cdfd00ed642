"""The console's web server (Starlette on uvicorn): one page, a WebSocket of live updates, a small JSON API.

Routes (all behind `agent.console.security.AccessMiddleware`):

=========================================  =======================================================
``GET  /``                                 the page (plain HTML/CSS/JS from ``static/``)
``GET  /static/...``                       the package's own static files, nothing else
``WS   /ws``                               `snapshot`, then `event` / `prompt` / `agent` messages
``GET  /api/state``                        the same snapshot as JSON
``POST /api/prompts/{id}/answer``          ``{"option_ids": [...], "operator": "name"}``
``GET  /api/prompts/{id}/images/{name}``   a prompt's PNG image
``POST /api/control/{command}``            pause / resume / abort the session
``GET  /session/atlas/{name}``             heatmap.png, gallery.png or bar_mask.png of the session
``GET  /session/targets/{id}/{kind}``      a target's thumb or diffraction PNG
``GET  /api/explore/files``                images offered for exploring (the session atlas, --explore-dir)
``POST /api/explore/open``                 ``{"source": "atlas"}`` or ``{"source": "file", "name": ...}``
``POST /api/explore/upload``               an image file as the raw body (``X-Filename`` header)
``GET  /api/explore/{id}/display.png``     the 8-bit display copy of an opened image
``POST /api/explore/{id}/analyse``         `ExploreSettings` -> labels, clusters, candidates
``POST /api/explore/{id}/label``           store a cluster as crystal / not crystal in label memory
=========================================  =======================================================

Answer errors: 404 unknown prompt, 409 closed (answered elsewhere, expired, withdrawn), 422 invalid
options, 400 malformed, 503 agent unreachable. Nothing changes on a refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from agent.console.explore import ExploreEngine, ExploreError, ExploreSettings
from agent.console.hub import ConsoleHub
from agent.console.links import AgentLink, LinkError, LocalLink, RemoteLink
from agent.console.security import (
    TOKEN_COOKIE,
    AccessMiddleware,
    AccessPolicy,
    BodyTooLarge,
    SecurityError,
    is_loopback_host,
)
from agent.prompts import (
    AnswerRefusedError,
    BadRequestError,
    InvalidAnswerError,
    OperatorError,
    PromptClosedError,
    PromptNotFoundError,
)

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_PORT = 8765
ATLAS_FILES = ("heatmap.png", "gallery.png", "bar_mask.png")
TARGET_KINDS = {"thumb": "_thumb.png", "diffraction": "_diffraction.png"}
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NO_STORE = {"cache-control": "no-store"}


class AnswerBody(BaseModel):
    """An answer from the page (strict: no coercion, no unknown fields)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    option_ids: list[str] = Field(min_length=1, max_length=64)
    operator: str = Field(default="console", min_length=1, max_length=64)


class OpenBody(BaseModel):
    """Which image to open in the explore view."""

    model_config = ConfigDict(extra="forbid", strict=True)

    source: str = Field(pattern="^(atlas|file)$")
    name: str | None = Field(default=None, max_length=255)


class LabelBody(BaseModel):
    """Mark a cluster of the explore view as crystals or not."""

    model_config = ConfigDict(extra="forbid", strict=True)

    settings: ExploreSettings
    cluster_id: int = Field(ge=0, le=11)
    is_crystal: bool
    specimen: str = Field(default="unknown", min_length=1, max_length=200)
    preset: str = Field(default="atlas", min_length=1, max_length=200)
    operator: str = Field(default="console", min_length=1, max_length=64)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message, **extra}, status_code=status, headers=_NO_STORE)


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"the request body is not JSON: {exc}") from exc


class ConsoleApp:
    """The Starlette application around a hub, an agent link, the explore engine and label memory."""

    def __init__(
        self,
        link: AgentLink,
        policy: AccessPolicy,
        *,
        explore_dir: str | Path | None = None,
        labels: Any | None = None,
        specimen: str | None = None,
    ) -> None:
        self.link = link
        self.hub: ConsoleHub = link.hub
        self.policy = policy
        self.explore = ExploreEngine()
        self.explore_dir = Path(explore_dir).resolve() if explore_dir else None
        self.labels = labels
        self.specimen = specimen
        self._index_template = (STATIC_DIR / "index.html").read_text()
        routes = [
            Route("/", self.index),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
            WebSocketRoute("/ws", self.websocket),
            Route("/api/state", self.state),
            Route("/api/prompts/{prompt_id}/answer", self.answer, methods=["POST"]),
            Route("/api/prompts/{prompt_id}/images/{name}", self.prompt_image),
            Route("/api/control/{command}", self.control, methods=["POST"]),
            Route("/session/atlas/{name}", self.atlas_file),
            Route("/session/targets/{target_id}/{kind}", self.target_file),
            Route("/api/explore/files", self.explore_files),
            Route("/api/explore/open", self.explore_open, methods=["POST"]),
            Route("/api/explore/upload", self.explore_upload, methods=["POST"]),
            Route("/api/explore/{image_id}/display.png", self.explore_display),
            Route("/api/explore/{image_id}/analyse", self.explore_analyse, methods=["POST"]),
            Route("/api/explore/{image_id}/label", self.explore_label, methods=["POST"]),
        ]
        app = Starlette(routes=routes, exception_handlers={BodyTooLarge: self._too_large})
        self.asgi = AccessMiddleware(app, policy)

    async def _too_large(self, request: Request, exc: Exception) -> Response:
        return _error(413, str(exc))

    # -- page and live updates ----------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        token = request.query_params.get("token")
        if self.policy.access_token is not None and token and self.policy.check_token(token):
            # keep the token in a cookie and take it out of the address bar (history, screen shares)
            redirect = RedirectResponse("/", status_code=303, headers=_NO_STORE)
            redirect.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="lax", path="/")
            return redirect
        page = self._index_template.replace("{{API_TOKEN}}", html.escape(self.policy.api_token, quote=True))
        response = Response(page, media_type="text/html", headers={
            **_NO_STORE,
            "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                                       "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
            "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer",
        })
        return response

    async def websocket(self, websocket: WebSocket) -> None:
        await websocket.accept()
        queue, snapshot = self.hub.attach_page(asyncio.get_running_loop())

        async def drain_incoming() -> None:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return

        reader = asyncio.ensure_future(drain_incoming())
        try:
            await websocket.send_json(snapshot)
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    getter.cancel()
                    return
                message = getter.result()
                if message is None:
                    await websocket.close(code=1013)
                    return
                await websocket.send_json(message)
        except (WebSocketDisconnect, RuntimeError, OSError):
            return
        finally:
            reader.cancel()
            self.hub.detach_page(queue)

    async def state(self, request: Request) -> Response:
        return JSONResponse(self.hub.snapshot(), headers=_NO_STORE)

    # -- prompts and control ------------------------------------------------------------------------

    async def answer(self, request: Request) -> Response:
        prompt_id = request.path_params["prompt_id"]
        try:
            body = AnswerBody.model_validate(await _json_body(request))
        except (ValueError, ValidationError) as exc:
            return _error(400, f"malformed answer: {exc}"[:500])
        try:
            reply = await run_in_threadpool(self.link.answer, prompt_id, body.option_ids, body.operator)
        except PromptNotFoundError as exc:
            return _error(404, str(exc), code=exc.code)
        except PromptClosedError as exc:
            return _error(409, str(exc), code=exc.code)
        except BadRequestError as exc:
            return _error(400, str(exc), code=exc.code)
        except InvalidAnswerError as exc:
            return _error(422, str(exc), code=exc.code)
        except AnswerRefusedError as exc:
            return _error(409, str(exc), code=exc.code)
        except (LinkError, OperatorError) as exc:
            return _error(503, str(exc))
        return JSONResponse({"ok": True, "answer": reply.model_dump(mode="json")}, headers=_NO_STORE)

    async def prompt_image(self, request: Request) -> Response:
        payload = self.hub.prompt_image(request.path_params["prompt_id"], request.path_params["name"])
        if payload is None:
            return _error(404, "no such prompt image")
        return Response(payload, media_type="image/png", headers={"cache-control": "private, max-age=3600",
                                                                  "x-content-type-options": "nosniff"})

    async def control(self, request: Request) -> Response:
        command = request.path_params["command"]
        if command not in ("pause", "resume", "abort"):
            return _error(404, f"unknown command {command!r}; use pause, resume or abort")
        try:
            reply = await run_in_threadpool(self.link.control, command)
        except LinkError as exc:
            return _error(503, str(exc))
        return JSONResponse({"ok": True, "command": command, "state": reply.get("state")}, headers=_NO_STORE)

    # -- session images -----------------------------------------------------------------------------

    def _session_file(self, *parts: str) -> Path | None:
        root = self.hub.session_dir
        if root is None:
            return None
        root = root.resolve()
        path = root.joinpath(*parts).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            return None
        return path

    async def atlas_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        path = self._session_file("atlas", name) if name in ATLAS_FILES else None
        if path is None:
            return _error(404, "no such atlas image")
        return FileResponse(path, media_type="image/png", headers=_NO_STORE)

    async def target_file(self, request: Request) -> Response:
        target_id, kind = request.path_params["target_id"], request.path_params["kind"]
        path = None
        if _ID_RE.match(target_id) and kind in TARGET_KINDS:
            path = self._session_file("targets", f"{target_id}{TARGET_KINDS[kind]}")
        if path is None:
            return _error(404, "no such target image")
        return FileResponse(path, media_type="image/png", headers=_NO_STORE)

    # -- explore ------------------------------------------------------------------------------------

    def _explore_files(self) -> list[str]:
        from drivers.formats.images import IMAGE_SUFFIXES

        if self.explore_dir is None or not self.explore_dir.is_dir():
            return []
        return sorted(p.name for p in self.explore_dir.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))

    async def explore_files(self, request: Request) -> Response:
        atlas = self._session_file("atlas", "atlas.tif") is not None
        files = await run_in_threadpool(self._explore_files)
        return JSONResponse({"atlas": atlas, "files": files}, headers=_NO_STORE)

    def _opened(self, image: Any) -> Response:
        return JSONResponse({
            "ok": True, "image_id": image.image_id, "name": image.name,
            "shape": [int(image.array.shape[0]), int(image.array.shape[1])], "dtype": str(image.array.dtype),
            "display_scale": image.display_scale, "pixel_size_um": image.pixel_size_um,
            "display_url": f"/api/explore/{image.image_id}/display.png",
        }, headers=_NO_STORE)

    def _open_path(self, path: Path, name: str) -> Any:
        from drivers.formats.images import ImageFormatError, read_image

        try:
            data = read_image(path)
        except ImageFormatError as exc:
            raise ExploreError(f"{name}: {str(exc).split(': ', 1)[-1]}") from exc
        return self.explore.open(data.array, name, data.pixel_size_um)

    async def explore_open(self, request: Request) -> Response:
        try:
            body = OpenBody.model_validate(await _json_body(request))
        except (ValueError, ValidationError) as exc:
            return _error(400, f"malformed request: {exc}"[:500])
        if body.source == "atlas":
            path = self._session_file("atlas", "atlas.tif")
            name = "session atlas"
        else:
            name = body.name or ""
            path = self.explore_dir / name if self.explore_dir and name in self._explore_files() else None
        if path is None:
            return _error(404, "no such image to explore")
        try:
            image = await run_in_threadpool(self._open_path, path, name)
        except ExploreError as exc:
            return _error(422, str(exc))
        return self._opened(image)

    async def explore_upload(self, request: Request) -> Response:
        from drivers.formats.images import IMAGE_SUFFIXES

        name = Path(request.headers.get("x-filename", "upload.tif")).name[:200]
        suffix = Path(name).suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            return _error(415, f"unsupported image type {suffix!r}; use one of {', '.join(IMAGE_SUFFIXES)}")
        payload = await request.body()
        if not payload:
            return _error(400, "empty upload")

        def work() -> Any:
            handle, temp = tempfile.mkstemp(suffix=suffix, prefix="explore-")
            try:
                with os.fdopen(handle, "wb") as file:
                    file.write(payload)
                return self._open_path(Path(temp), name)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(temp)

        try:
            image = await run_in_threadpool(work)
        except ExploreError as exc:
            return _error(422, str(exc))
        return self._opened(image)

    async def explore_display(self, request: Request) -> Response:
        from drivers.formats.images import encode_png

        try:
            image = self.explore.image(request.path_params["image_id"])
        except ExploreError as exc:
            return _error(404, str(exc))
        payload = await run_in_threadpool(encode_png, image.display)
        return Response(payload, media_type="image/png", headers={"cache-control": "private, max-age=3600"})

    async def explore_analyse(self, request: Request) -> Response:
        try:
            settings = ExploreSettings.model_validate(await _json_body(request))
        except (ValueError, ValidationError) as exc:
            return _error(422, f"bad settings: {exc}"[:800])
        try:
            result = await run_in_threadpool(self.explore.analyse, request.path_params["image_id"], settings)
        except ExploreError as exc:
            return _error(422, str(exc))
        return JSONResponse(result, headers=_NO_STORE)

    async def explore_label(self, request: Request) -> Response:
        try:
            body = LabelBody.model_validate(await _json_body(request))
        except (ValueError, ValidationError) as exc:
            return _error(422, f"bad label: {exc}"[:800])
        if self.labels is None:
            return _error(503, "no label memory: start the console with --labels DIR (or the session's labels)")
        image_id = request.path_params["image_id"]

        def work() -> Any:
            from agent.prompts import LabelRecord

            vector, names = self.explore.cluster_vector(image_id, body.settings, body.cluster_id)
            record = LabelRecord(
                feature_vector=vector, feature_names=names, is_crystal=body.is_crystal,
                specimen=body.specimen if body.specimen != "unknown" or not self.specimen else self.specimen,
                preset=body.preset, session=f"explore:{self.explore.image(image_id).name}"[:200],
                source="console", operator=body.operator, cluster_id=body.cluster_id,
            )
            return self.labels.add(record)[0]

        try:
            record = await run_in_threadpool(work)
        except (ExploreError, ValidationError) as exc:
            return _error(422, str(exc)[:800])
        return JSONResponse({"ok": True, "record_id": record.id, "specimen": record.specimen,
                             "is_crystal": record.is_crystal}, headers=_NO_STORE)


# --------------------------------------------------------------------------------------------------
# Running the server
# --------------------------------------------------------------------------------------------------


def parse_listen(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`[HOST:]PORT` -> (host, port); `[::1]:8765` for IPv6. ValueError with a hint if malformed."""
    text = value.strip()
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]") or default_host
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address {value!r} must be [HOST:]PORT, e.g. 127.0.0.1:{DEFAULT_PORT}")
    return host, int(port_text)


class ConsoleHandle:
    """A console running on uvicorn in a background thread: `.url` to open, `.stop()` to end it."""

    def __init__(self, app: ConsoleApp, host: str, port: int = 0) -> None:
        import uvicorn

        self.app = app
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise SecurityError(f"cannot listen on {host}:{port}: {exc}; pick another --listen port") from exc
        self._socket.listen(64)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(app.asgi, log_level="warning", lifespan="off", timeout_graceful_shutdown=1,
                                ws_max_size=1024 * 1024, ws_ping_interval=20.0)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str | None:
        """The access token (None on loopback without one)."""
        return self.app.policy.access_token

    @property
    def url(self) -> str:
        """The address to open (with `?token=` when a token is required)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = socket.gethostname()
        suffix = f"?token={self.token}" if self.token else ""
        return f"http://{host}:{self.port}/{suffix}"

    @property
    def hub(self) -> ConsoleHub:
        """The live view behind the page."""
        return self.app.hub

    def start(self) -> ConsoleHandle:
        """Serve in a background thread; returns once the server accepts connections (<= 10 s)."""
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="console-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10.0
        while not self._server.started and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.01)
        if not self._server.started:
            raise RuntimeError("the console web server did not start; see the log")
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (Ctrl-C), then stop."""
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self.app.link.close()

    def stop(self) -> None:
        """Stop the web server and detach from the agent (the session goes on). Idempotent."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        with contextlib.suppress(OSError):
            self._socket.close()
        self.app.link.close()


def _policy(host: str, token: str | None) -> AccessPolicy:
    if not is_loopback_host(host) and host not in ("0.0.0.0", "::") and token is None:
        logger.info("console: listening on %s; a token is generated", host)
    return AccessPolicy(host, token)


def start_console_for_session(
    session: Any, channel: Any | None, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None,
    *, explore_dir: str | Path | None = None,
) -> ConsoleHandle:
    """Start the console next to a running `ScreeningSession` (in-process events, prompts via `channel`).

    Loopback by default; any other host requires a token (generated when None; see `handle.url`).
    Runs uvicorn in a background thread; call `.stop()` when the session ends.
    """
    link = LocalLink(session, channel)
    specimen = getattr(getattr(session, "plan", None), "specimen", None)
    try:
        app = ConsoleApp(link, _policy(host, token), explore_dir=explore_dir,
                         labels=getattr(session, "labels", None), specimen=specimen)
        return ConsoleHandle(app, host, port).start()
    except BaseException:
        link.close()
        raise


def start_console_for_agent(
    control_endpoint: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, token: str | None = None, *,
    labels: Any | None = None, explore_dir: str | Path | None = None, status_interval_s: float = 1.0,
    background: bool = True,
) -> ConsoleHandle:
    """Start a console attached to a running agent through its control endpoint (`screen --control`).

    `background=False` returns a handle that is not yet serving: call `.serve_forever()`.
    """
    link = RemoteLink(control_endpoint, status_interval_s=status_interval_s)
    try:
        app = ConsoleApp(link, _policy(host, token), explore_dir=explore_dir, labels=labels)
        handle = ConsoleHandle(app, host, port)
        return handle.start() if background else handle
    except BaseException:
        link.close()
        raise


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    """Poll `predicate` until true or `timeout_s` passes; returns its last value (tests, scripts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


__all__: Sequence[str] = (
    "ConsoleApp", "ConsoleHandle", "parse_listen", "start_console_for_agent", "start_console_for_session",
)
