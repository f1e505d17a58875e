"""engine/testing/tlscert.py without a socket: a self-signed certificate is made once per
folder. A handshake with a CA-signed one: tests/conversation/test_support_servers.py."""
from __future__ import annotations

from pathlib import Path

from engine.testing.tlscert import make_cert


def test_self_signed_cert_is_cached_per_directory(tmp_path: Path) -> None:
    first = make_cert(tmp_path)
    mtime = Path(first[0]).stat().st_mtime_ns
    assert make_cert(tmp_path) == first
    assert Path(first[0]).stat().st_mtime_ns == mtime
