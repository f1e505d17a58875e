"""A small authoritative DNS server for tests: real UDP and TCP on loopback, no mocks.

The zone is a dict from name to either its records or a way to fail:

    DnsServer({
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.10"], "AAAA": ["::1"]},
        "short.test": {"MX": [(10, "mx1.example.test")], "ttl": 5},  # TTL for this name
        "rrttl.test": {"A": {"ttl": 5, "records": ["127.0.0.1"]}},   # TTL for one type
        "alias.test": {"CNAME": "example.test"},                      # followed in-zone
        "nullmx.test": {"MX": [(0, ".")]},
        "broken.test": "SERVFAIL",   # any rcode name: REFUSED, SERVFAIL...
        "silent.test": "TIMEOUT",    # never answers
    }, ttl=300, negative_ttl=300)

Records are rdata in zone-file text, or a list/tuple of its fields (MX as
(preference, host)); host names need no trailing dot. A name missing from the
zone gets NXDOMAIN, a name without the asked type an empty NOERROR answer, both
with an SOA in the authority section whose TTL and MINIMUM are `negative_ttl`
(None: no SOA). A UDP answer too big for the query is truncated, so clients
retry over TCP.

`server.port` is the port, the same for UDP and TCP; `server.queries` lists
(qname, rdtype) as received, e.g. ("example.test", "MX"), so tests can tell a
cached answer from a fresh one.

`delay` (seconds) holds every answer that long, as a resolver's recursion would; each
UDP query is then answered from a thread of its own, and `server.peak_in_flight` is the
most queries received and not yet answered at once (how many a client had out together).

As a process: `python -m tests.support.dnsserver ZONE.json` takes the same dict as JSON
(MX as [preference, host]), prints the port as stdout's first line and serves
until killed.
"""
from __future__ import annotations

import argparse
import json
import signal
import socket
import socketserver
import struct
import sys
import threading
from collections.abc import Iterable, Mapping
from types import FrameType, TracebackType
from typing import Any, Self

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

SILENT = "TIMEOUT"
_HOST_FIELD_TYPES = {dns.rdatatype.MX, dns.rdatatype.CNAME, dns.rdatatype.NS,
                     dns.rdatatype.PTR, dns.rdatatype.SRV}
_MAX_CHAIN = 8
_MAX_UDP = 512  # without EDNS


def domains_with_own_mx(count: int, address: str) -> dict[str, Any]:
    """A zone of `count` domains d<i>.test, each with its own MX host mx.d<i>.test at
    `address`: as many providers (each MX rolls up to its own registrable domain)."""
    zone: dict[str, Any] = {}
    for i in range(count):
        zone[f"d{i}.test"] = {"MX": [(10, f"mx.d{i}.test")]}
        zone[f"mx.d{i}.test"] = {"A": [address]}
    return zone


class DnsServer:
    """Serves `zone` on `host`, UDP and TCP, from background threads."""

    def __init__(self, zone: Mapping[str, Any], ttl: int = 300, negative_ttl: int | None = 300,
                 host: str = "127.0.0.1", port: int = 0, delay: float = 0.0) -> None:
        self.host = host
        self.port = port  # 0: an ephemeral port, known once started
        self.delay = delay
        self.queries: list[tuple[str, str]] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._count_lock = threading.Lock()
        self._rcodes: dict[str, str] = {}
        self._rrsets: dict[str, dict[int, dns.rrset.RRset]] = {}
        self._soa = None if negative_ttl is None else _soa(negative_ttl)
        self._stopped = threading.Event()
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        for name, entry in zone.items():
            self._load(_key(name), entry, ttl)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        udp, tcp = self._bind()
        self._servers = [udp, tcp]
        self.port = udp.socket.getsockname()[1]
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                                      name=f"dnsserver-{self.port}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopped.set()  # releases TCP connections held open for silent names
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()
        self._servers, self._threads = [], []

    def respond(self, wire: bytes, tcp: bool) -> bytes | None:
        """The answer to one query, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not DNS: drop it, as a real server might
        if len(query.question) != 1:
            return _rcode_only(query, dns.rcode.FORMERR)
        question = query.question[0]
        name = _key(question.name.to_text())
        self.queries.append((name, dns.rdatatype.to_text(question.rdtype)))
        if self.delay > 0:
            with self._count_lock:
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                self._stopped.wait(self.delay)
                return self._respond(query, name, question.rdtype, tcp)
            finally:
                with self._count_lock:
                    self.in_flight -= 1
        return self._respond(query, name, question.rdtype, tcp)

    def _respond(self, query: dns.message.Message, name: str, rdtype: int,
                 tcp: bool) -> bytes | None:
        rcode = self._rcodes.get(name)
        if rcode == SILENT:
            return None
        if rcode is not None:
            return _rcode_only(query, dns.rcode.from_text(rcode))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        self._answer(response, name, rdtype)
        return _to_wire(response, query, tcp)

    def set(self, name: str, entry: Any, ttl: int = 300) -> None:
        """Replace `name`'s records (or way to fail) while serving: a zone change."""
        key = _key(name)
        self._rcodes.pop(key, None)
        self._rrsets.pop(key, None)
        self._load(key, entry, ttl)

    def wait_stopped(self) -> None:
        """Block until stop(): how a TCP handler stays silent without hanging up."""
        self._stopped.wait()

    def _answer(self, response: dns.message.Message, name: str, rdtype: int) -> None:
        for _ in range(_MAX_CHAIN):  # follow CNAMEs inside the zone
            rrsets = self._rrsets.get(name)
            if rrsets is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                break
            if rdtype in rrsets:
                response.answer.append(rrsets[rdtype])
                return
            cname = rrsets.get(dns.rdatatype.CNAME)
            if cname is None:
                break
            response.answer.append(cname)
            name = _key(cname[0].target.to_text())
        if self._soa is not None:
            response.authority.append(self._soa)

    def _load(self, name: str, entry: Any, ttl: int) -> None:
        if isinstance(entry, str):
            if entry.upper() != SILENT:
                dns.rcode.from_text(entry.upper())  # refuse a typo now, not mid-test
            self._rcodes[name] = entry.upper()
            return
        ttl = entry.get("ttl", ttl)
        self._rrsets[name] = {}
        for type_name, records in entry.items():
            if type_name != "ttl":
                rrset = _rrset(name, type_name, records, ttl)
                self._rrsets[name][rrset.rdtype] = rrset

    def _bind(self) -> tuple[_UdpServer, _TcpServer]:
        """UDP and TCP servers on one port, retrying if the ephemeral UDP port is taken for TCP."""
        for _ in range(20):
            udp = _UdpServer((self.host, self.port), self)
            try:
                return udp, _TcpServer((self.host, udp.socket.getsockname()[1]), self)
            except OSError:
                udp.server_close()
                if self.port:
                    raise
        raise OSError("no port free for both UDP and TCP")


class _UdpHandler(socketserver.BaseRequestHandler):
    server: _UdpServer

    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.owner.respond(data, tcp=False)
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TcpHandler(socketserver.StreamRequestHandler):
    server: _TcpServer

    def handle(self) -> None:
        while True:  # one connection may carry several queries
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            data = self.rfile.read(struct.unpack("!H", head)[0])
            reply = self.server.owner.respond(data, tcp=True)
            if reply is None:
                self.server.owner.wait_stopped()
                return
            self.wfile.write(struct.pack("!H", len(reply)) + reply)


class _UdpServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], owner: DnsServer) -> None:
        self.owner = owner
        self.address_family = _family(address[0])
        super().__init__(address, _UdpHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # A thread per query only when answers are held (`delay`); else answered in turn.
        if self.owner.delay > 0:
            super().process_request(request, client_address)
        else:
            socketserver.UDPServer.process_request(self, request, client_address)


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: DnsServer) -> None:
        self.owner = owner
        self.address_family = _family(address[0])
        super().__init__(address, _TcpHandler)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _key(name: str) -> str:
    """Names as the zone and `queries` spell them: lowercase ASCII, no trailing dot."""
    return name.rstrip(".").encode("idna").decode("ascii").lower()


def _rrset(name: str, type_name: str, records: Any, ttl: int) -> dns.rrset.RRset:
    if isinstance(records, Mapping):
        ttl, records = records.get("ttl", ttl), records["records"]
    if isinstance(records, str):
        records = [records]
    rdtype = dns.rdatatype.from_text(type_name.upper())
    texts = [_rdata_text(rdtype, record) for record in records]
    return dns.rrset.from_text(name + ".", ttl, "IN", rdtype, *texts)


def _rdata_text(rdtype: int, record: Any) -> str:
    fields = [str(f) for f in record] if isinstance(record, list | tuple) else [str(record)]
    if rdtype in _HOST_FIELD_TYPES and not fields[-1].endswith("."):
        fields[-1] += "."  # absolute, so "." (null MX) stays the root
    return " ".join(fields)


def _soa(negative_ttl: int) -> dns.rrset.RRset:
    # Owned by the root, a superdomain of every name, as resolvers look for.
    return dns.rrset.from_text(".", negative_ttl, "IN", "SOA",
                               f"ns.test. hostmaster.test. 1 3600 600 86400 {negative_ttl}")


def _rcode_only(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response.to_wire()


def _to_wire(response: dns.message.Message, query: dns.message.Message, tcp: bool) -> bytes:
    """The response in wire form; over UDP, an empty truncated one if it does not fit."""
    udp_limit = max(query.payload, _MAX_UDP) if query.edns >= 0 else _MAX_UDP
    try:
        return response.to_wire(max_size=65535 if tcp else udp_limit)
    except dns.exception.TooBig:
        truncated = dns.message.make_response(query)
        truncated.flags |= dns.flags.AA | dns.flags.TC
        return truncated.to_wire()


def _serve_until_killed(server: DnsServer) -> None:
    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(server.port, flush=True)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.dnsserver",
                                     description="Serve a test DNS zone on loopback.")
    parser.add_argument("zone", help="JSON file: {name: {TYPE: [records]} | RCODE | \"TIMEOUT\"}")
    parser.add_argument("--ttl", type=int, default=300)
    parser.add_argument("--negative-ttl", type=int, default=300)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="default: an ephemeral port")
    args = parser.parse_args(None if argv is None else list(argv))
    with open(args.zone, encoding="utf-8") as f:
        zone = json.load(f)
    with DnsServer(zone, args.ttl, args.negative_ttl, args.host, args.port) as server:
        _serve_until_killed(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
