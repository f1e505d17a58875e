"""The whole engine (`mailengine run`) with its control socket on tcp and CURVE
(`control.curve`): `mailengine queue` and `mailengine status` from an operator whose key
is listed change and show the queue over tcp; a key the engine does not list gets nothing,
the command says it was refused, and the engine logs the refusal at warning with the
client's address (once a minute per client). In process with real sockets:
tests/conversation/test_control_curve.py."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from engine import auth
from engine.testing.harness import final_outcomes, make_message
from engine.testing.sink import SinkServer
from tests.support.cli import mailengine
from tests.support.control import CurveEngine, free_tcp_endpoint

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    if not zmq.has("curve"):
        pytest.skip("this libzmq has no CURVE (zmq.has('curve') is False)")
    base = tmp_path / "keys"
    (base / "operators").mkdir(parents=True)
    auth.keygen("control", str(base))
    auth.keygen("operator", str(base / "private"))
    auth.keygen("stranger", str(base / "private"))
    shutil.copy(base / "private" / "operator.key", base / "operators")
    return {"secret": str(base / "control.key_secret"), "public": str(base / "control.key"),
            "operators": str(base / "operators"),
            "operator": str(base / "private" / "operator.key_secret"),
            "stranger": str(base / "private" / "stranger.key_secret")}


@pytest.fixture
def engine(keys: dict[str, str], tmp_path: Path) -> Iterator[CurveEngine]:
    """An engine whose control socket is tcp with CURVE; the sink defers `defer...`
    recipients and the first retry is 10 minutes away, so they wait for the operator."""
    with SinkServer(rcpt_rules={"defer": "452 4.2.2 mailbox full"}) as sink:
        running = CurveEngine(str(tmp_path / "engine"), sink.port, extra={
            "retry": {"schedule": [600]},
            "control": {"endpoint": free_tcp_endpoint(), "curve": {
                "enabled": True, "server_secret_key": keys["secret"],
                "allowed_clients": keys["operators"], "client_key": keys["operator"]}}})
        running.client = auth.CurveClient.from_files(keys["public"], keys["operator"])
        running.start()
        try:
            yield running
        finally:
            running.stop(timeout=20)
            running.cleanup()


def test_an_operator_changes_the_queue_over_tcp_and_a_stranger_gets_nothing(
        engine: CurveEngine, keys: dict[str, str]) -> None:
    endpoint = str(engine.config["control"]["endpoint"])
    engine.push([({"id": "j1", "from": "s@example.test", "to": ["defer@one.test"]},
                  make_message(1, 500))])
    engine.wait_for(lambda evs: any(e["event"] == "deferred" for e in evs), 30, "the deferral")

    # The config's client_key: `queue -c` needs no key option.
    shown = mailengine("queue", "-c", engine.config_path, "--json")
    assert shown.returncode == 0, shown.stderr
    assert [row["domain"] for row in json.loads(shown.stdout)["rows"]] == ["one.test"]

    # The options alone, as from another machine: a queue-changing command runs over tcp.
    bounced = mailengine("queue", "bounce", "j1", "--yes", "--control", endpoint,
                         "--curve-server-key", keys["public"], "--curve-client-key",
                         keys["operator"])
    assert bounced.returncode == 0, bounced.stderr
    final = engine.wait_for(lambda evs: ("j1", "defer@one.test") in final_outcomes(evs), 30,
                            "the bounce")
    assert final_outcomes(final)[("j1", "defer@one.test")]["event"] == "bounced"
    figures = mailengine("status", "--json", "--control", endpoint, "--curve-server-key",
                         keys["public"], "--curve-client-key", keys["operator"])
    assert figures.returncode == 0 and json.loads(figures.stdout)["pid"] == engine.proc.pid

    for command in (["status"], ["queue", "retry", "--domain", "one.test"]):
        refused = mailengine(*command, "--control", endpoint, "--curve-server-key",
                             keys["public"], "--curve-client-key", keys["stranger"],
                             "--timeout", "60")
        assert refused.returncode == 1 and "refused this client's CURVE key" in refused.stderr
        assert refused.stdout == ""
    plain = mailengine("status", "--control", endpoint, "--timeout", "60")
    assert plain.returncode == 1 and "speaks CURVE (control.curve) and this client does not" \
        in plain.stderr
    stranger = auth.load_public(keys["stranger"].removesuffix("_secret")).decode()
    lines = [line for line in engine.log_tail(200).splitlines()
             if "event=curve_refused" in line]
    # One line for the stranger's two tries (a refused client is logged once a minute);
    # none for the plain client, whose greeting fails before any key is shown (libzmq
    # tells no address then).
    [line] = lines
    assert " WARNING " in line and "socket=control address=127.0.0.1" in line
    assert stranger in line
