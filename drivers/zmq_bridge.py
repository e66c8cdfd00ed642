"""The ZeroMQ bridge: `BridgeServer` next to the microscope, `BridgeClient` in the agent.

`BridgeServer(microscope, endpoint)` serves any `drivers.base.Microscope` on a ROUTER socket;
`BridgeClient(endpoint)` is itself a `Microscope`, so the agent cannot tell a local simulator from a
remote instrument. The wire format is in `drivers.protocol`. The server's parts have modules of their
own: `drivers.bridge_calls` (running one call, the handshake), `drivers.bridge_replies` (the memory behind
at-most-once execution), `drivers.bridge_events` (state-change events, both sides) and
`drivers.network` (the loopback rule).

Concurrency model of the server
-------------------------------
One I/O thread owns every socket; it decodes and validates requests and sends replies. Instrument
calls run in worker threads, by call kind (`drivers.protocol.MethodSpec.kind`):

- "read" calls (get_stage, is_stage_moving, get_preset, info, ...) run in a pool of `read_workers`
  threads, concurrently with each other and with the one running control call;
- "control" calls (move_stage, wait_for_stage, set_preset, set_beam_blanked, acquire,
  acquire_diffraction, set_image_shift, load_grid) run one at a time, in arrival order, on a single control
  thread;
- "stop" (stop_stage) has its own thread, so it is never queued behind the move it must stop.

So a long exposure, move or grid load never blocks status queries from any client (a load's progress can be
followed with `loaded_slot` / `cassette_slots`, which are reads). The wrapped microscope must
therefore accept read calls while one control call is in progress (the simulator and real instruments
do). At most `max_pending` calls wait or run at once; more get a "server busy" `BridgeError`.

At-most-once execution
----------------------
Non-idempotent calls (move_stage, acquire, acquire_diffraction, load_grid) are remembered by request id. A resend
of the same id (after a client timeout) attaches to the running call or gets the stored reply again;
it is never executed twice. A resend carries the `server_id` of the server it was first sent to, and a
restarted server (new id, empty memory) refuses it rather than guess. The server keeps the last
`reply_cache_size` replies (at most `reply_cache_bytes`); a resend whose reply was discarded since is
refused too (the ids of the last 100 000 such calls are kept), never run again. Idempotent calls are retried by
the client with a new id and simply run again.

Events
------
With `event_endpoint`, the server publishes state changes on a PUB socket as `[topic, json]` with
topics `stage` (position), `optics` (preset) and `beam` (blanked): after every call that may
change them, and from a poll every `event_poll_s` seconds (changes made at the instrument itself).
Every `event_snapshot_s` seconds all topics are published even if unchanged, so a subscriber that
joins late learns the whole state within that time.

Security
--------
The server binds 127.0.0.1 by default. Binding any other interface requires CURVE: a server key pair
and an allow-list of client public keys (`drivers.auth`); unknown clients are refused in the
handshake and never reach the request handler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zmq
from pydantic import BaseModel, ValidationError
from zmq.utils.monitor import recv_monitor_message

from drivers.auth import (
    AllowListAuthenticator,
    CurveKeyPair,
    configure_curve_client,
    configure_curve_server,
    load_allow_list,
    load_public_key,
)
from drivers.base import (
    AuthenticationError,
    BridgeError,
    BridgeTimeout,
    CassetteSlot,
    Frame,
    InvalidParameterError,
    Microscope,
    MicroscopeError,
    MicroscopeInfo,
    ProtocolMismatchError,
    StageLimits,
    StagePosition,
)
from drivers.bridge_calls import CallRunner, HelloResult, ServerStats, error_reply
from drivers.bridge_events import TOPICS, BridgeEventSubscriber, StatePublisher
from drivers.bridge_replies import ReplyMemory
from drivers.network import is_loopback_endpoint
from drivers.protocol import (
    DEFAULT_MAX_ARRAY_BYTES,
    HELLO_METHOD,
    METHOD_SPECS,
    PROTOCOL_VERSION,
    MalformedMessageError,
    MethodSpec,
    RequestHeader,
    decode_reply,
    decode_request,
    decode_value,
    encode_header,
    error_from_wire,
    new_request,
    peek_request_id,
    validate_params,
)

logger = logging.getLogger(__name__)

#: Default endpoint: loopback only.
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"

#: Default limit of one incoming request message part on the server (requests are small JSON).
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024

#: Default time limit of quick calls (status queries), seconds.
DEFAULT_STATUS_TIMEOUT_S = 5.0

T = TypeVar("T")


class BridgeServer:
    """Serve a `Microscope` over ZeroMQ (ROUTER socket). See the module docstring for the model.

    `curve`: the server key pair (`CurveKeyPair`, a `.key_secret` file, or a directory holding
    `server.key_secret`); `allowed_client_keys`: client public keys, `.key` files or directories of them.
    Both are required together, and required for any endpoint that is not loopback.
    `max_message_bytes` is set as `zmq.MAXMSGSIZE` on the ROUTER: a bigger request disconnects its
    sender. Use as a context manager or call `start()` / `stop()`; `.endpoint` is the bound address
    (the real port when bound to port 0).
    """

    def __init__(
        self,
        microscope: Microscope,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        curve: CurveKeyPair | str | os.PathLike[str] | None = None,
        allowed_client_keys: Iterable[bytes | str | os.PathLike[str]] | None = None,
        max_message_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        event_endpoint: str | None = None,
        read_workers: int = 4,
        max_pending: int = 64,
        reply_cache_size: int = 256,
        reply_cache_bytes: int = 128 * 1024 * 1024,
        event_poll_s: float = 0.5,
        event_snapshot_s: float = 5.0,
    ) -> None:
        if not isinstance(microscope, Microscope):
            raise InvalidParameterError(
                f"BridgeServer needs an object implementing drivers.base.Microscope, got {type(microscope).__name__}"
            )
        if max_message_bytes < 1024:
            raise InvalidParameterError(f"max_message_bytes must be >= 1024, got {max_message_bytes}")
        if read_workers < 1 or max_pending < 1:
            raise InvalidParameterError("read_workers and max_pending must be >= 1")
        self._microscope = microscope
        self._requested_endpoint = endpoint
        self._requested_event_endpoint = event_endpoint
        self._curve_keys, self._allowed = _server_security(curve, allowed_client_keys, (endpoint, event_endpoint))
        self._max_message_bytes = int(max_message_bytes)
        self._read_workers = int(read_workers)
        self._max_pending = int(max_pending)
        self._event_poll_s = float(event_poll_s)
        self.server_id = uuid.uuid4().hex
        self.stats = ServerStats()
        self._endpoint: str | None = None
        self._event_endpoint: str | None = None
        self._ipc_files: list[tuple[Path, int, int]] = []  # socket files this server bound: removed on stop
        self._context: zmq.Context | None = None
        self._authenticator: AllowListAuthenticator | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._push_lock = threading.Lock()
        self._push: zmq.Socket | None = None
        self._events = (
            StatePublisher(microscope, self.server_id, self._push_parts, event_snapshot_s)
            if event_endpoint is not None
            else None
        )
        self._memory = ReplyMemory(reply_cache_size, reply_cache_bytes)
        self._calls: CallRunner | None = None
        self._pools: dict[str, ThreadPoolExecutor] = {}

    # lifecycle ------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The bound endpoint (with the real port); `BridgeError` before `start()`."""
        if self._endpoint is None:
            raise BridgeError("the bridge server is not started; call start() first")
        return self._endpoint

    @property
    def event_endpoint(self) -> str | None:
        """The bound PUB endpoint for events, or None when events are off."""
        return self._event_endpoint

    @property
    def running(self) -> bool:
        """True between `start()` and `stop()`."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> BridgeServer:
        """Bind the sockets and start serving in a background thread. Returns self."""
        if self._thread is not None:
            raise BridgeError("this bridge server was started already; create a new one")
        context = zmq.Context()
        self._context = context
        try:
            router, pull, publisher = self._open_sockets(context)
        except BaseException:
            self._teardown_context()
            raise
        self._calls = CallRunner(
            self._microscope,
            self.server_id,
            self.stats,
            event_endpoint=self._event_endpoint,
            curve=self._curve_keys is not None,
        )
        self._pools = {
            "read": ThreadPoolExecutor(self._read_workers, thread_name_prefix="bridge-read"),
            "control": ThreadPoolExecutor(1, thread_name_prefix="bridge-control"),
            "stop": ThreadPoolExecutor(1, thread_name_prefix="bridge-stop"),
        }
        self._thread = threading.Thread(
            target=self._serve, args=(router, pull, publisher), name="bridge-io", daemon=True
        )
        self._thread.start()
        logger.info("bridge serving %s on %s (events: %s, CURVE: %s)", type(self._microscope).__name__,
                    self._endpoint, self._event_endpoint, self._curve_keys is not None)
        return self

    def _open_sockets(self, context: zmq.Context) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket | None]:
        """Bind the ROUTER (requests) and, with events, the PUB socket; connect the inproc PUSH -> PULL
        pair that carries replies and events from the worker threads to the I/O thread."""
        if self._curve_keys is not None:
            self._authenticator = AllowListAuthenticator(context, self._allowed)
            self._authenticator.start()
        router = context.socket(zmq.ROUTER)
        router.linger = 0
        router.setsockopt(zmq.MAXMSGSIZE, self._max_message_bytes)
        if self._curve_keys is not None:
            configure_curve_server(router, self._curve_keys)
        self._endpoint = _bind(router, self._requested_endpoint, self._ipc_files)
        publisher = None
        if self._requested_event_endpoint is not None:
            publisher = context.socket(zmq.PUB)
            publisher.linger = 0
            if self._curve_keys is not None:
                configure_curve_server(publisher, self._curve_keys)
            self._event_endpoint = _bind(publisher, self._requested_event_endpoint, self._ipc_files)
        pull = context.socket(zmq.PULL)
        pull.linger = 0
        pull.rcvhwm = 0
        inproc = f"inproc://bridge-replies-{self.server_id}"
        pull.bind(inproc)
        push = context.socket(zmq.PUSH)
        push.linger = 0
        push.sndhwm = 0
        push.connect(inproc)
        self._push = push
        return router, pull, publisher

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving: no new calls start, the sockets close. A running instrument call finishes on its own."""
        if self._thread is None:
            return
        self._stopping.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():  # pragma: no cover - the loop polls every 50 ms
            logger.error("bridge I/O thread did not stop within %.1f s", timeout_s)
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._teardown_context()
        logger.info("bridge on %s stopped", self._endpoint)

    def _teardown_context(self) -> None:
        with self._push_lock:
            if self._push is not None:
                self._push.close(linger=0)
                self._push = None
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None
        _remove_ipc_files(self._ipc_files)

    def __enter__(self) -> BridgeServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # I/O thread -----------------------------------------------------------------------------------
    def _serve(self, router: zmq.Socket, pull: zmq.Socket, publisher: zmq.Socket | None) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        next_poll_s = time.monotonic()
        try:
            while not self._stopping.is_set():
                events = dict(poller.poll(50))
                if pull in events:
                    _drain(pull, lambda parts: self._on_worker_message(router, publisher, parts))
                if router in events:
                    _drain(router, lambda parts: self._on_request(router, parts))
                if self._events is not None and time.monotonic() >= next_poll_s:
                    next_poll_s = time.monotonic() + self._event_poll_s
                    self._events.schedule_poll(self._pools["read"].submit)
        finally:
            router.close(linger=0)
            pull.close(linger=0)
            if publisher is not None:
                publisher.close(linger=0)

    def _send_error(self, router: zmq.Socket, identity: bytes, request_id: uuid.UUID | None, exc: Exception) -> None:
        self.stats.count_error()
        router.send_multipart([identity, b"", encode_header(error_reply(request_id, self.server_id, exc))])

    def _on_request(self, router: zmq.Socket, parts: list[zmq.Frame]) -> None:
        self.stats.requests += 1
        identity = parts[0].bytes
        body = parts[1:]
        if body and len(body[0]) == 0:  # the empty delimiter a DEALER/REQ client sends
            body = body[1:]
        try:
            header = decode_request(body)
            if header.arrays:
                raise MalformedMessageError(f"method {header.method!r} takes no array frames")
            spec = METHOD_SPECS.get(header.method)
            params = validate_params(header.method, header.params)
        except MicroscopeError as exc:
            request_id = peek_request_id(body[0]) if body else None
            logger.info("bridge: refused a request: %s", exc)
            self._send_error(router, identity, request_id, exc)
            return
        assert spec is not None
        cacheable = not (spec.idempotent and header.idempotent)
        if cacheable and self._answer_resend(router, identity, header):
            return
        if len(self._memory.jobs) >= self._max_pending:
            self._send_error(router, identity, header.request_id, BridgeError(
                f"the bridge server is busy ({len(self._memory.jobs)} calls pending); try again later"
            ))
            return
        job = self._memory.start(header.request_id, identity, cacheable)
        self._pools[spec.kind].submit(self._run_job, job.job_id, spec, params, header.request_id)

    def _answer_resend(self, router: zmq.Socket, identity: bytes, header: RequestHeader) -> bool:
        """Answer a resend of a non-idempotent call without running it again: replay its stored reply,
        attach to the running call, or refuse it. False when the request is new (run it)."""
        request_id = header.request_id
        stored = self._memory.stored_reply(request_id)
        if stored is not None:
            self.stats.replayed += 1
            logger.info("bridge: replaying the stored reply of %s %s", header.method, request_id)
            router.send_multipart([identity, *stored], copy=False)
            return True
        running = self._memory.running(request_id)
        if running is not None:
            self.stats.replayed += 1
            running.destinations.append(identity)
            return True
        if self._memory.was_seen(request_id):
            self._send_error(router, identity, request_id, BridgeError(
                f"{header.method} was resent so late that its stored reply has been discarded; it was NOT run "
                "again. Check the instrument state (e.g. get_stage) and call again."
            ))
            return True
        if header.server_id is not None and header.server_id != self.server_id:
            self._send_error(router, identity, request_id, BridgeError(
                f"{header.method} was resent after a timeout, but the server has restarted since it was first "
                "sent; it was NOT run again. Check the instrument state (e.g. get_stage) and call again."
            ))
            return True
        return False

    def _on_worker_message(self, router: zmq.Socket, publisher: zmq.Socket | None, parts: list[zmq.Frame]) -> None:
        kind = parts[0].bytes
        if kind == b"event":
            if publisher is not None:
                publisher.send_multipart([parts[1], parts[2]], copy=False)
            return
        job = self._memory.finish(int(parts[1].bytes.decode("ascii")))
        if job is None:  # pragma: no cover - cannot happen: every job id comes from _on_request
            return
        reply = [b"", *parts[2:]]
        for identity in job.destinations:
            router.send_multipart([identity, *reply], copy=False)
        self._memory.remember(job, reply)

    def _push_parts(self, parts: list[Any]) -> None:
        with self._push_lock:
            if self._push is None:
                self.stats.dropped += 1
                return
            try:
                # NOBLOCK: with the I/O thread gone (server stopping) a PUSH send would block forever
                self._push.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.stats.dropped += 1

    # worker threads -------------------------------------------------------------------------------
    def _run_job(self, job_id: int, spec: MethodSpec, params: BaseModel, request_id: uuid.UUID) -> None:
        assert self._calls is not None
        reply = self._calls.reply(spec, params, request_id)
        self._push_parts([b"reply", str(job_id).encode("ascii"), *reply])
        if spec.events and self._events is not None:
            self._events.publish_changes()


def _server_security(
    curve: CurveKeyPair | str | os.PathLike[str] | None,
    allowed_client_keys: Iterable[bytes | str | os.PathLike[str]] | None,
    endpoints: Iterable[str | None],
) -> tuple[CurveKeyPair | None, frozenset[bytes]]:
    """The server's CURVE key pair and the allow-list of client public keys (None, empty: no CURVE).

    Raises `AuthenticationError` when one is given without the other or the key pair has no secret key,
    and `BridgeError` when one of `endpoints` (None: not used) is not loopback and CURVE is off.
    """
    keys: CurveKeyPair | None = None
    allowed: frozenset[bytes] = frozenset()
    if curve is not None:
        keys = curve if isinstance(curve, CurveKeyPair) else CurveKeyPair.load(curve, name=None)
        if keys.secret is None:
            raise AuthenticationError("the server CURVE key pair has no secret key; pass the .key_secret file")
        allowed = load_allow_list(allowed_client_keys or ())
        if not allowed:
            raise AuthenticationError(
                "CURVE needs an allow-list of client public keys (allowed_client_keys / --allow KEYFILE)"
            )
    elif allowed_client_keys:
        raise AuthenticationError("an allow-list of client keys needs CURVE server keys (curve=...)")
    for endpoint in endpoints:
        if endpoint is not None and not is_loopback_endpoint(endpoint) and keys is None:
            raise BridgeError(
                f"refusing to bind {endpoint}: binding anything but loopback (127.0.0.1) requires CURVE keys and "
                "an allow-list of clients (create keys with `crystal-locator bridge keys --out DIR`)"
            )
    return keys, allowed


def _bind(socket: zmq.Socket, endpoint: str, ipc_files: list[tuple[Path, int, int]]) -> str:
    """Bind `socket` to `endpoint`; the bound address (the real port when bound to port 0).

    An `ipc://` socket file it creates is added to `ipc_files` as (path, device, inode), for
    `_remove_ipc_files` to delete after the socket is closed.
    """
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as exc:
        raise BridgeError(f"cannot bind {endpoint}: {exc}. Is another server running there?") from exc
    bound = socket.getsockopt(zmq.LAST_ENDPOINT).decode("ascii")
    if bound.startswith("ipc://") and not bound.startswith("ipc://@"):  # '@': Linux abstract, no file
        path = Path(bound[len("ipc://"):])
        with contextlib.suppress(OSError):
            st = path.stat()
            if stat.S_ISSOCK(st.st_mode):
                ipc_files.append((path, st.st_dev, st.st_ino))
    return bound


def _remove_ipc_files(ipc_files: list[tuple[Path, int, int]]) -> None:
    """Delete the socket files in `ipc_files` (and empty the list): only the very files bound, not a file
    another process has put at the same path since."""
    while ipc_files:
        path, device, inode = ipc_files.pop()
        try:
            st = path.lstat()
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (device, inode):
                path.unlink()
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                logger.warning("could not remove the socket file %s: %s", path, exc)


def _drain(socket: zmq.Socket, handle: Callable[[list[zmq.Frame]], None], limit: int = 64) -> None:
    """Hand up to `limit` waiting messages of `socket` to `handle`, logging (not raising) what it raises."""
    for _ in range(limit):
        try:
            parts = socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        try:
            handle(parts)
        except Exception:  # the server must survive anything a message does
            logger.exception("bridge: unexpected error while handling a message; continuing")


# --------------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """A numpy scalar as the Python number it holds (agents often pass np.float64 / np.int64); else unchanged."""
    if isinstance(value, np.generic) and isinstance(value.item(), (bool, int, float, str)):
        return value.item()
    return value


_NO_REPLY = object()  # what _await_reply returns on timeout (None is a valid result)

_AUTH_FAILURE_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def _call_name(method: str) -> str:
    """`method` as a user reads it: the connection handshake is not one of the microscope's calls."""
    return "the connection handshake" if method == HELLO_METHOD else method


def _timeout_message(endpoint: str, method: str, timeout_s: float, attempts: int) -> str:
    """'no answer from ENDPOINT [to METHOD] within N s (k attempts)', and what to check."""
    call = "" if method == HELLO_METHOD else f" to {method}"
    plural = "" if attempts == 1 else "s"
    return (
        f"no answer from {endpoint}{call} within {timeout_s:g} s ({attempts} attempt{plural}). "
        "Check that `crystal-locator bridge serve` runs there and the network is up."
    )


class _OptionalCapabilities:
    """The methods of the optional capabilities (`drivers.base.ImageShiftMicroscope`, `CassetteMicroscope`) and
    `ping`, as `BridgeClient` calls them. A served microscope without a capability answers its calls with a
    `MicroscopeError` that says so; `info().cassette_slots` / `image_shift_limit_um` tell beforehand."""

    endpoint: str

    def _call(self, method: str, params: dict[str, Any] | None = None) -> Any:  # pragma: no cover - BridgeClient's
        raise NotImplementedError

    def _typed(self, method: str, expected: type[T], params: dict[str, Any] | None = None) -> T:  # pragma: no cover
        raise NotImplementedError

    def get_image_shift(self) -> tuple[float, float]:
        """The image shift (x_um, y_um); `MicroscopeError` when the served microscope has none."""
        return self._typed("get_image_shift", tuple)  # a Pair: the protocol checked its two finite numbers

    def set_image_shift(self, x_um: float, y_um: float) -> None:
        """Set the image shift (um, absolute); `InvalidParameterError` beyond the microscope's limit."""
        self._call("set_image_shift", {"x_um": x_um, "y_um": y_um})

    def cassette_slots(self) -> tuple[CassetteSlot, ...]:
        """Every slot of the autoloader cassette, in order (the last inventory); `MicroscopeError` without one."""
        slots = self._typed("cassette_slots", tuple)
        if not all(isinstance(slot, CassetteSlot) for slot in slots):
            raise MalformedMessageError(f"{self.endpoint} answered cassette_slots with something other than slots")
        return slots

    def loaded_slot(self) -> int | None:
        """The slot whose grid is on the stage, None when there is none. Answered during a load too."""
        value = self._call("loaded_slot")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise MalformedMessageError(f"{self.endpoint} answered loaded_slot with {type(value).__name__}")
        return value

    def load_grid(self, slot: int) -> None:
        """Put the grid of `slot` on the stage (minutes; run at most once on the server even when resent).
        `InvalidParameterError` for a slot that is not a whole number in the cassette; `GridLoadError` for an
        empty slot or a failed transfer."""
        self._call("load_grid", {"slot": slot})

    def ping(self) -> float:
        """Round-trip time of one status call (`microscope_time_s`), seconds."""
        start = time.perf_counter()
        self._call("microscope_time_s")
        return time.perf_counter() - start


class BridgeClient(_OptionalCapabilities):
    """A `Microscope` on the far side of a `BridgeServer`.

    Connects and shakes hands at construction (protocol version, server info): raises `ProtocolMismatchError`
    on a version mismatch, `BridgeTimeout` if nobody answers, `AuthenticationError` if CURVE keys are refused.

    Time limits: quick calls `timeout_s` (default 5 s); a move at least 300 s; `acquire` 2 x exposure
    + 30 s; `wait_for_stage` its own timeout + 10 s; `load_grid` 600 s; override any with
    `method_timeouts_s`. After a timeout the socket is rebuilt (lazy pirate) and the call is sent again up
    to `retries` times: idempotent calls as a new request, moves, exposures and loads with their original
    request id, which the server runs at most once. Then `BridgeTimeout`. Remote errors are re-raised as
    the class of the same name in `drivers.base.ERROR_TYPES`. One client is safe to share between threads (calls are
    serialised); use one client per thread for concurrency. After a server restart the client reconnects
    by itself, refreshes `server_info` and `event_endpoint`, and calls `on_server_restart(old_id, new_id)`.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float | None = None,
        curve_keys: CurveKeyPair | str | os.PathLike[str] | None = None,
        server_public_key: bytes | str | os.PathLike[str] | None = None,
        retries: int = 2,
        method_timeouts_s: Mapping[str, float] | None = None,
        max_message_bytes: int = DEFAULT_MAX_ARRAY_BYTES + DEFAULT_MAX_REQUEST_BYTES,
        client_name: str = "crystal-locator",
    ) -> None:
        is_loopback_endpoint(endpoint)  # validates the form
        self.endpoint = endpoint
        self._base_timeout_s = float(timeout_s) if timeout_s is not None else DEFAULT_STATUS_TIMEOUT_S
        if not self._base_timeout_s > 0:
            raise InvalidParameterError(f"timeout_s must be > 0, got {timeout_s}")
        unknown = set(method_timeouts_s or {}) - set(METHOD_SPECS)
        if unknown:
            raise InvalidParameterError(f"method_timeouts_s names unknown methods: {sorted(unknown)}")
        self._method_timeouts_s = dict(method_timeouts_s or {})
        self._retries = max(0, int(retries))
        self._max_message_bytes = int(max_message_bytes)
        self._client_name = client_name
        if (curve_keys is None) != (server_public_key is None):
            raise AuthenticationError("CURVE needs both the client key pair and the server's public key")
        self._curve_keys: CurveKeyPair | None = None
        self._server_key: bytes | None = None
        if curve_keys is not None and server_public_key is not None:
            self._curve_keys = curve_keys if isinstance(curve_keys, CurveKeyPair) else CurveKeyPair.load(curve_keys)
            self._server_key = load_public_key(server_public_key)
        self._lock = threading.RLock()
        self._context = zmq.Context()
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self.server_id: str | None = None
        self.server_info: MicroscopeInfo | None = None
        self.event_endpoint: str | None = None
        self.reconnects, self._handshake_stale = 0, False
        self.on_server_restart: Callable[[str | None, str], None] | None = None
        try:
            self._open_socket()
            self._handshake()
        except BaseException:
            self.close()
            raise

    # connection -----------------------------------------------------------------------------------
    def _open_socket(self) -> None:
        socket = self._context.socket(zmq.DEALER)
        socket.linger = 0
        socket.setsockopt(zmq.MAXMSGSIZE, self._max_message_bytes)
        if self._curve_keys is not None and self._server_key is not None:
            configure_curve_client(socket, self._curve_keys, self._server_key)
        self._monitor = socket.get_monitor_socket(_AUTH_FAILURE_EVENTS)
        socket.connect(self.endpoint)
        self._socket = socket

    def _close_socket(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._socket.disable_monitor()
            self._socket.close(linger=0)
            self._socket = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None

    def _reconnect(self) -> None:
        """Lazy pirate: throw the socket away (and anything queued on it) and connect a new one."""
        self._close_socket()
        self._open_socket()
        self.reconnects += 1

    def _handshake(self) -> None:
        result = self._call(HELLO_METHOD, {"client_protocol_version": PROTOCOL_VERSION,
                                           "client_name": self._client_name[:128]})
        try:
            hello = HelloResult.model_validate(result)
        except ValidationError as exc:
            raise ProtocolMismatchError(f"{self.endpoint} answered the handshake with something else: {exc}") from None
        if hello.protocol_version != PROTOCOL_VERSION:
            raise ProtocolMismatchError(
                f"{self.endpoint} speaks bridge protocol {hello.protocol_version}, this client {PROTOCOL_VERSION}"
            )
        self.server_id = hello.server_id
        self.server_info = hello.info
        self.event_endpoint = hello.event_endpoint
        logger.info("connected to %s: %s (%s)", self.endpoint, hello.info.name, hello.info.software_version)

    def close(self) -> None:
        """Close the connection. The client cannot be used afterwards."""
        with self._lock:
            self._close_socket()
            if not self._context.closed:
                self._context.term()

    def __enter__(self) -> BridgeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # calls ----------------------------------------------------------------------------------------
    def timeout_for(self, method: str, params: Mapping[str, Any] | None = None) -> float:
        """The time limit in seconds this client applies to one call of `method` with `params`."""
        if method in self._method_timeouts_s:
            return float(self._method_timeouts_s[method])
        spec = METHOD_SPECS[method]
        return spec.timeout_s(validate_params(method, dict(params or {})), self._base_timeout_s)

    def _call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        params = {key: _plain(value) for key, value in (params or {}).items()}
        validate_params(method, params)  # bad arguments fail here, before anything is sent
        spec = METHOD_SPECS[method]
        timeout_s = self.timeout_for(method, params)
        with self._lock:
            if self._socket is None:
                raise BridgeError(f"the client for {self.endpoint} is closed; create a new BridgeClient")
            header = new_request(method, params, idempotent=spec.idempotent)
            first_server_id = self.server_id
            for attempt in range(self._retries + 1):
                if attempt > 0:
                    if spec.idempotent:
                        header = new_request(method, params, idempotent=True)
                    else:
                        header = header.model_copy(update={"server_id": first_server_id or self.server_id})
                    logger.warning("%s: no answer to %s in %.1f s; resending (attempt %d of %d)", self.endpoint,
                                   _call_name(method), timeout_s, attempt + 1, self._retries + 1)
                self._socket.send_multipart([b"", encode_header(header)])
                reply = self._await_reply(header, timeout_s)
                if reply is not _NO_REPLY:
                    if self._handshake_stale and method != HELLO_METHOD:
                        self._handshake_stale = False
                        with contextlib.suppress(MicroscopeError):
                            self._handshake()  # a restarted server: refresh its info and event endpoint
                    return reply
                self._check_auth_failure()
                self._reconnect()
            raise BridgeTimeout(_timeout_message(self.endpoint, method, timeout_s, self._retries + 1))

    def _await_reply(self, header: RequestHeader, timeout_s: float) -> Any:
        """The decoded result for `header`, `_NO_REPLY` on timeout; raises the remote error if there was one."""
        assert self._socket is not None
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            if not self._socket.poll(remaining_ms, zmq.POLLIN):
                return _NO_REPLY
            parts = self._socket.recv_multipart(copy=False)
            if parts and len(parts[0]) == 0:
                parts = parts[1:]
            reply, arrays = decode_reply(parts, self._max_message_bytes)
            if reply.request_id != header.request_id:
                if reply.request_id is None and not reply.ok and reply.error is not None:
                    raise error_from_wire(reply.error)  # the server could not read our request at all
                logger.debug("%s: dropping a stale reply to %s", self.endpoint, reply.request_id)
                continue
            if reply.server_id and self.server_id and reply.server_id != self.server_id:
                logger.warning("%s: the bridge server has restarted (new id %s)", self.endpoint, reply.server_id)
                old_id, self.server_id, self._handshake_stale = self.server_id, reply.server_id, True
                if self.on_server_restart is not None:
                    self.on_server_restart(old_id, reply.server_id)
            if not reply.ok:
                assert reply.error is not None
                raise error_from_wire(reply.error)
            if header.method == HELLO_METHOD:
                return reply.result
            return decode_value(reply.result, arrays)

    def _check_auth_failure(self) -> None:
        """Raise `AuthenticationError` if the socket monitor saw the server refuse our handshake."""
        if self._monitor is None:
            return
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] & _AUTH_FAILURE_EVENTS:
                raise AuthenticationError(
                    f"{self.endpoint} refused this client's handshake (event {event['event']}, code {event['value']}): "
                    "the server needs CURVE and this client's public key must be on its allow-list"
                )

    def _typed(self, method: str, expected: type[T], params: dict[str, Any] | None = None) -> T:
        value = self._call(method, params)
        if isinstance(expected, type) and expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected):
            raise MalformedMessageError(
                f"{self.endpoint} answered {method} with {type(value).__name__}, expected {expected.__name__}"
            )
        return value

    # events ---------------------------------------------------------------------------------------
    def subscribe_events(self, topics: Iterable[str] = TOPICS) -> BridgeEventSubscriber:
        """A subscriber to the server's state-change events; `BridgeError` if the server publishes none."""
        if self.event_endpoint is None:
            raise BridgeError(f"{self.endpoint} publishes no events; start the server with an event endpoint")
        endpoint = self.event_endpoint
        if "://" in self.endpoint and endpoint.startswith("tcp://"):
            # the server reports its bound address (maybe 0.0.0.0); connect to the host we reached it at
            host = self.endpoint.split("://", 1)[1].rpartition(":")[0]
            endpoint = f"tcp://{host}:{endpoint.rpartition(':')[2]}"
        return BridgeEventSubscriber(endpoint, topics, curve_keys=self._curve_keys, server_public_key=self._server_key)

    # Microscope -----------------------------------------------------------------------------------
    def info(self) -> MicroscopeInfo:
        """Instrument name, camera shape, presets, stage limits and software version (remote call)."""
        return self._typed("info", MicroscopeInfo)

    def microscope_time_s(self) -> float:
        """Seconds of instrument time on the server's microscope."""
        return self._typed("microscope_time_s", float)

    def get_stage(self) -> StagePosition:
        """The current stage position (um, deg)."""
        return self._typed("get_stage", StagePosition)

    def stage_limits(self) -> StageLimits:
        """The stage travel limits (um, deg)."""
        return self._typed("stage_limits", StageLimits)

    def move_stage(
        self,
        x_um: float | None = None,
        y_um: float | None = None,
        z_um: float | None = None,
        alpha_deg: float | None = None,
        wait: bool = True,
    ) -> None:
        """Move to an absolute position (um, deg); run at most once on the server even when resent."""
        self._call("move_stage", {"x_um": x_um, "y_um": y_um, "z_um": z_um, "alpha_deg": alpha_deg, "wait": wait})

    def is_stage_moving(self) -> bool:
        """True while a move started with `wait=False` is in progress."""
        return self._typed("is_stage_moving", bool)

    def wait_for_stage(self, timeout_s: float = 60.0) -> None:
        """Block until the stage has settled; `StageMoveError` after `timeout_s` seconds."""
        self._call("wait_for_stage", {"timeout_s": timeout_s})

    def stop_stage(self) -> None:
        """Stop stage motion at once (never queued behind a running move on the server)."""
        self._call("stop_stage")

    def get_preset(self) -> str:
        """Name of the active optics preset."""
        return self._typed("get_preset", str)

    def set_preset(self, name: str) -> None:
        """Apply the optics preset `name`; `PresetError` if unknown."""
        self._call("set_preset", {"name": name})

    def set_beam_blanked(self, blanked: bool) -> None:
        """Blank (True) or unblank (False) the beam."""
        self._call("set_beam_blanked", {"blanked": blanked})

    def is_beam_blanked(self) -> bool:
        """True if the beam is blanked."""
        return self._typed("is_beam_blanked", bool)

    def acquire(self, exposure_s: float) -> Frame:
        """Expose for `exposure_s` seconds; the image arrives as a raw frame (read-only, not copied)."""
        return self._typed("acquire", Frame, {"exposure_s": exposure_s})

    def acquire_diffraction(self, exposure_s: float) -> Frame:
        """A diffraction pattern at the current position, `exposure_s` seconds."""
        return self._typed("acquire_diffraction", Frame, {"exposure_s": exposure_s})
