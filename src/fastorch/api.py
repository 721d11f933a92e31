"""The control API: a Starlette app served by uvicorn in the supervisor's loop.

Every route talks to the :class:`~fastorch.supervisor.Supervisor` through its
control surface (docs/architecture.md) and nothing else. The app listens on a
Unix socket by default; an optional TCP listener demands a bearer token.
Errors of fastorch map to HTTP statuses in one place, :func:`error_response`.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hmac
import inspect
import logging
import os
import pwd
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fastorch._core import State
from fastorch.errors import (
    ApiError,
    ConfigError,
    EngineError,
    FastorchError,
    UnknownServiceError,
)

log = logging.getLogger(__name__)
access_log = logging.getLogger("fastorch.api.access")

API_VERSION = "v1"
STATE_NAMES = tuple(state.name.lower() for state in State)
ACTIONS = ("start", "stop", "restart")
DEFAULT_TAIL = 100
MAX_TAIL = 10_000
SSE_QUEUE = 1024
# A client that has not taken one SSE message in this long is cut off, so a
# stalled reader holds no coroutine or buffer for ever.
SSE_SEND_TIMEOUT_S = 10.0
# A comment line on an idle stream lets a client (and a proxy) see the
# connection is alive, and lets us notice a peer that went away.
SSE_KEEPALIVE_S = 15.0
# Mirrors uvicorn's own ceiling on one request body; PUT bodies are small.
MAX_BODY_BYTES = 1 << 20


# --------------------------------------------------------------------------
# responses and errors


class JSONResponse(Response):
    """A JSON response rendered by orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def error_response(exc: Exception) -> JSONResponse:
    """Map an exception raised while serving a request to a JSON error.

    This is the one place where fastorch's errors become HTTP statuses:
    unknown service 404, invalid definition 422 (with every problem),
    conflicting request 409, :class:`ApiError` its own status. Anything else
    is a bug and answers 500.
    """
    if isinstance(exc, UnknownServiceError):
        return JSONResponse({"error": str(exc)}, status_code=404)
    if isinstance(exc, ConfigError):
        problems = [{"path": path, "reason": reason} for path, reason in exc.problems]
        return JSONResponse({"error": str(exc), "problems": problems}, status_code=422)
    if isinstance(exc, EngineError):
        return JSONResponse({"error": str(exc)}, status_code=409)
    if isinstance(exc, ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)
    if isinstance(exc, HTTPException):
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )
    log.error("api: internal error", exc_info=exc)
    return JSONResponse({"error": "internal error"}, status_code=500)


async def _on_error(request: Request, exc: Exception) -> Response:
    return error_response(exc)


async def _maybe_await(value: Any) -> Any:
    # The control surface is synchronous today; awaiting what comes back
    # keeps the API right if a method turns into a coroutine.
    if inspect.isawaitable(value):
        return await value
    return value


async def _json_body(request: Request, *, required: bool) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, "request body too large")
    if not body.strip():
        if required:
            raise ApiError(422, "a JSON body is required")
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(422, f"invalid JSON body: {exc}") from exc


def _service_name(request: Request) -> str:
    name = request.path_params["name"]
    if not name or len(name) > 256 or any(c in name for c in "\x00\n\r/"):
        raise ApiError(422, f"invalid service name {name!r}")
    return name


def _names_from_body(body: Any) -> list[str] | None:
    """``{"services": [...]}`` names a list; no body, ``{}`` or null all."""
    if body is None:
        return None
    if not isinstance(body, dict):
        raise ApiError(422, 'body must be an object like {"services": [...]}')
    unknown = set(body) - {"services"}
    if unknown:
        raise ApiError(422, f"unknown field {sorted(unknown)[0]!r}")
    names = body.get("services")
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ApiError(422, "'services' must be a list of names")
    if not names:
        raise ApiError(422, "'services' is empty; omit it to act on all services")
    return names


def _parse_signal(value: Any) -> int:
    """A signal given as a number (``1``) or a name (``"HUP"``, ``"SIGHUP"``)."""
    if isinstance(value, bool):
        raise ApiError(422, f"invalid signal {value!r}")
    if isinstance(value, int):
        try:
            return int(signal.Signals(value))
        except ValueError:
            raise ApiError(422, f"invalid signal {value!r}") from None
    if isinstance(value, str):
        text = value.strip().upper()
        if text.isdigit():
            return _parse_signal(int(text))
        if not text.startswith("SIG"):
            text = "SIG" + text
        try:
            return int(signal.Signals[text])
        except KeyError:
            raise ApiError(422, f"invalid signal {value!r}") from None
    raise ApiError(422, f"invalid signal {value!r}")


def _query_int(request: Request, key: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, f"query {key!r} must be an integer") from None
    if not low <= value <= high:
        raise ApiError(422, f"query {key!r} must be within {low}..{high}")
    return value


def _query_flag(request: Request, key: str) -> bool:
    raw = request.query_params.get(key, "").lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ApiError(422, f"query {key!r} must be 0 or 1")


# --------------------------------------------------------------------------
# server-sent events


def _sse_frame(event: str | None, data: bytes) -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    # A payload line may not hold a newline: split into several data lines.
    lines = data.split(b"\n")
    return head + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


class EventStream:
    """An ASGI response streaming a subscription as server-sent events.

    Each send is bounded by ``send_timeout``: a client that stops reading
    is cut off instead of holding the stream. The subscription is bounded
    by the supervisor, which drops it when it fills up, so a slow client
    never slows the supervisor either way.
    """

    def __init__(
        self,
        subscription: Any,
        render: Callable[[Any], bytes],
        *,
        prelude: list[bytes] | None = None,
        registry: set[Any] | None = None,
        send_timeout: float = SSE_SEND_TIMEOUT_S,
        keepalive: float = SSE_KEEPALIVE_S,
    ) -> None:
        self.subscription = subscription
        self.render = render
        self.prelude = prelude or []
        self.registry = registry
        self.send_timeout = send_timeout
        self.keepalive = keepalive

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.registry is not None:
            self.registry.add(self.subscription)
        try:
            await self._stream(receive, send)
        finally:
            self.subscription.close()
            if self.registry is not None:
                self.registry.discard(self.subscription)

    async def _send(self, send: Send, message: dict[str, Any]) -> None:
        async with asyncio.timeout(self.send_timeout):
            await send(message)

    async def _stream(self, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]
        # One task notices the peer going away while we wait for items.
        disconnected = asyncio.ensure_future(_wait_disconnect(receive))
        items = aiter(self.subscription)
        pending: asyncio.Future[Any] | None = None
        try:
            await self._send(
                send, {"type": "http.response.start", "status": 200, "headers": headers}
            )
            await self._body(send, b": fastorch\n\n" + b"".join(self.prelude))
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(items))
                done, _ = await asyncio.wait(
                    {pending, disconnected},
                    timeout=self.keepalive,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if disconnected in done:
                    return
                if pending not in done:
                    # Idle: a comment keeps the connection and shows liveness.
                    await self._body(send, b": keep-alive\n\n")
                    continue
                finished, pending = pending, None
                try:
                    item = finished.result()
                except StopAsyncIteration:
                    break
                await self._body(send, self.render(item))

            # The supervisor ended the subscription: dropped or shutting down.
            dropped = bool(getattr(self.subscription, "dropped", False))
            end = orjson.dumps({"dropped": dropped})
            await self._body(send, _sse_frame("end", end), more=False)
        except TimeoutError:
            log.warning("api: event stream client too slow, disconnecting")
        finally:
            if pending is not None:
                pending.cancel()
            disconnected.cancel()

    async def _body(self, send: Send, body: bytes, *, more: bool = True) -> None:
        await self._send(
            send, {"type": "http.response.body", "body": body, "more_body": more}
        )


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _render_event(item: Any) -> bytes:
    kind = None
    if isinstance(item, dict):
        kind = item.get("event")
    return _sse_frame(str(kind) if kind else "event", orjson.dumps(item, default=str))


def _render_line(item: Any) -> bytes:
    if isinstance(item, dict) and isinstance(item.get("line"), str):
        item = item["line"]
    if isinstance(item, str):
        return _sse_frame("line", item.encode("utf-8", "replace"))
    if isinstance(item, bytes):
        return _sse_frame("line", item)
    return _sse_frame("line", orjson.dumps(item, default=str))


# --------------------------------------------------------------------------
# routes


class _Routes:
    """The handlers of /v1, bound to one supervisor."""

    def __init__(self, supervisor: Any, streams: set[Any]) -> None:
        self.supervisor = supervisor
        self.streams = streams

    async def healthz(self, request: Request) -> Response:
        engine = self.supervisor.engine
        return JSONResponse({"status": "ok", "services": len(engine)})

    async def list_services(self, request: Request) -> Response:
        state = request.query_params.get("state") or None
        if state is not None:
            state = state.lower()
            if state not in STATE_NAMES:
                raise ApiError(422, f"unknown state {state!r}")
        pattern = request.query_params.get("name") or None
        rows = await _maybe_await(
            self.supervisor.services(state=state, pattern=pattern)
        )
        return JSONResponse({"services": rows})

    async def get_service(self, request: Request) -> Response:
        row = await _maybe_await(self.supervisor.service(_service_name(request)))
        return JSONResponse(row)

    async def act_one(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ACTIONS:
            raise ApiError(404, f"unknown action {action!r}")
        name = _service_name(request)
        await _json_body(request, required=False)
        done = await _maybe_await(getattr(self.supervisor, action)([name]))
        return JSONResponse({"action": action, "services": list(done or [])})

    async def act_many(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ACTIONS:
            raise ApiError(404, f"unknown action {action!r}")
        names = _names_from_body(await _json_body(request, required=False))
        done = await _maybe_await(getattr(self.supervisor, action)(names))
        return JSONResponse({"action": action, "services": list(done or [])})

    async def signal_one(self, request: Request) -> Response:
        name = _service_name(request)
        body = await _json_body(request, required=True)
        if not isinstance(body, dict) or "signal" not in body or len(body) != 1:
            raise ApiError(422, 'body must be {"signal": "HUP"} or {"signal": 1}')
        signo = _parse_signal(body["signal"])
        await _maybe_await(self.supervisor.signal(name, signo))
        return JSONResponse(
            {"service": name, "signal": signal.Signals(signo).name, "signo": signo}
        )

    async def put_service(self, request: Request) -> Response:
        name = _service_name(request)
        table = await _json_body(request, required=True)
        if not isinstance(table, dict):
            raise ApiError(422, "body must be an object: the service's table")
        result = await _maybe_await(self.supervisor.put_service(name, table))
        return JSONResponse(result if result is not None else {"service": name})

    async def delete_service(self, request: Request) -> Response:
        name = _service_name(request)
        await _maybe_await(self.supervisor.delete_service(name))
        return JSONResponse({"service": name, "deleted": True})

    async def reload(self, request: Request) -> Response:
        await _json_body(request, required=False)
        result = await _maybe_await(self.supervisor.reload())
        return JSONResponse(result)

    async def graph(self, request: Request) -> Response:
        return JSONResponse(await _maybe_await(self.supervisor.graph()))

    async def graph_dot(self, request: Request) -> Response:
        dot = await _maybe_await(self.supervisor.graph_dot())
        return PlainTextResponse(dot, media_type="text/vnd.graphviz")

    async def events(self, request: Request) -> Response:
        queue = _query_int(request, "queue", SSE_QUEUE, 1, 65_536)
        subscription = self.supervisor.subscribe(maxsize=queue)
        return EventStream(subscription, _render_event, registry=self.streams)  # type: ignore[return-value]

    async def logs(self, request: Request) -> Response:
        name = _service_name(request)
        n = _query_int(request, "n", DEFAULT_TAIL, 0, MAX_TAIL)
        if not _query_flag(request, "follow"):
            lines = await _maybe_await(self.supervisor.tail(name, n))
            body = {"service": name, "lines": list(lines)}
            source = getattr(self.supervisor, "log_source", None)
            if source is not None:
                # Journal output never passes through fastorch: the client
                # reads it from the journal with these matches.
                body.update(source(name))
            return JSONResponse(body)

        # Subscribe before reading the tail: no await between the two, so
        # no line falls into the gap.
        subscription = self.supervisor.follow(name, maxsize=SSE_QUEUE)
        try:
            lines = self.supervisor.tail(name, n) if n else []
        except BaseException:
            subscription.close()
            raise
        prelude = [_render_line(line) for line in lines]
        return EventStream(  # type: ignore[return-value]
            subscription, _render_line, prelude=prelude, registry=self.streams
        )

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_schema())


class _AccessLog:
    """ASGI middleware: one line per request on ``fastorch.api.access``."""

    def __init__(self, app: ASGIApp, listener: str) -> None:
        self.app = app
        self.listener = listener

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not access_log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        status = 0
        started = time.perf_counter()

        async def send_and_note(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            access_log.info(
                "%s %s %s %d %.1fms",
                self.listener,
                scope["method"],
                scope["path"],
                status,
                (time.perf_counter() - started) * 1000,
            )


class _TokenGuard:
    """ASGI middleware: every request must carry ``Authorization: Bearer``.

    The token is compared in constant time. ``/metrics`` may be left open
    for a scraper that holds no token.
    """

    def __init__(self, app: ASGIApp, token: bytes, *, open_metrics: bool) -> None:
        self.app = app
        self.expected = b"Bearer " + token
        self.open_metrics = open_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.open_metrics and scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        given = b""
        for key, value in scope["headers"]:
            if key == b"authorization":
                given = value
                break
        if not hmac.compare_digest(given, self.expected):
            reason = "missing bearer token" if not given else "invalid bearer token"
            response = JSONResponse(
                {"error": reason},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="fastorch"'},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(supervisor: Any, *, streams: set[Any] | None = None) -> Starlette:
    """Build the Starlette app of the control API for ``supervisor``.

    Args:
        supervisor: the running supervisor (its control surface only).
        streams: a set that holds the open event and log subscriptions, so
            the server can close them on shutdown.
    """
    from fastorch import metrics

    handlers = _Routes(supervisor, streams if streams is not None else set())
    exporter = metrics.MetricsExporter(supervisor)

    async def metrics_route(request: Request) -> Response:
        return Response(
            exporter.render(), headers={"content-type": exporter.content_type}
        )

    v = "/" + API_VERSION
    routes = [
        Route("/healthz", handlers.healthz, methods=["GET"]),
        Route("/openapi.json", handlers.openapi, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route(v + "/services", handlers.list_services, methods=["GET"]),
        Route(v + "/services/{name}", handlers.get_service, methods=["GET"]),
        Route(v + "/services/{name}", handlers.put_service, methods=["PUT"]),
        Route(v + "/services/{name}", handlers.delete_service, methods=["DELETE"]),
        Route(v + "/services/{name}/signal", handlers.signal_one, methods=["POST"]),
        Route(v + "/services/{name}/logs", handlers.logs, methods=["GET"]),
        Route(v + "/services/{name}/{action}", handlers.act_one, methods=["POST"]),
        Route(v + "/reload", handlers.reload, methods=["POST"]),
        Route(v + "/graph", handlers.graph, methods=["GET"]),
        Route(v + "/graph.dot", handlers.graph_dot, methods=["GET"]),
        Route(v + "/events", handlers.events, methods=["GET"]),
        Route(v + "/{action}", handlers.act_many, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            FastorchError: _on_error,
            HTTPException: _on_error,
            Exception: _on_error,
        },
    )
    app.state.supervisor = supervisor
    app.state.metrics = exporter
    return app


# --------------------------------------------------------------------------
# listeners and the server


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """Where and how the API listens; read from the ``[supervisor]`` table."""

    socket_path: str | None = None
    socket_mode: int = 0o660
    socket_owner: str | int | None = None
    socket_group: str | int | None = None
    tcp_host: str = "127.0.0.1"
    tcp_port: int | None = None
    token_file: str | None = None
    metrics_without_token: bool = False

    @classmethod
    def from_supervisor(cls, supervisor: Any) -> ApiSettings:
        """Read the settings from the supervisor, or from its config.

        Each key is looked up on the supervisor, then on
        ``supervisor.config.supervisor``, then on ``supervisor.config``.
        ``api_tcp`` is ``"HOST:PORT"``, ``":PORT"``, a port number or a
        ``(host, port)`` pair.
        """
        config = getattr(supervisor, "config", None)
        sources = [supervisor, getattr(config, "supervisor", None), config]

        def pick(key: str, default: Any = None) -> Any:
            for source in sources:
                if source is None:
                    continue
                value = (
                    source.get(key)
                    if isinstance(source, dict)
                    else getattr(source, key, None)
                )
                if value is not None:
                    return value
            return default

        host, port = _parse_tcp(pick("api_tcp"))
        mode = pick("api_socket_mode", 0o660)
        if isinstance(mode, str):
            mode = int(mode, 8)
        return cls(
            socket_path=_as_path(pick("api_socket")),
            socket_mode=int(mode),
            socket_owner=pick("api_socket_owner") or pick("api_socket_user"),
            socket_group=pick("api_socket_group"),
            tcp_host=host,
            tcp_port=port,
            token_file=_as_path(pick("api_token_file")),
            metrics_without_token=bool(pick("metrics_without_token", False)),
        )


def _as_path(value: Any) -> str | None:
    return None if value in (None, "") else os.fspath(value)


def _parse_tcp(value: Any) -> tuple[str, int | None]:
    if value in (None, "", False, 0):
        return "127.0.0.1", None
    if isinstance(value, int):
        return "127.0.0.1", value
    if isinstance(value, (tuple, list)):
        return str(value[0] or "127.0.0.1"), int(value[1])
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep:
        return "127.0.0.1", int(text)
    return host.strip("[]") or "127.0.0.1", int(port)


def read_token(path: str) -> bytes:
    """Read the bearer token from ``path``; refuse an empty one.

    Raises:
        ConfigError: the file cannot be read or holds no token.
    """
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            token = f.read().strip()
    except OSError as exc:
        raise ConfigError([("supervisor.api_token_file", str(exc))]) from exc
    if not token or b"\n" in token:
        raise ConfigError(
            [("supervisor.api_token_file", f"{path!r} must hold one token line")]
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("api: token file %s is readable by group or others", path)
    return token


def _resolve_id(
    value: str | int | None, lookup: Callable[[str], Any], key: str, what: str
) -> int:
    """A uid or gid from a number or a name; -1 (unchanged) for None."""
    if value is None:
        return -1
    if isinstance(value, int) or value.isdigit():
        return int(value)
    try:
        return int(lookup(value)[2])  # pw_uid / gr_gid
    except KeyError:
        raise ConfigError(
            [(f"supervisor.{key}", f"unknown {what} {value!r}")]
        ) from None


def _resolve_user(value: str | int | None) -> int:
    return _resolve_id(value, pwd.getpwnam, "api_socket_owner", "user")


def _resolve_group(value: str | int | None) -> int:
    return _resolve_id(value, grp.getgrnam, "api_socket_group", "group")


def bind_unix(
    path: str, mode: int = 0o660, owner: Any = None, group: Any = None
) -> socket.socket:
    """Bind a listening Unix socket at ``path`` with the given mode and owner.

    A stale socket file (nobody listening) is replaced; a live one means
    another supervisor holds it, which is refused.

    Raises:
        ApiError: another process listens on ``path``.
        OSError: the socket cannot be bound.
    """
    uid, gid = _resolve_user(owner), _resolve_group(group)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)
            else:
                raise ApiError(409, f"another process listens on {path!r}")
            finally:
                probe.close()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # Before listen() a connect is refused, so setting the mode and
        # owner here leaves no window with looser permissions.
        os.chmod(path, mode)
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket (``port`` 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """A uvicorn server that leaves every signal to the supervisor."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn installs SIGINT/SIGTERM handlers (and re-raises them on
        # exit) around serve(); the supervisor owns signals, so do nothing.
        yield

    def install_signal_handlers(self) -> None:
        # The same hook under its name in older uvicorn releases.
        return None

    async def main_loop(self) -> None:
        # uvicorn's own loop wakes every 0.1 s to refresh the Date header
        # and poll should_exit: 200 wake-ups per 20 s of an idle fleet.
        # Served without a Date header, the server only has to wait for
        # stop() instead.
        await self._stop_event().wait()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's own shutdown sleeps 0.1 s unconditionally before it
        # looks at the connections, and then polls every 0.1 s: that was
        # most of the time fastorch took to exit once its fleet was down.
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.timeout_graceful_shutdown or 0)
        state = self.server_state
        while (state.connections or state.tasks) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for task in state.tasks:
            task.cancel(msg="fastorch is shutting down")
        for server in self.servers:
            await server.wait_closed()

    def _stop_event(self) -> asyncio.Event:
        event = getattr(self, "_fastorch_stop", None)
        if event is None:
            event = self._fastorch_stop = asyncio.Event()
            if self.should_exit:
                event.set()
        return event

    def stop(self) -> None:
        """Ask the server to close its listeners and finish."""
        self.should_exit = True
        self._stop_event().set()


class ApiServer:
    """The running control API: its listeners and their uvicorn servers."""

    def __init__(self, app: Starlette, streams: set[Any]) -> None:
        self.app = app
        self.streams = streams
        self.socket_path: str | None = None
        self.tcp_address: tuple[str, int] | None = None
        self._servers: list[_Server] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._sockets: list[socket.socket] = []
        self._closed = False

    async def _start(self, app: ASGIApp, sock: socket.socket, label: str) -> None:
        config = uvicorn.Config(
            app,
            loop="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=2,
            timeout_keep_alive=30,
            ws="none",
        )
        server = _Server(config)
        task = asyncio.get_running_loop().create_task(
            server.serve(sockets=[sock]), name=f"fastorch-api-{label}"
        )
        self._servers.append(server)
        self._tasks.append(task)
        # Wait until the listener accepts, or the server failed to start.
        deadline = time.monotonic() + 10
        while not server.started:
            if task.done():
                task.result()
                raise ApiError(500, f"api listener {label} stopped at start")
            if time.monotonic() > deadline:
                raise ApiError(500, f"api listener {label} did not start")
            await asyncio.sleep(0.005)

    async def aclose(self) -> None:
        """Stop accepting, end open streams, and close every listener."""
        if self._closed:
            return
        self._closed = True

        # End the event and log streams first: uvicorn waits for open
        # responses to finish before it lets go.
        for subscription in list(self.streams):
            subscription.close()
        for server in self._servers:
            server.stop()
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=5)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("api: listener failed", exc_info=task.exception())
        for sock in self._sockets:
            sock.close()
        await self.app.state.metrics.aclose()
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        log.info("api: closed")


async def serve(supervisor: Any, settings: ApiSettings | None = None) -> ApiServer:
    """Serve the control API for ``supervisor`` in the running event loop.

    Returns once every listener accepts connections. Call
    :meth:`ApiServer.aclose` to stop.

    Raises:
        ConfigError: TCP is enabled without a usable token file.
        ApiError: another process listens on the Unix socket.
    """
    if settings is None:
        settings = ApiSettings.from_supervisor(supervisor)
    if settings.socket_path is None and settings.tcp_port is None:
        raise ConfigError([("supervisor.api_socket", "no API listener configured")])
    token = None
    if settings.tcp_port is not None:
        if settings.token_file is None:
            raise ConfigError(
                [("supervisor.api_token_file", "required when api_tcp is set")]
            )
        token = read_token(settings.token_file)

    streams: set[Any] = set()
    app = create_app(supervisor, streams=streams)
    server = ApiServer(app, streams)
    app.state.metrics.start()
    try:
        if settings.socket_path is not None:
            sock = bind_unix(
                settings.socket_path,
                settings.socket_mode,
                settings.socket_owner,
                settings.socket_group,
            )
            server._sockets.append(sock)
            server.socket_path = settings.socket_path
            await server._start(_AccessLog(app, "unix"), sock, "unix")
            log.info("api: listening on %s", settings.socket_path)
        if settings.tcp_port is not None and token is not None:
            sock = bind_tcp(settings.tcp_host, settings.tcp_port)
            server._sockets.append(sock)
            host, port = sock.getsockname()[:2]
            server.tcp_address = (host, port)
            guarded = _TokenGuard(
                app, token, open_metrics=settings.metrics_without_token
            )
            await server._start(_AccessLog(guarded, "tcp"), sock, "tcp")
            log.info("api: listening on %s:%d (token required)", host, port)
    except BaseException:
        await server.aclose()
        raise
    return server


# --------------------------------------------------------------------------
# OpenAPI


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        401: "missing or invalid bearer token (TCP listener)",
        404: "unknown service",
        409: "the request conflicts with the service's state",
        413: "request body too large",
        422: "invalid request",
    }
    out = {str(s): _json(_ref("Error"), text[s]) for s in statuses}
    out["401"] = {"$ref": "#/components/responses/Unauthorized"}
    return out


_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "service name, instances included (worker@1)",
    "schema": {"type": "string", "minLength": 1, "maxLength": 256},
}
_SSE = {
    "description": "server-sent events",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


def _operation(
    summary: str, ok: dict[str, Any], *errors: int, **extra: Any
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": ok, **_errors(*errors)},
    }
    op.update(extra)
    return op


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI 3.0 description of every route of the control API."""
    names_body = {
        "required": False,
        "content": {"application/json": {"schema": _ref("ServiceList")}},
    }
    acted = _json(_ref("Acted"), "the services acted on")
    action_param = {
        "name": "action",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": list(ACTIONS)},
    }
    paths: dict[str, Any] = {
        "/healthz": {
            "get": _operation(
                "liveness of the API", _json({"type": "object"}, "the API answers")
            )
        },
        "/openapi.json": {
            "get": _operation("this document", _json({"type": "object"}, "OpenAPI 3"))
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics",
                {
                    "description": "text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
            )
        },
        "/v1/services": {
            "get": _operation(
                "list services",
                _json(
                    {
                        "type": "object",
                        "properties": {
                            "services": {"type": "array", "items": _ref("Status")}
                        },
                    },
                    "status rows",
                ),
                422,
                parameters=[
                    {
                        "name": "state",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(STATE_NAMES)},
                    },
                    {
                        "name": "name",
                        "in": "query",
                        "description": "glob on the name (fnmatch)",
                        "schema": {"type": "string"},
                    },
                ],
            )
        },
        "/v1/services/{name}": {
            "parameters": [_NAME],
            "get": _operation(
                "one service with its effective config",
                _json(_ref("Status"), "status row plus config"),
                404,
                422,
            ),
            "put": _operation(
                "add or replace a service definition (the TOML table as JSON)",
                _json({"type": "object"}, "what changed"),
                409,
                413,
                422,
                requestBody={
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
            ),
            "delete": _operation(
                "stop and remove a service",
                _json({"type": "object"}, "removed"),
                404,
                409,
                422,
            ),
        },
        "/v1/services/{name}/{action}": {
            "parameters": [_NAME, action_param],
            "post": _operation(
                "start, stop or restart one service", acted, 404, 409, 422
            ),
        },
        "/v1/services/{name}/signal": {
            "parameters": [_NAME],
            "post": _operation(
                "send a signal to the service's process group",
                _json({"type": "object"}, "sent"),
                404,
                409,
                422,
                requestBody={
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Signal")}},
                },
            ),
        },
        "/v1/services/{name}/logs": {
            "parameters": [_NAME],
            "get": _operation(
                "last lines of output; with follow=1 an SSE stream of new lines",
                {
                    "description": "lines (JSON), or an event stream with follow=1",
                    "content": {
                        "application/json": {"schema": _ref("Lines")},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                404,
                422,
                parameters=[
                    {
                        "name": "n",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 0,
                            "maximum": MAX_TAIL,
                        },
                    },
                    {
                        "name": "follow",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["0", "1"]},
                    },
                ],
            ),
        },
        "/v1/{action}": {
            "parameters": [action_param],
            "post": _operation(
                "start, stop or restart a list of services, or all of them",
                acted,
                404,
                409,
                413,
                422,
                requestBody=names_body,
            ),
        },
        "/v1/reload": {
            "post": _operation(
                "re-read the configuration",
                _json(_ref("ReloadResult"), "what changed"),
                409,
                422,
            )
        },
        "/v1/graph": {
            "get": _operation("dependency graph", _json({"type": "object"}, "graph"))
        },
        "/v1/graph.dot": {
            "get": _operation(
                "dependency graph in DOT",
                {
                    "description": "Graphviz DOT",
                    "content": {"text/vnd.graphviz": {"schema": {"type": "string"}}},
                },
            )
        },
        "/v1/events": {
            "get": _operation(
                "stream of transitions and probe results (SSE)",
                _SSE,
                422,
                parameters=[
                    {
                        "name": "queue",
                        "in": "query",
                        "description": "per-client buffer; a client that falls "
                        "this far behind is dropped",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 65536},
                    }
                ],
            )
        },
    }
    schemas = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {"type": "string"},
                "problems": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "path": {"type": "string"},
                            "reason": {"type": "string"},
                        },
                    },
                },
            },
        },
        "Status": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "state": {"type": "string", "enum": list(STATE_NAMES)},
                "pid": {"type": "integer", "nullable": True},
                "uptime_s": {"type": "number", "nullable": True},
                "restarts": {"type": "integer"},
                "last_exit": {"type": "integer", "nullable": True},
                "ready": {"type": "boolean"},
                "healthy": {"type": "boolean", "nullable": True},
                "status_text": {"type": "string", "nullable": True},
                "since": {"type": "number", "nullable": True},
                "reason": {"type": "string", "nullable": True},
                "config": {"type": "object"},
            },
        },
        "ServiceList": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "services": {
                    "type": "array",
                    "items": {"type": "string"},
                    "minItems": 1,
                    "nullable": True,
                }
            },
        },
        "Acted": {
            "type": "object",
            "properties": {
                "action": {"type": "string"},
                "services": {"type": "array", "items": {"type": "string"}},
            },
        },
        "Signal": {
            "type": "object",
            "required": ["signal"],
            "additionalProperties": False,
            "properties": {
                "signal": {
                    "oneOf": [{"type": "string"}, {"type": "integer"}],
                    "description": "a name (HUP, SIGHUP) or a number",
                }
            },
        },
        "Lines": {
            "type": "object",
            "properties": {
                "service": {"type": "string"},
                "lines": {"type": "array", "items": {"type": "string"}},
                "destination": {
                    "type": "string",
                    "nullable": True,
                    "enum": ["journal", "file", "inherit", "null", None],
                },
                "journal": {
                    "type": "object",
                    "description": "journal matches for the service's lines",
                    "additionalProperties": {"type": "string"},
                },
            },
        },
        "ReloadResult": {
            "type": "object",
            "properties": {
                key: {"type": "array", "items": {"type": "string"}}
                for key in ("added", "removed", "changed")
            },
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "fastorch control API",
            "version": API_VERSION,
            "description": "Control, live configuration, events and metrics "
            "of a fastorch supervisor.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {"Unauthorized": _json(_ref("Error"), "missing or bad token")},
        },
        "security": [{}, {"bearer": []}],
    }
