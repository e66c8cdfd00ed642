"""One accepted bridge call, run: the handshake or a `Microscope` method, and the reply frames it gives.

`CallRunner.reply(spec, params, request_id)` runs in the bridge server's worker threads (see
`drivers.zmq_bridge` for which thread runs which call). It never raises for what the call does: an
instrument error becomes an error reply that the client re-raises as the same class.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from drivers.base import (
    CASSETTE_METHODS,
    Microscope,
    MicroscopeError,
    MicroscopeInfo,
    ProtocolMismatchError,
    cassette_slot_count,
)
from drivers.protocol import (
    HELLO_METHOD,
    METHOD_SPECS,
    PROTOCOL_VERSION,
    MethodSpec,
    ReplyHeader,
    encode_arrays,
    encode_header,
    encode_value,
    error_to_wire,
)

logger = logging.getLogger(__name__)


class HelloResult(BaseModel):
    """The server's answer to the handshake."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol_version: int
    server_id: str
    info: MicroscopeInfo
    event_endpoint: str | None = None
    methods: tuple[str, ...]
    curve: bool = False


@dataclass
class ServerStats:
    """Counters of a running server (for tests, logs and `bridge ping`)."""

    requests: int = 0
    errors: int = 0
    replayed: int = 0
    dropped: int = 0
    executed: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count_error(self) -> None:
        """One more call answered with an error (thread-safe)."""
        with self._lock:
            self.errors += 1

    def count_executed(self, method: str) -> None:
        """One more call of `method` run on the microscope (thread-safe)."""
        with self._lock:
            self.executed[method] += 1


def error_reply(request_id: uuid.UUID | None, server_id: str, exc: Exception) -> ReplyHeader:
    """The reply header that carries `exc` back to the client (re-raised there as the same class)."""
    return ReplyHeader(
        protocol_version=PROTOCOL_VERSION,
        request_id=request_id,
        server_id=server_id,
        ok=False,
        error=error_to_wire(exc),
    )


class CallRunner:
    """Runs accepted calls on `microscope` for the server `server_id` and builds their replies.

    `event_endpoint` and `curve` are what the handshake tells clients (the bound PUB endpoint, whether
    CURVE is on); `stats` counts executed calls and errors.
    """

    def __init__(
        self, microscope: Microscope, server_id: str, stats: ServerStats, *, event_endpoint: str | None, curve: bool
    ) -> None:
        self._microscope = microscope
        self._server_id = server_id
        self._stats = stats
        self._event_endpoint = event_endpoint
        self._curve = curve
        self._cassette_slots: int | None = None  # the microscope's cassette, asked once (info() then says)

    def reply(self, spec: MethodSpec, params: BaseModel, request_id: uuid.UUID) -> list[Any]:
        """Run the call and return its reply frames: the encoded header, then the array frames (if any)."""
        arrays: list[Any] = []
        descriptors: tuple[Any, ...] = ()
        try:
            if spec.name == HELLO_METHOD:
                result: Any = self._hello(params).model_dump(mode="json")
            else:
                method = getattr(self._microscope, spec.name, None)
                if not callable(method):
                    raise MicroscopeError(f"this microscope has no {spec.name} (an optional capability it lacks)")
                if spec.name in CASSETTE_METHODS:
                    self._check_cassette(spec.name)
                value = method(**params.model_dump())
                self._stats.count_executed(spec.name)
                result, raw_arrays = encode_value(value)
                descriptors, arrays = encode_arrays(raw_arrays)
            header = ReplyHeader(
                protocol_version=PROTOCOL_VERSION,
                request_id=request_id,
                server_id=self._server_id,
                ok=True,
                result=result,
                arrays=descriptors,
            )
        except Exception as exc:
            self._stats.count_error()
            if not isinstance(exc, MicroscopeError):
                logger.exception("bridge: %s raised a non-MicroscopeError", spec.name)
            arrays = []
            header = error_reply(request_id, self._server_id, exc)
        return [encode_header(header), *arrays]

    def _check_cassette(self, method: str) -> None:
        """`MicroscopeError` when the served microscope has no autoloader cassette (`info().cassette_slots` 0),
        even if its class has the methods (e.g. an adapter whose autoloader is not enabled)."""
        if self._cassette_slots is None:
            self._cassette_slots = cassette_slot_count(self._microscope)
        if self._cassette_slots <= 0:
            raise MicroscopeError(
                f"this microscope has no autoloader cassette, so it cannot {method} (info().cassette_slots is 0); "
                "load the grid by hand, or enable the autoloader in the driver's configuration"
            )

    def _hello(self, params: BaseModel) -> HelloResult:
        client_version = getattr(params, "client_protocol_version", None)
        if client_version != PROTOCOL_VERSION:
            raise ProtocolMismatchError(
                f"client speaks bridge protocol {client_version}, server speaks {PROTOCOL_VERSION}; "
                "install the same crystal-locator version on both sides"
            )
        logger.info("bridge: handshake from %r", getattr(params, "client_name", ""))
        return HelloResult(
            protocol_version=PROTOCOL_VERSION,
            server_id=self._server_id,
            info=self._microscope.info(),
            event_endpoint=self._event_endpoint,
            methods=tuple(METHOD_SPECS),
            curve=self._curve,
        )
