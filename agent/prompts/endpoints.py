"""Addresses and CURVE keys of the prompt sockets: where the event socket listens, and the keys a channel
or client needs off loopback (which endpoints are loopback is `drivers.network`'s one check).

Security: binding anything but a loopback address (or ipc://) requires CURVE: a server secret key
file and a folder of allowed client public keys (`zmq.auth.create_certificates` writes both kinds).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from agent.prompts.errors import OperatorError, OperatorSecurityError
from drivers.auth import CurveKeyPair, load_allow_list
from drivers.base import AuthenticationError, BridgeError
from drivers.network import is_loopback_endpoint

#: What a channel may be given as its allowed client keys: keys, `.key` files or folders of them.
AllowedKeys = Iterable[bytes | str | os.PathLike[str]] | str | os.PathLike[str]


def endpoint_with_port(endpoint: str, port: int) -> str:
    """`endpoint` (tcp://HOST:PORT) with its port replaced; used to reach the PUB socket."""
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0]
    return f"tcp://{host}:{port}"


def event_endpoint_for(endpoint: str) -> str:
    """The default event (PUB) endpoint next to the prompt endpoint `endpoint`: any free port on the same
    host for tcp://, `<path>.events` for ipc://."""
    if endpoint.startswith("tcp://"):
        return endpoint_with_port(endpoint, 0)
    if endpoint.startswith("ipc://"):
        return endpoint + ".events"
    raise OperatorError(f"cannot derive an event endpoint from {endpoint!r}; pass event_endpoint explicitly")


def key_pair(keys: CurveKeyPair | str | os.PathLike[str]) -> CurveKeyPair:
    """A key pair with its secret key (ours), as `drivers.auth` loads it; `OperatorSecurityError` if not."""
    try:
        pair = keys if isinstance(keys, CurveKeyPair) else CurveKeyPair.load(keys)
    except AuthenticationError as exc:
        raise OperatorSecurityError(str(exc)) from exc
    if not pair.has_secret:
        raise OperatorSecurityError("this CURVE key pair has no secret key; pass the NAME.key_secret file")
    return pair


def server_curve(
    endpoints: Iterable[str],
    curve: CurveKeyPair | str | os.PathLike[str] | None,
    allowed_client_keys: AllowedKeys | None,
    require_curve: bool,
) -> tuple[CurveKeyPair | None, frozenset[bytes]]:
    """The channel's CURVE set-up: (server key pair, allowed client public keys), or (None, empty) without CURVE.

    Raises `OperatorSecurityError` when one of `endpoints` is off loopback without CURVE, or when only half
    of the keys are given or they cannot be read.
    """
    use_curve = curve is not None or allowed_client_keys is not None or require_curve
    for address in endpoints:
        try:
            loopback = is_loopback_endpoint(address)
        except BridgeError as exc:
            raise OperatorSecurityError(f"cannot listen on {address}: {exc}") from exc
        if not loopback and not use_curve:
            raise OperatorSecurityError(
                f"refusing to listen on {address} without CURVE: bind 127.0.0.1 (and use an SSH tunnel), "
                "or pass curve (server key pair) and allowed_client_keys"
            )
    if not use_curve:
        return None, frozenset()
    if curve is None or allowed_client_keys is None:
        raise OperatorSecurityError("CURVE needs both curve (server key pair) and allowed_client_keys")
    server_keys = key_pair(curve)
    single = isinstance(allowed_client_keys, (str, os.PathLike))
    sources = [allowed_client_keys] if single else allowed_client_keys
    try:
        allowed = load_allow_list(sources)
    except AuthenticationError as exc:
        raise OperatorSecurityError(str(exc)) from exc
    return server_keys, allowed
