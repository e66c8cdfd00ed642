"""Which ZeroMQ endpoints are reachable from this computer only: the one loopback check of the project.

Every socket the project binds (the bridge server, the session's event and control sockets, the prompt
channel) binds loopback unless it is protected otherwise (CURVE). `is_loopback_endpoint` says whether an
endpoint is loopback; `require_loopback` refuses one that is not.
"""

from __future__ import annotations

from drivers.base import BridgeError

#: Host names and addresses of the loopback interface (besides 127.0.0.0/8, matched by prefix).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def is_loopback_endpoint(endpoint: str) -> bool:
    """True if `endpoint` is reachable from this computer only (tcp on 127.x/::1/localhost, ipc, inproc).

    Raises `BridgeError` for an endpoint that is not `tcp://HOST:PORT`, `ipc://...` or `inproc://...`.
    """
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        raise BridgeError(f"endpoint {endpoint!r} is not of the form tcp://HOST:PORT")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        raise BridgeError(f"endpoint {endpoint!r}: only tcp://, ipc:// and inproc:// are supported")
    host, colon, port = rest.rpartition(":")
    if not colon or not host or not port:
        raise BridgeError(f"endpoint {endpoint!r} is not of the form tcp://HOST:PORT")
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def require_loopback(endpoint: str, what: str) -> None:
    """Raise `ValueError` unless `endpoint` is loopback (or ipc/inproc); `what` names the socket in the
    message (e.g. "the event publisher"). A malformed endpoint is a `ValueError` too."""
    try:
        loopback = is_loopback_endpoint(endpoint)
    except BridgeError as exc:
        raise ValueError(f"{what}: {exc}") from exc
    if not loopback:
        raise ValueError(
            f"refusing to bind {what} to {endpoint}: only loopback is allowed here; reach it through an SSH tunnel"
        )
