"""DKIM keys for tests, their TXT records for tests/support/dnsserver.py, and an independent
verifier: dkimpy's (`dkim.DKIM.verify`), fetching the public keys from a real DNS server over
UDP/TCP with dnspython, never from a dict in the test."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Any

import dkim as dkimpy
import dns.exception
import dns.resolver

from engine import dkim


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    path: str
    record: str  # the TXT record's text

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def config(self, **dates: str) -> dict[str, Any]:
        return {"selector": self.selector, "key_file": self.path, **dates}


def make_key(folder: str, domain: str, selector: str, algorithm: str = "rsa",
             bits: int = 2048) -> DkimKey:
    """A new key written as `mailengine dkim keygen` writes it (mode 0600)."""
    key = dkim.generate(algorithm, bits)
    path = os.path.join(folder, f"{domain}.{selector}.pem")
    dkim.write_key(key, path)
    return DkimKey(domain, selector, path, dkim.dns_record(key))


def openssl_key(folder: str, domain: str, selector: str) -> DkimKey:
    """An RSA key made by openssl (PKCS#1 PEM, as operators' existing keys often are)."""
    path = os.path.join(folder, f"{domain}.{selector}.pem")
    subprocess.run(["openssl", "genrsa", "-traditional", "-out", path, "2048"],
                   check=True, capture_output=True)
    os.chmod(path, 0o600)
    return DkimKey(domain, selector, path, dkim.dns_record(dkim.load_private_key(path)))


def zone(*keys: DkimKey) -> dict[str, Any]:
    """The TXT records of `keys` for a DnsServer zone (in strings of 255 octets or less)."""
    return {k.name: {"TXT": " ".join(f'"{k.record[i:i + 255]}"'
                                     for i in range(0, len(k.record), 255))} for k in keys}


class Verifier:
    """dkimpy's verifier, its keys looked up at a DNS server on loopback."""

    def __init__(self, dns_port: int) -> None:
        self.resolver = dns.resolver.Resolver(configure=False)
        self.resolver.nameservers = ["127.0.0.1"]
        self.resolver.port = dns_port
        self.resolver.lifetime = 5.0
        self.lookups: list[str] = []

    def txt(self, name: bytes, timeout: int = 5) -> bytes | None:
        qname = name.decode("ascii").rstrip(".")
        self.lookups.append(qname)
        try:
            answer = self.resolver.resolve(qname, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.exception.Timeout):
            return None
        return b"".join(b"".join(rdata.strings) for rdata in answer)

    def signatures(self, message: bytes) -> list[tuple[str, str, str, bool]]:
        """(d, s, a, verified) of every DKIM-Signature of `message`, top first."""
        checker = dkimpy.DKIM(message)
        found = []
        count = sum(1 for name, _ in checker.headers if name.lower() == b"dkim-signature")
        for idx in range(count):
            try:
                ok = bool(checker.verify(idx=idx, dnsfunc=self.txt))
            except dkimpy.ValidationError:  # a body hash that does not match: raised
                ok = False
            tags = checker.signature_fields
            found.append((tags[b"d"].decode(), tags[b"s"].decode(), tags[b"a"].decode(), ok))
        return found


def unsigned(message: bytes) -> bytes:
    """`message` without its DKIM-Signature fields (they are on top)."""
    while message.lower().startswith(b"dkim-signature:"):
        end = message.find(b"\r\n")
        while message[end + 2:end + 3] in (b" ", b"\t"):
            end = message.find(b"\r\n", end + 2)
        message = message[end + 2:]
    return message
