"""Throwaway TLS certificates for the test servers and the demo, made in memory by trustme.

Two kinds, both for the names ``localhost`` and ``127.0.0.1`` (:func:`server_names`):

* :func:`make_cert` -- a certificate from a throwaway CA that nobody trusts. Enough for
  opportunistic TLS, where the client does not verify; a verifying client refuses it.
* :func:`make_ca_and_cert` -- a private CA's certificate (``cafile``) plus a leaf it signed,
  for the engine's ``verify`` mode: trust ``cafile`` and the leaf verifies (also under
  ``VERIFY_X509_STRICT``); trust nothing and it fails.

The engine and the test servers read certificates from files (``smtp.ca_file``,
``load_cert_chain``), so both functions write PEM files into a folder and return their
paths. Files are cached per folder: a second call with the same folder returns the same
files. They are written under temporary names and renamed into place, so a concurrent
caller sharing the folder never reads a half-written file.

:func:`server_tls_context` makes a server's TLS context from such files, or by default
from a certificate kept in memory (made once per process).
"""

from __future__ import annotations

import functools
import os
import ssl
import threading
from pathlib import Path
from typing import NamedTuple

import trustme

__all__ = ["CABundle", "make_ca_and_cert", "make_cert", "server_names", "server_tls_context"]

_lock = threading.Lock()  # one maker per folder at a time in this process


class CABundle(NamedTuple):
    """Files of a private CA and of a server certificate it signed."""

    cafile: str
    certfile: str
    keyfile: str


def server_names() -> tuple[str, str]:
    """The names every test certificate is valid for: (DNS name, IP address)."""
    return ("localhost", "127.0.0.1")


def make_cert(directory: str | os.PathLike[str]) -> tuple[str, str]:
    """Return ``(certfile, keyfile)``: a localhost certificate that nobody trusts."""
    bundle = make_ca_and_cert(directory, prefix="untrusted-")
    return bundle.certfile, bundle.keyfile


def make_ca_and_cert(directory: str | os.PathLike[str], prefix: str = "") -> CABundle:
    """Return a private CA and a localhost certificate signed by it, made in ``directory``
    (file names start with ``prefix``). The CA's key is never written."""
    folder = Path(directory)
    bundle = CABundle(*(str(folder / f"{prefix}{name}") for name in ("ca.pem", "leaf.pem",
                                                                      "leaf.key")))
    with _lock:
        if not all(Path(path).exists() for path in bundle):
            folder.mkdir(parents=True, exist_ok=True)
            ca = trustme.CA()
            leaf = _issue(ca)
            _write_in_place({bundle.cafile: ca.cert_pem.bytes(),
                             bundle.certfile: b"".join(p.bytes() for p in leaf.cert_chain_pems),
                             bundle.keyfile: leaf.private_key_pem.bytes()})
    return bundle


def server_tls_context(certfile: str | None = None, keyfile: str | None = None) -> ssl.SSLContext:
    """A server-side TLS context; by default with an untrusted localhost certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if certfile is None:
        _default_leaf().configure_cert(context)
    else:
        context.load_cert_chain(certfile, keyfile)
    return context


@functools.cache
def _default_leaf() -> trustme.LeafCert:
    return _issue(trustme.CA())


def _issue(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert(*server_names(), common_name=server_names()[0])


def _write_in_place(files: dict[str, bytes]) -> None:
    """Write each file under a temporary name next to it, then rename all into place."""
    tag = f".tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        for path, data in files.items():
            Path(path + tag).write_bytes(data)
        for path in files:
            os.replace(path + tag, path)
    finally:
        for path in files:
            Path(path + tag).unlink(missing_ok=True)
