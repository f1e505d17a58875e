"""What this host must offer a config before the engine can start on it.

`mailengine check-config` and `mailengine run` call `problems`; each problem is one
line naming the key, the path or endpoint at fault and why, and either command then
exits 2 (a restart would not fix it, so systemd does not loop on it):

- the sending IPs are held by the host (engine.hostcheck);
- `smtp.ca_file` loads as the workers load it (missing, unreadable, not PEM: the
  workers used to crash-loop on a FileNotFoundError that named no file);
- the CURVE keys of `security.curve` and `control.curve`, when on, load (a secret key
  file that others may read is refused) and libzmq has CURVE;
- every `dkim` key loads (missing, unreadable, readable by group or others, not a
  private key DKIM can use) and each signing domain has a key valid today, unless
  it may send unsigned (engine.dkim.problems): never an unsigned send by surprise;
- `spool`, `run_dir` and the folder of `events_log` are writable folders, or can be
  created; an existing spool file and events log are writable;
- `ingest`, `events`, `control` and the workers' results socket in `run_dir` are free:
  a tcp port no other process listens on, an ipc path no process answers on (a path
  left by a process that died is fine: the engine removes it).

Endpoints and a running engine: `systemctl reload` runs check-config while the engine
holds its own endpoints. An endpoint in use is forgiven at check-config when the
process listening on it is the engine that answers `status` on the config's
`control` (found in /proc: its pid's sockets; when /proc cannot tell, an answering
engine is taken to hold them). `run` forgives nothing: it is about to bind them.

Kept out of config loading on purpose (engine.hostcheck says why): every check here
looks at this host, never at the file.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import pwd
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from engine import dkim, hostcheck
from engine.config import Config, ConfigError

IPC_PATH_MAX = 107  # bytes: sockaddr_un.sun_path, less its terminating NUL
SPOOL_FILE = "spool.db"  # engine.spool's file in the spool folder


@dataclass(frozen=True)
class Busy:
    """An endpoint another process is listening on."""
    key: str
    endpoint: str
    inodes: frozenset[int]  # the listening sockets' inodes, when /proc shows them

    def line(self) -> str:
        return f"{self.key} {self.endpoint}: in use by another process (another engine?)"


def problems(cfg: Config, is_ours: Callable[[Busy], bool] | None = None) -> list[str]:
    """One line per thing this host lacks for `cfg` (empty: it can start). `is_ours`
    says whether a busy endpoint is the running engine's own (check-config); None
    (run) counts every busy endpoint."""
    found = [*hostcheck.problems(cfg.ips), *ca_file(cfg), *curve_keys(cfg),
             *dkim.problems(cfg.dkim), *folders(cfg)]
    bad, busy = endpoints(cfg)
    return found + bad + [b.line() for b in busy if is_ours is None or not is_ours(b)]


# -- the CA file ---------------------------------------------------------------------


def ca_file(cfg: Config) -> list[str]:
    """`smtp.ca_file` loaded as engine.tls loads it."""
    path = cfg.smtp.ca_file
    if path is None:
        return []
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as err:
        return [f"smtp.ca_file {path}: not a file of PEM CA certificates ({err.reason})"]
    except OSError as err:
        return [f"smtp.ca_file {path}: cannot be read: {err.strerror or err}"]
    return []


# -- CURVE keys ------------------------------------------------------------------------


def curve_keys(cfg: Config) -> list[str]:
    """The CURVE key pairs and clients' folders, loaded as the supervisor loads them
    (engine.auth), for each of `security.curve` and `control.curve` that is on: a
    missing, unreadable or unsafe (secret readable by others) file, an empty folder,
    a libzmq without CURVE."""
    found = []
    for on, section, where, domain in (
            (cfg.security.curve.enabled, cfg.security.curve, "security.curve", ""),
            (cfg.control_curve.enabled, cfg.control_curve, "control.curve", "control")):
        if not on:
            continue
        from engine import auth  # zmq's CURVE: only when configured
        try:
            auth.CurveServer(section, where, domain)
        except ConfigError as err:
            found.append(str(err))
    return found


# -- folders and files ---------------------------------------------------------------


def folders(cfg: Config) -> list[str]:
    """The folders the engine writes, and the files in them it appends to."""
    found = [
        *_folder("spool", cfg.spool),
        *_file("spool", os.path.join(cfg.spool, SPOOL_FILE)),
        *_folder("run_dir", cfg.run_dir),
        *_folder("events_log", os.path.dirname(os.path.abspath(cfg.events_log))),
        *_file("events_log", cfg.events_log),
    ]
    return list(dict.fromkeys(found))  # spool and run_dir may be one folder


def _folder(key: str, path: str) -> list[str]:
    """A folder the engine may write, or one it may create (the nearest existing parent
    writable). Nothing is created: check-config changes nothing."""
    if os.path.isdir(path):
        return [] if _writable(path) else [f"{key} {path}: not writable by {_user()}"]
    if os.path.lexists(path):
        return [f"{key} {path}: not a folder"]
    parent = _existing_parent(path)
    if not os.path.isdir(parent):
        return [f"{key} {path}: cannot be created: {parent} is not a folder"]
    if not _writable(parent):
        return [f"{key} {path}: cannot be created: {parent} is not writable by {_user()}"]
    return []


def _file(key: str, path: str) -> list[str]:
    if os.path.isfile(path) and not os.access(path, os.W_OK, effective_ids=_EFFECTIVE):
        return [f"{key} {path}: not writable by {_user()}"]
    return []


_EFFECTIVE = os.access in os.supports_effective_ids  # the engine writes as its effective user


def _writable(folder: str) -> bool:
    """access(2) sees permissions, ACLs and a read-only file system (EROFS), also for root."""
    return os.access(folder, os.W_OK | os.X_OK, effective_ids=_EFFECTIVE)


def _existing_parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    return parent


def _user() -> str:
    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"


# -- endpoints -----------------------------------------------------------------------


def endpoints(cfg: Config) -> tuple[list[str], list[Busy]]:
    """Endpoints that cannot be bound as written, and those another process listens on."""
    bad: list[str] = []
    busy: list[Busy] = []
    results = os.path.join(cfg.run_dir, "results.sock")  # engine.workers' results endpoint
    for key, endpoint in (("ingest", cfg.ingest), ("events", cfg.events),
                          ("control", cfg.control), ("run_dir", f"ipc://{results}")):
        try:
            inodes = listening(endpoint)
        except ValueError as err:
            bad.append(f"{key} {endpoint}: {err}")
            continue
        if inodes is not None:
            busy.append(Busy(key, endpoint, inodes))
    return bad, busy


def listening(endpoint: str) -> frozenset[int] | None:
    """None when nothing listens on `endpoint`; else the inodes of the sockets that do
    (empty when /proc does not show them). ValueError when it cannot be bound at all."""
    if endpoint.startswith("ipc://"):
        return _ipc_listening(endpoint[len("ipc://"):])
    if endpoint.startswith("tcp://"):
        return _tcp_listening(endpoint[len("tcp://"):])
    return None  # inproc: inside the process


def _ipc_listening(path: str) -> frozenset[int] | None:
    if len(os.fsencode(path)) > IPC_PATH_MAX:
        raise ValueError(f"the path is longer than the {IPC_PATH_MAX} bytes a Unix socket"
                         f" may have")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None  # no such path, or one left by a process that died
        except OSError as err:
            if err.errno in (errno.ENOTSOCK, errno.ENOTDIR):
                raise ValueError(f"{path} is not a socket") from None
            return None  # e.g. no permission to look: the bind will say
    return frozenset(_unix_inodes(path))


def _tcp_listening(address: str) -> frozenset[int] | None:
    host, _, port_text = address.rpartition(":")
    host = host.split(";")[-1]  # "source;address": the address binds
    if not host or not port_text:
        raise ValueError("not tcp://HOST:PORT")
    if port_text in ("*", "0"):
        return None  # an ephemeral port: never in use
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"not a port number: {port_text!r}")
    port = int(port_text)
    family, bind_host = _bind_address(host)
    if family is None:
        return None  # an interface name or a host name: libzmq resolves it, not us
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq does
        try:
            probe.bind((bind_host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return frozenset(_tcp_inodes(port))
            raise ValueError(f"cannot be bound: {err.strerror or err}") from None
    return None


def _bind_address(host: str) -> tuple[socket.AddressFamily | None, str]:
    if host == "*":
        return socket.AF_INET, "0.0.0.0"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None, host
    return (socket.AF_INET6 if address.version == 6 else socket.AF_INET), str(address)


# -- whose sockets: /proc -------------------------------------------------------------


def _tcp_inodes(port: int) -> set[int]:
    """Inodes of the sockets listening on tcp `port` (IPv4 and IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for fields in _rows(table):
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN; inode is field 9.
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                found.add(int(fields[9]))
    return found


def _unix_inodes(path: str) -> set[int]:
    """Inodes of the listening Unix sockets bound to `path` (field 6 is inode, 7 path)."""
    return {int(fields[6]) for fields in _rows("/proc/net/unix")
            if len(fields) > 7 and fields[7] == path}


def _rows(table: str) -> Iterable[list[str]]:
    try:
        with open(table, encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return []
    return [line.split() for line in lines]


def socket_inodes(pid: int) -> set[int] | None:
    """Inodes of the sockets process `pid` holds; None when /proc does not show them
    (another user's process, /proc mounted with hidepid)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    found = set()
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            found.add(int(target[len("socket:["):-1]))
    return found


def held_by(busy: Busy, pid: int) -> bool:
    """Whether process `pid` holds `busy`'s listening socket; True when /proc cannot
    tell (the caller found `pid` answering as the engine: benefit of the doubt)."""
    held = socket_inodes(pid)
    if held is None or not busy.inodes:
        return True
    return bool(busy.inodes & held)
