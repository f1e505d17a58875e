"""tests/support/smtpserver.py's playbook steps without a socket: patterns, the checks of a
script, steps from JSON. The servers themselves on loopback:
tests/conversation/test_support_servers.py."""
from __future__ import annotations

import pytest

from tests.support.smtpserver import CLOSE, C, S, ScriptedServer, steps_from_json

GREETING = S("220 mx.test ESMTP")


def test_scripted_patterns_are_literal_apart_from_star_and_question_mark() -> None:
    assert C("EHLO [127.0.0.1]").matches("ehlo [127.0.0.1]")
    assert not C("EHLO [127.0.0.1]").matches("EHLO 1")
    assert C("RCPT TO:<?@y.test>*").matches("rcpt to:<b@Y.TEST> NOTIFY=NEVER")
    assert not C("RCPT TO:<b@y.test>", case=True).matches("rcpt TO:<b@y.test>")


def test_scripted_rejects_steps_after_close() -> None:
    with pytest.raises(ValueError, match="must be the last step"):
        ScriptedServer([GREETING, CLOSE(), S("250 too late")])


def test_steps_from_json() -> None:
    steps = steps_from_json([["S", "220 a", "220 b"], ["C", "EHLO *"], ["TLS"], ["BDAT", True]])
    assert repr(steps) == "[S('220 a', '220 b'), C('EHLO *'), TLS(), BDAT(last=True)]"
    with pytest.raises(ValueError, match="unknown playbook step 'SAY'"):
        steps_from_json([["SAY", "hi"]])
