"""A DNSSEC-signed zone behind a validating resolver, for DANE tests: Debian's own servers on
loopback, no mocks.

    with SignedDns({"dane.test": {...}}, unsigned={"plain.test": {...}}) as dns:
        dns.resolver_address, dns.resolver_port   # unbound: give these to the engine

- nsd (authoritative) on 127.0.0.53 serves every zone; the `signed` ones are signed at start
  with a fresh key (ldns-keygen, ldns-signzone);
- unbound (validating, recursive) on 127.0.0.54 reaches nsd through stub zones, with each
  signed zone's DNSKEY as its trust anchor and nothing declared insecure: answers from a
  signed zone come back with AD, answers from an unsigned zone (no trust anchor) without.

A zone is {owner: [(type, rdata text), ...]}, owners relative to the zone ("@" the apex).
Both servers run in the foreground as child processes, on ephemeral ports, and are stopped
(by their pid) on exit. `missing()` names what is not installed (tests skip, or fail when
MAILENGINE_DNSSEC_SERVERS=required: .ci/run installs them).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

import dns.flags
import dns.message
import dns.query
import dns.rcode

from engine.testing import procs
from tests.support.wait import until

REQUIRE = "MAILENGINE_DNSSEC_SERVERS"
BINARIES = {"nsd": "nsd", "unbound": "unbound", "ldns-keygen": "ldnsutils",
            "ldns-signzone": "ldnsutils"}
SBIN = ("/usr/sbin", "/usr/bin", "/sbin")
AUTH_ADDRESS = "127.0.0.53"
RESOLVER_ADDRESS = "127.0.0.54"

Zone = dict[str, list[tuple[str, str]]]


def binary(name: str) -> str | None:
    return shutil.which(name) or next((os.path.join(d, name) for d in SBIN
                                       if os.access(os.path.join(d, name), os.X_OK)), None)


def missing() -> str | None:
    """What is not installed, as a sentence; None when everything is."""
    absent = sorted({package for name, package in BINARIES.items() if binary(name) is None})
    if not absent:
        return None
    return f"DNSSEC test servers not installed: apt-get install {' '.join(absent)}"


def _free_port(address: str) -> int:
    """A port free for both UDP and TCP on `address` (closed again: the server binds it)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((address, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((address, port))
                except OSError:
                    continue
                return int(port)
    raise OSError(f"no free port on {address}")


def _zone_text(name: str, records: Zone) -> str:
    lines = [f"$ORIGIN {name}.", "$TTL 300",
             f"@ SOA ns.{name}. hostmaster.{name}. 1 3600 600 86400 60",
             f"@ NS ns.{name}.", f"ns A {AUTH_ADDRESS}"]
    for owner, rrs in records.items():
        lines += [f"{owner} {rtype} {rdata}" for rtype, rdata in rrs]
    return "\n".join(lines) + "\n"


class SignedDns:
    """nsd + unbound, see the module's docstring."""

    def __init__(self, signed: dict[str, Zone], unsigned: dict[str, Zone] | None = None) -> None:
        self.signed = signed
        self.unsigned = unsigned or {}
        self._dir = Path(tempfile.mkdtemp(prefix="dnssec-"))
        self._procs: list[subprocess.Popen[bytes]] = []
        self.auth_port = 0
        self.resolver_address = RESOLVER_ADDRESS
        self.resolver_port = 0

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        anchors = [self._sign(name, records) for name, records in self.signed.items()]
        for name, records in self.unsigned.items():
            (self._dir / f"{name}.zone").write_text(_zone_text(name, records))
        self.auth_port = _free_port(AUTH_ADDRESS)
        self._start_nsd()
        (self._dir / "anchors").write_text("".join(anchors))
        self.resolver_port = _free_port(RESOLVER_ADDRESS)
        self._start_unbound()

    def _sign(self, name: str, records: Zone) -> str:
        """Writes `name`'s zone signed; returns its DNSKEY, the trust anchor."""
        zone = self._dir / f"{name}.zone"
        zone.write_text(_zone_text(name, records))
        key = subprocess.run([binary("ldns-keygen") or "ldns-keygen", "-a", "ECDSAP256SHA256",
                              name], cwd=self._dir, check=True, capture_output=True,
                             text=True).stdout.strip()
        subprocess.run([binary("ldns-signzone") or "ldns-signzone", "-f",
                        str(self._dir / f"{name}.signed"), str(zone), key],
                       cwd=self._dir, check=True, capture_output=True)
        return (self._dir / f"{key}.key").read_text()

    def _start_nsd(self) -> None:
        d = self._dir
        zones = [(n, f"{n}.signed") for n in self.signed] + [(n, f"{n}.zone")
                                                             for n in self.unsigned]
        conf = d / "nsd.conf"
        conf.write_text("\n".join([
            "server:", f"  ip-address: {AUTH_ADDRESS}", f"  port: {self.auth_port}",
            "  server-count: 1", '  username: ""', '  chroot: ""', f'  zonesdir: "{d}"',
            '  database: ""', f'  pidfile: "{d}/nsd.pid"', f'  xfrdfile: "{d}/xfrd.state"',
            f'  zonelistfile: "{d}/zone.list"', f'  xfrdir: "{d}"', f'  logfile: "{d}/nsd.log"',
            "  do-ip6: no", "  verbosity: 1",
            "remote-control:", "  control-enable: no",
            *(f'zone:\n  name: "{n}"\n  zonefile: "{f}"' for n, f in zones)]) + "\n")
        self._spawn([binary("nsd") or "nsd", "-d", "-c", str(conf)], d / "nsd.log")
        first = next(iter({**self.signed, **self.unsigned}))
        until(lambda: self._answers(AUTH_ADDRESS, self.auth_port, first), 20,
              "nsd to answer", lambda: self._log("nsd.log"))

    def _start_unbound(self) -> None:
        d = self._dir
        conf = d / "unbound.conf"
        zones = [*self.signed, *self.unsigned]
        conf.write_text("\n".join([
            "server:", f"  interface: {RESOLVER_ADDRESS}", f"  port: {self.resolver_port}",
            "  do-daemonize: no", '  username: ""', '  chroot: ""', f'  directory: "{d}"',
            f'  pidfile: "{d}/unbound.pid"', f'  logfile: "{d}/unbound.log"',
            "  use-syslog: no", "  verbosity: 1", "  num-threads: 1", "  do-ip6: no",
            "  so-reuseport: no", "  do-not-query-localhost: no",
            "  access-control: 127.0.0.0/8 allow", '  module-config: "validator iterator"',
            f'  trust-anchor-file: "{d}/anchors"', "  val-log-level: 2",
            # RFC 6761 reserves .test: unbound answers it itself unless told not to
            *(f'  local-zone: "{z}." nodefault' for z in ("test", *zones)),
            "remote-control:", "  control-enable: no",
            *(f'stub-zone:\n  name: "{z}"\n  stub-addr: {AUTH_ADDRESS}@{self.auth_port}'
              for z in zones)]) + "\n")
        self._spawn([binary("unbound") or "unbound", "-d", "-c", str(conf)],
                    d / "unbound.log")
        first = next(iter(self.signed or self.unsigned))
        until(lambda: self._answers(RESOLVER_ADDRESS, self.resolver_port, first), 20,
              "unbound to answer", lambda: self._log("unbound.log"))

    def _spawn(self, command: list[str], log: Path) -> None:
        with open(log.with_suffix(".out"), "wb") as out:
            self._procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL))

    def _answers(self, address: str, port: int, name: str) -> bool:
        for proc in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}:"
                                   f" {self._log('nsd.log')}{self._log('unbound.log')}"
                                   f"{self._log('nsd.out')}{self._log('unbound.out')}")
        query = dns.message.make_query(name, "SOA")
        try:
            reply = dns.query.udp(query, address, port=port, timeout=0.5)
        except (OSError, dns.exception.Timeout):
            return False
        return reply.rcode() == dns.rcode.NOERROR

    def authenticated(self, name: str, rdtype: str) -> bool:
        """Whether unbound answers `name` `rdtype` with AD (a check of the set-up)."""
        query = dns.message.make_query(name, rdtype, want_dnssec=True)
        query.flags |= dns.flags.AD
        reply = dns.query.udp(query, RESOLVER_ADDRESS, port=self.resolver_port, timeout=5)
        return bool(reply.flags & dns.flags.AD)

    def _log(self, name: str) -> str:
        path = self._dir / name
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        for proc in reversed(self._procs):
            procs.stop(proc)
        self._procs.clear()
        shutil.rmtree(self._dir, ignore_errors=True)
