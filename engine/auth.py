"""Who may talk to the engine: ZeroMQ CURVE keys and the allow-list of clients.

CURVE (RFC-like ZMTP 3 security, libsodium's curve25519) encrypts a ZeroMQ
connection and proves each side holds its secret key. The engine is the CURVE
*server* on `ingest` and `events`; every producer or subscriber is a *client*
with a key pair of its own. A ZAP handler (pyzmq's `ThreadAuthenticator`, in a
thread of the supervisor) admits only clients whose public key is a `*.key`
file in `security.curve.allowed_clients`: a client with any other key, or none,
never gets a job in or an event out.

Keys are ZeroMQ certificate files (Z85 text), as `zmq.auth.create_certificates`
writes them: `NAME.key` holds the public key, `NAME.key_secret` both keys.
`mailengine keygen NAME` makes a pair. See docs/SECURITY.md.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from engine.config import ConfigError, CurveConfig

log = logging.getLogger("mailengine.auth")

SECRET_SUFFIX = "_secret"


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and says why."""


@dataclass(frozen=True)
class KeyPair:
    """Z85 public and secret keys (40 characters each, as bytes)."""

    public: bytes
    secret: bytes


def available() -> bool:
    """True when libzmq was built with CURVE (libsodium or tweetnacl)."""
    return bool(zmq.has("curve"))


# --- key files --------------------------------------------------------------------


def keygen(name: str, directory: str = ".") -> tuple[str, str]:
    """Write NAME.key (public, mode 0644) and NAME.key_secret (both keys, mode 0600).

    Refuses to overwrite either file: replacing the engine's key locks every client
    out, replacing a client's key locks that client out.
    """
    if not name or os.sep in name or name.startswith("."):
        raise KeyFileError(f"key name must be a plain file name, not {name!r}")
    os.makedirs(directory, mode=0o755, exist_ok=True)
    base = os.path.join(directory, name)
    for path in (base + ".key", base + ".key" + SECRET_SUFFIX):
        if os.path.exists(path):
            raise KeyFileError(f"{path} exists already; not overwriting it")
    old = os.umask(0o077)  # the secret file must never exist world-readable, even briefly
    try:
        public_file, secret_file = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(public_file, 0o644)
    os.chmod(secret_file, 0o600)
    return str(public_file), str(secret_file)


def load_keypair(path: str) -> KeyPair:
    """Both keys from a `.key_secret` file."""
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(f"{path} holds only a public key; give the .key_secret file"
                        " that `mailengine keygen` wrote next to it")
    return KeyPair(public, secret)


def load_public(path: str) -> bytes:
    """The public key from a `.key` file (a `.key_secret` file will do too)."""
    return _load(path)[0]


def public_file_for(secret_path: str) -> str:
    """`/x/server.key_secret` -> `/x/server.key`, where keygen put the public half."""
    if secret_path.endswith(".key" + SECRET_SUFFIX):
        return secret_path[:-len(SECRET_SUFFIX)]
    return secret_path


def _load(path: str) -> tuple[bytes, bytes | None]:
    if not os.path.isfile(path):
        raise KeyFileError(f"{path}: no such key file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise KeyFileError(f"{path}: not a ZeroMQ key file ({err})") from err
    for key in (public, secret):
        if key is not None and len(key) != 40:
            raise KeyFileError(f"{path}: a key must be 40 Z85 characters, found {len(key)}")
    return public, secret


def allowed_clients(directory: str) -> dict[bytes, str]:
    """Public key -> the file it came from, for every `*.key` file in `directory`."""
    if not os.path.isdir(directory):
        raise KeyFileError(f"{directory}: no such folder")
    keys: dict[bytes, str] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".key"):
            path = os.path.join(directory, name)
            keys[load_public(path)] = path
    return keys


# --- the server side (the supervisor) ------------------------------------------------


class CurveServer:
    """The engine's key pair and the ZAP handler that checks every client's key.

    `start()` before binding any CURVE socket: a handshake that finds no ZAP handler
    would be let in unchecked. `stop()` before the context is destroyed.
    """

    def __init__(self, cfg: CurveConfig) -> None:
        self.cfg = cfg
        if not available():
            raise ConfigError("security.curve.enabled: this libzmq was built without CURVE"
                              " (zmq.has('curve') is False); install libzmq with libsodium",
                              key="security.curve.enabled")
        try:
            self.keys = load_keypair(cfg.server_secret_key)
        except KeyFileError as err:
            raise ConfigError(f"security.curve.server_secret_key: {err}",
                              key="security.curve.server_secret_key") from err
        self.folder = cfg.allowed_clients
        self.clients = self._read_clients(self.folder)
        self._auth: ThreadAuthenticator | None = None

    def start(self, ctx: zmq.Context) -> None:
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=self.folder)

    def reload_clients(self, folder: str | None = None) -> int:
        """Read the allow-list again (SIGHUP), from `folder` if it moved; on a bad or empty
        folder keep the old list and raise ConfigError."""
        folder = folder or self.folder
        self.clients = self._read_clients(folder)
        self.folder = folder
        if self._auth is not None:
            self._auth.configure_curve(domain="*", location=folder)
        return len(self.clients)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def secure(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server; call before bind."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)

    @staticmethod
    def _read_clients(path: str) -> dict[bytes, str]:
        try:
            clients = allowed_clients(path)
        except KeyFileError as err:
            raise ConfigError(f"security.curve.allowed_clients: {err}",
                              key="security.curve.allowed_clients") from err
        if not clients:
            raise ConfigError(f"security.curve.allowed_clients: no client public keys (*.key)"
                              f" in {path}; make one with `mailengine keygen NAME` and copy"
                              " NAME.key there", key="security.curve.allowed_clients")
        return clients


# --- the client side (producers, subscribers) ------------------------------------------


@dataclass(frozen=True)
class CurveClient:
    """What a producer or subscriber needs: the engine's public key and its own pair."""

    server_public: bytes
    keys: KeyPair

    @classmethod
    def from_files(cls, server_key: str, client_key: str) -> CurveClient:
        return cls(load_public(server_key), load_keypair(client_key))

    def secure(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of the engine; call before connect."""
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
