"""engine/testing/tlscert.py without a socket: certificates are made once per folder, and
their files load as a server loads them. A handshake with a CA-signed one:
tests/conversation/test_support_servers.py."""
from __future__ import annotations

import ssl
from pathlib import Path

from engine.testing.tlscert import make_ca_and_cert, make_cert, server_tls_context


def test_cert_is_cached_per_directory(tmp_path: Path) -> None:
    first = make_cert(tmp_path)
    mtime = Path(first[0]).stat().st_mtime_ns
    assert make_cert(tmp_path) == first
    assert Path(first[0]).stat().st_mtime_ns == mtime


def test_the_untrusted_cert_and_the_ca_bundle_are_apart_in_one_folder(tmp_path: Path) -> None:
    certfile, keyfile = make_cert(tmp_path)
    bundle = make_ca_and_cert(tmp_path)
    assert not {certfile, keyfile} & set(bundle)
    assert Path(certfile).read_bytes() != Path(bundle.certfile).read_bytes()
    keys = [p.name for p in tmp_path.iterdir() if b"PRIVATE KEY" in p.read_bytes()]
    assert sorted(keys) == sorted(Path(p).name for p in (keyfile, bundle.keyfile))  # no CA key


def test_each_cert_loads_with_its_key(tmp_path: Path) -> None:
    bundle = make_ca_and_cert(tmp_path)
    for certfile, keyfile in (make_cert(tmp_path), bundle[1:]):
        server_tls_context(certfile, keyfile)  # ssl.SSLError if the key does not match
    ssl.create_default_context(cafile=bundle.cafile)  # the CA loads as smtp.ca_file does
