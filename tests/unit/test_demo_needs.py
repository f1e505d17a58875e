"""What `mailengine demo` says when what it needs is missing: the command that installs it for
the Python it runs on. Debian's python3 refuses pip (PEP 668): the Debian package there."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engine import demo
from tests.support import ROOT


def test_a_python_the_distribution_manages_gets_the_debian_package(tmp_path: Path) -> None:
    (tmp_path / "EXTERNALLY-MANAGED").touch()
    command = demo.install_aiosmtpd(prefix="/usr", base_prefix="/usr", stdlib=str(tmp_path))
    assert command == "sudo apt install python3-aiosmtpd python3-trustme"


def test_a_virtual_environment_gets_pip(tmp_path: Path) -> None:
    """A venv of Debian's python3 (make demo's .venv): pip installs into it."""
    (tmp_path / "EXTERNALLY-MANAGED").touch()
    assert demo.install_aiosmtpd(prefix="/src/.venv", base_prefix="/usr",
                                 stdlib=str(tmp_path)) == "pip install aiosmtpd trustme"


def test_a_python_of_ones_own_gets_pip(tmp_path: Path) -> None:
    assert demo.install_aiosmtpd(prefix="/opt/py", base_prefix="/opt/py",
                                 stdlib=str(tmp_path)) == "pip install aiosmtpd trustme"


def test_without_aiosmtpd_the_demo_stops_with_one_line_naming_the_command() -> None:
    """This interpreter, with aiosmtpd made unimportable: exit status 2, one line."""
    probe = ("import sys; sys.modules['aiosmtpd'] = None; from engine import demo;"
             " sys.exit(demo.main(1))")
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=8)
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    (line,) = run.stderr.splitlines()
    assert line.startswith("mailengine demo needs aiosmtpd and trustme for its local SMTP server")
    assert line.endswith(f"install them with: {demo.install_aiosmtpd()}")
