"""engine.downgrade in the whole engine: intake flags a job 8-bit, the worker converts it for
a server without 8BITMIME, or bounces it 5.6.3 when it cannot be converted.
"""
from __future__ import annotations

from collections.abc import Callable

import pytest

from engine.testing.harness import LocalEngine, final_outcomes
from tests.support.mime import CONVERTED, MESSAGE_8BIT
from tests.support.playbook import Scripted, rcpt
from tests.support.smtpserver import BDAT, WAIT_CLOSE, C, S


@pytest.mark.timeout(120)
def test_whole_engine_converts_for_a_server_without_8bitmime_or_bounces_5_6_3(
        scripted: Scripted, local_engine: Callable[..., LocalEngine]) -> None:
    """Intake flags the job 8-bit, the worker converts it for a server without 8BITMIME:
    the server gets the 7-bit message (SIZE and BDAT of the converted bytes); a job that
    cannot be converted bounces 5.6.3 without a MAIL command."""
    sender, to = "sender@example.test", "rcpt@example.test"
    server = scripted([S("220 mx.test ESMTP"), C("EHLO *"),
                       S("250-mx.test", "250-PIPELINING", "250-CHUNKING", "250 SIZE 10485760"),
                       C(f"MAIL FROM:<{sender}> SIZE={len(CONVERTED)}"), rcpt(to),
                       BDAT(last=True), S("250 ok", "250 ok", "250 queued"), WAIT_CLOSE()],
                      extra="repeat_last", timeout=30)
    engine = local_engine(server.port)
    refused = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nhello\r\n"
    assert engine.push([({"id": "refused", "from": sender, "to": [to]}, refused)])
    engine.wait_final(1)
    assert engine.push([({"id": "converted", "from": sender, "to": [to]}, MESSAGE_8BIT)])
    finals = final_outcomes(engine.wait_final(2))
    bounce = finals[("refused", to)]
    assert (bounce["event"], bounce["code"], bounce["enhanced"]) == ("bounced", 554, "5.6.3")
    assert "8BITMIME" in bounce["reply"]
    assert finals[("converted", to)]["event"] == "delivered"
    assert server.messages == [CONVERTED]
    assert server.errors == []
    mails = [line for i in range(server.connections) for line in server.client_lines(i)
             if line.upper().startswith("MAIL")]
    assert len(mails) == 1  # the converted message's; none for the refused one
