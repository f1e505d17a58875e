"""Who may talk to the engine: ZeroMQ CURVE keys and the allow-list of clients.

CURVE (RFC-like ZMTP 3 security, libsodium's curve25519) encrypts a ZeroMQ
connection and proves each side holds its secret key. The engine is the CURVE
*server* on `ingest` and `events`; every producer or subscriber is a *client*
with a key pair of its own. A ZAP handler (engine.zap, in a thread of the
supervisor) admits only clients whose public key is a `*.key` file in
`security.curve.allowed_clients`: a client with any other key, or none, never
gets a job in or an event out. The control socket, when it is tcp, has a pair and
a list of its own (`control.curve`: the operators' keys, docs/OPERATIONS.md).

Keys are ZeroMQ certificate files (Z85 text), as `zmq.auth.create_certificates`
writes them: `NAME.key` holds the public key, `NAME.key_secret` both keys.
`mailengine keygen NAME` makes a pair. A secret key file others may read, or a key
file or clients' folder others may write, is refused. See docs/SECURITY.md.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

import zmq
import zmq.auth

from engine.config import ConfigError, ControlCurveConfig, CurveConfig
from engine.zap import Zap

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
    """Both keys from a `.key_secret` file, which only its owner (and group) may read."""
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(f"{path} holds only a public key; give the .key_secret file"
                        " that `mailengine keygen` wrote next to it")
    mode = _mode(path)
    if mode & 0o037:
        raise KeyFileError(f"{path}: mode {mode:04o} lets others read or change the secret"
                           f" key; chmod 600 {path} (or 640 for a group that must read it)")
    return KeyPair(public, secret)


def load_public(path: str) -> bytes:
    """The public key from a `.key` file (a `.key_secret` file will do too)."""
    return _load(path)[0]


def public_file_for(secret_path: str) -> str:
    """`/x/server.key_secret` -> `/x/server.key`, where keygen put the public half."""
    if secret_path.endswith(".key" + SECRET_SUFFIX):
        return secret_path[:-len(SECRET_SUFFIX)]
    return secret_path


def _mode(path: str) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as err:
        raise KeyFileError(f"{path}: cannot be read: {err.strerror or err}") from err


def _load(path: str) -> tuple[bytes, bytes | None]:
    if not os.path.isfile(path):
        raise KeyFileError(f"{path}: no such key file")
    if _mode(path) & 0o002:
        raise KeyFileError(f"{path}: anyone may change this key file (mode"
                           f" {_mode(path):04o}); chmod o-w {path}")
    if not os.access(path, os.R_OK):
        raise KeyFileError(f"{path}: cannot be read by this user (uid {os.getuid()})")
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
    if _mode(directory) & 0o002:
        raise KeyFileError(f"{directory}: anyone may add a key to this folder (mode"
                           f" {_mode(directory):04o}); chmod o-w {directory}")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise KeyFileError(f"{directory}: cannot be read by this user (uid {os.getuid()})")
    keys: dict[bytes, str] = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".key"):
            path = os.path.join(directory, name)
            keys[load_public(path)] = path
    return keys


# --- the server side (the supervisor) ------------------------------------------------


class CurveServer:
    """A CURVE server key pair and the clients allowed on its sockets (one ZAP domain).

    `security.curve` (ingest and events; the empty ZAP domain) and `control.curve` (the
    control socket; domain `control`) are one each, with their own keys and lists.
    `start(zap)` before binding any of its sockets: a handshake that finds no ZAP
    handler would be let in unchecked (engine.zap).
    """

    def __init__(self, cfg: CurveConfig | ControlCurveConfig, where: str = "security.curve",
                 domain: str = "") -> None:
        self.cfg = cfg
        self.where = where  # the config's section, in error messages
        self.domain = domain
        if not available():
            raise ConfigError(f"{where}.enabled: this libzmq was built without CURVE"
                              " (zmq.has('curve') is False); install libzmq with libsodium",
                              key=f"{where}.enabled")
        try:
            self.keys = load_keypair(cfg.server_secret_key)
        except KeyFileError as err:
            raise ConfigError(f"{where}.server_secret_key: {err}",
                              key=f"{where}.server_secret_key") from err
        self.folder = cfg.allowed_clients
        self.clients = self._read_clients(self.folder)
        self._zap: Zap | None = None

    def start(self, zap: Zap) -> None:
        self._zap = zap
        zap.allow(self.domain, self.clients)

    def reload_clients(self, folder: str | None = None) -> int:
        """Read the allow-list again (SIGHUP), from `folder` if it moved; on a bad or empty
        folder keep the old list and raise ConfigError."""
        folder = folder or self.folder
        self.clients = self._read_clients(folder)
        self.folder = folder
        if self._zap is not None:
            self._zap.allow(self.domain, self.clients)
        return len(self.clients)

    def secure(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server of this key pair and list; call before bind."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.secret)
        if self.domain:
            sock.setsockopt(zmq.ZAP_DOMAIN, self.domain.encode())

    def _read_clients(self, path: str) -> dict[bytes, str]:
        try:
            clients = allowed_clients(path)
        except KeyFileError as err:
            raise ConfigError(f"{self.where}.allowed_clients: {err}",
                              key=f"{self.where}.allowed_clients") from err
        if not clients:
            raise ConfigError(f"{self.where}.allowed_clients: no client public keys (*.key)"
                              f" in {path}; make one with `mailengine keygen NAME` and copy"
                              " NAME.key there", key=f"{self.where}.allowed_clients")
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
