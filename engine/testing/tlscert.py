"""Throwaway TLS certificates for the test servers, made with the ``openssl`` CLI.

Two kinds:

* :func:`make_cert` -- a self-signed certificate for ``localhost`` (SAN ``DNS:localhost``,
  ``IP:127.0.0.1``). Enough for opportunistic TLS, where the client does not verify.
* :func:`make_ca_and_cert` -- a private CA plus a leaf for the same names signed by it, for the
  engine's ``verify`` mode: trust ``cafile`` and the leaf verifies; trust nothing and it fails.

:func:`server_tls_context` makes a server's TLS context from such a certificate (by default a
self-signed one, made once per process).

Both keys are P-256 and valid for two days. Files are cached per directory: a second call with
the same directory returns the same files without running ``openssl``. Files are written under
temporary names and renamed into place, so concurrent callers (threads or processes) sharing a
directory never see a half-written certificate.
"""

from __future__ import annotations

import atexit
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

__all__ = ["CABundle", "make_ca_and_cert", "make_cert", "server_names", "server_tls_context"]

_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
_DAYS = "2"
_SAN = "subjectAltName=DNS:localhost,IP:127.0.0.1"
_LEAF_EXTENSIONS = f"""\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
{_SAN}
"""
_lock = threading.Lock()
_cert_dir: str | None = None  # the default certificate's, made once per process
_cert_dir_lock = threading.Lock()


class CABundle(NamedTuple):
    """Files of a private CA and of a server certificate it signed."""

    cafile: str
    certfile: str
    keyfile: str


def server_names() -> tuple[str, str]:
    """The names every test certificate is valid for: (DNS name, IP address)."""
    return ("localhost", "127.0.0.1")


def make_cert(directory: str | os.PathLike[str]) -> tuple[str, str]:
    """Return ``(certfile, keyfile)``: a self-signed localhost certificate in ``directory``."""
    folder = Path(directory)
    cert, key = folder / "selfsigned.pem", folder / "selfsigned.key"
    with _lock:
        if not (cert.exists() and key.exists()):
            folder.mkdir(parents=True, exist_ok=True)
            _in_place([cert, key], lambda tmp: _self_signed(tmp[0], tmp[1]))
    return str(cert), str(key)


def server_tls_context(certfile: str | None = None, keyfile: str | None = None) -> ssl.SSLContext:
    """A server-side TLS context; by default with a self-signed localhost certificate.

    The default certificate is made once per process in a temporary directory removed at exit.
    """
    if certfile is None:
        certfile, keyfile = make_cert(_default_cert_dir())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    return context


def _default_cert_dir() -> str:
    global _cert_dir
    with _cert_dir_lock:
        if _cert_dir is None:
            _cert_dir = tempfile.mkdtemp(prefix="mailengine-test-certs-")
            atexit.register(shutil.rmtree, _cert_dir, ignore_errors=True)
        return _cert_dir


def make_ca_and_cert(directory: str | os.PathLike[str]) -> CABundle:
    """Return a private CA and a localhost certificate signed by it, made in ``directory``."""
    folder = Path(directory)
    bundle = CABundle(*(str(folder / name) for name in ("ca.pem", "leaf.pem", "leaf.key")))
    with _lock:
        if not all(Path(path).exists() for path in bundle):
            folder.mkdir(parents=True, exist_ok=True)
            targets = [Path(path) for path in bundle]
            _in_place(targets, lambda tmp: _ca_signed(tmp[0], tmp[1], tmp[2]))
    return bundle


def _self_signed(cert: Path, key: Path) -> None:
    _openssl(
        "req", "-x509", *_EC_KEY, "-days", _DAYS, "-subj", "/CN=localhost",
        "-addext", _SAN, "-keyout", key, "-out", cert,
    )


def _ca_signed(cafile: Path, cert: Path, key: Path) -> None:
    """Make a CA in a scratch directory, then a leaf signed by it; keep the CA key private."""
    with tempfile.TemporaryDirectory(dir=cafile.parent) as scratch:
        ca_key, csr, ext = (Path(scratch) / name for name in ("ca.key", "leaf.csr", "leaf.ext"))
        _openssl(
            "req", "-x509", *_EC_KEY, "-days", _DAYS, "-subj", "/CN=mailengine test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", ca_key, "-out", cafile,
        )
        _openssl("req", "-new", *_EC_KEY, "-subj", "/CN=localhost", "-keyout", key, "-out", csr)
        ext.write_text(_LEAF_EXTENSIONS)
        _openssl(
            "x509", "-req", "-in", csr, "-CA", cafile, "-CAkey", ca_key, "-set_serial", "2",
            "-days", _DAYS, "-extfile", ext, "-out", cert,
        )


def _in_place(targets: list[Path], make: Callable[[list[Path]], None]) -> None:
    """Run ``make`` on temporary names next to ``targets``, then rename all into place."""
    tag = f".tmp-{os.getpid()}-{threading.get_ident()}"
    temporary = [path.with_name(path.name + tag) for path in targets]
    try:
        make(temporary)
        for tmp, final in zip(temporary, targets, strict=True):
            os.replace(tmp, final)
    finally:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)


def _openssl(*args: str | Path) -> None:
    command = ["openssl", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
