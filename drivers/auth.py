"""CURVE keys for the ZeroMQ bridge: generating, loading and the client allow-list.

ZeroMQ's CURVE mechanism encrypts and authenticates a connection with Curve25519 key pairs. The
server has one key pair; every client has its own. The server keeps an allow-list of client *public*
keys and refuses every other client during the handshake (through a ZAP authenticator thread), so an
unknown client never reaches the bridge's request handler.

Keys are stored the way `zmq.auth.create_certificates` writes them: `NAME.key` (public key only, safe
to copy to the other side) and `NAME.key_secret` (public + secret key, keep it private). Keys in
memory are the 40-character Z85 text as `bytes`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from drivers.base import AuthenticationError

logger = logging.getLogger(__name__)

#: Length of a Z85-encoded Curve25519 key.
Z85_KEY_LENGTH = 40


@dataclass(frozen=True)
class CurveKeyPair:
    """A CURVE key pair as Z85 text (`bytes`, 40 characters each). `secret` may be None for a peer's key."""

    public: bytes
    secret: bytes | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "public", _check_z85(self.public, "public key"))
        if self.secret is not None:
            object.__setattr__(self, "secret", _check_z85(self.secret, "secret key"))

    @classmethod
    def generate(cls) -> CurveKeyPair:
        """A new random key pair (libsodium)."""
        public, secret = zmq.curve_keypair()
        return cls(public=public, secret=secret)

    @classmethod
    def load(cls, path: str | os.PathLike[str], name: str | None = None) -> CurveKeyPair:
        """Load a key pair from a `.key_secret` / `.key` file, or from `DIR/NAME.key_secret` for a directory.

        Raises `AuthenticationError` naming the file when it is missing or is not a certificate.
        """
        file_path = Path(path)
        if file_path.is_dir():
            candidates = [file_path / f"{name}.key_secret"] if name else sorted(file_path.glob("*.key_secret"))
            if len(candidates) != 1 or not candidates[0].is_file():
                raise AuthenticationError(
                    f"{file_path}: expected exactly one {name or '*'}.key_secret file in this directory; "
                    "create one with `crystal-locator bridge keys --out DIR`"
                )
            file_path = candidates[0]
        if not file_path.is_file():
            raise AuthenticationError(
                f"{file_path}: no such key file; create one with `crystal-locator bridge keys --out DIR`"
            )
        try:
            public, secret = zmq.auth.load_certificate(file_path)
        except (ValueError, OSError) as exc:
            raise AuthenticationError(f"{file_path}: not a ZeroMQ certificate ({exc})") from exc
        return cls(public=public, secret=secret)

    @property
    def has_secret(self) -> bool:
        """True if this pair includes the secret key (needed to act as this party)."""
        return self.secret is not None


def _check_z85(key: bytes | str, what: str) -> bytes:
    """Return `key` as Z85 bytes, or raise `AuthenticationError` if it is not a 40-character Z85 key."""
    raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
    raw = raw.strip()
    if len(raw) != Z85_KEY_LENGTH:
        raise AuthenticationError(f"a CURVE {what} must be 40 Z85 characters, got {len(raw)}")
    try:
        zmq.utils.z85.decode(raw)
    except (ValueError, KeyError, IndexError) as exc:
        raise AuthenticationError(f"the CURVE {what} is not valid Z85 text") from exc
    return raw


def load_public_key(source: bytes | str | os.PathLike[str]) -> bytes:
    """A client or server public key from Z85 text or from a `.key` / `.key_secret` file.

    A `str`/`bytes` of exactly 40 characters is taken as the key itself; anything else as a path.
    """
    if isinstance(source, (bytes, str)) and len(source.strip()) == Z85_KEY_LENGTH and not Path(
        os.fsdecode(source)
    ).exists():
        return _check_z85(source, "public key")
    return CurveKeyPair.load(os.fsdecode(source)).public


def load_allow_list(sources: Iterable[bytes | str | os.PathLike[str]]) -> frozenset[bytes]:
    """The set of allowed client public keys from keys, key files, or directories of `*.key` files."""
    keys: set[bytes] = set()
    for source in sources:
        path = Path(os.fsdecode(source)) if not isinstance(source, bytes) else None
        if path is not None and path.is_dir():
            found = sorted(path.glob("*.key"))
            if not found:
                raise AuthenticationError(f"{path}: no *.key public key files in this directory")
            keys.update(load_public_key(p) for p in found)
        else:
            keys.add(load_public_key(source))
    return frozenset(keys)


def create_key_pair_files(out_dir: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write a new key pair as `OUT/NAME.key` (public) and `OUT/NAME.key_secret`; return both paths.

    Refuses to overwrite an existing key (raises `AuthenticationError`), so a running installation's
    keys are never replaced by accident. The secret file is made readable by its owner only.
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if path.exists():
            raise AuthenticationError(f"{path} exists already; remove it or choose another --name")
    public_file, secret_file = zmq.auth.create_certificates(directory, name)
    try:
        os.chmod(secret_file, 0o600)
    except OSError:  # pragma: no cover - e.g. file systems without permissions
        logger.warning("could not restrict permissions of %s", secret_file)
    return Path(public_file), Path(secret_file)


class AllowListAuthenticator:
    """A ZAP authenticator (own thread) that admits only CURVE clients whose public key is allowed.

    Attach it to the `zmq.Context` of the server sockets *before* binding them. The allow-list may be
    replaced while running with `set_allowed`.
    """

    def __init__(self, context: zmq.Context, allowed_client_keys: Iterable[bytes]) -> None:
        self._lock = threading.Lock()
        self._allowed = frozenset(allowed_client_keys)
        self._authenticator = ThreadAuthenticator(context, log=logging.getLogger(f"{__name__}.zap"))
        self.refused_count = 0

    def set_allowed(self, allowed_client_keys: Iterable[bytes]) -> None:
        """Replace the allow-list (Z85 public keys)."""
        with self._lock:
            self._allowed = frozenset(allowed_client_keys)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP callback: True if the Z85 public `key` is on the allow-list."""
        with self._lock:
            allowed = key in self._allowed
        if not allowed:
            self.refused_count += 1
            logger.warning("refused CURVE client with unknown public key %s", key.decode("ascii", "replace"))
        return allowed

    def start(self) -> None:
        """Start the authenticator thread and install the allow-list check for every domain."""
        self._authenticator.start()
        self._authenticator.configure_curve_callback("*", credentials_provider=self)

    def stop(self) -> None:
        """Stop the authenticator thread."""
        self._authenticator.stop()


def configure_curve_server(socket: zmq.Socket, keys: CurveKeyPair) -> None:
    """Make `socket` a CURVE server with the server key pair `keys` (call before bind)."""
    if keys.secret is None:
        raise AuthenticationError("the server key pair has no secret key; load the NAME.key_secret file")
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True


def configure_curve_client(socket: zmq.Socket, client_keys: CurveKeyPair, server_public_key: bytes) -> None:
    """Make `socket` a CURVE client with its own key pair and the server's public key (before connect)."""
    if client_keys.secret is None:
        raise AuthenticationError("the client key pair has no secret key; load the NAME.key_secret file")
    socket.curve_secretkey = client_keys.secret
    socket.curve_publickey = client_keys.public
    socket.curve_serverkey = _check_z85(server_public_key, "server public key")
