"""What a recording sink got, counted by message: the crash tests' measure of lost mail and
of duplicates (a Message-ID the sink got twice)."""
from __future__ import annotations

import collections
import re

from engine.testing.sink import SinkServer

MESSAGE_ID = re.compile(rb"^Message-ID: <([^>@]+)@", re.MULTILINE)


def received(sink: SinkServer) -> collections.Counter[str]:
    """Message-ID -> how many times the sink got it."""
    ids: collections.Counter[str] = collections.Counter()
    for m in sink.messages:
        found = MESSAGE_ID.search(m.content)
        assert found is not None
        ids[found[1].decode()] += 1
    return ids
