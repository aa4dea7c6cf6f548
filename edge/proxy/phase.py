"""The phases of a request and the transition table between them (as h11 has).

``Request.to`` moves along ``NEXT`` only: a move the table does not allow
raises ``IllegalTransition``, so a late callback (a backend answering after
a timeout, a challenge lookup after the client left) cannot answer a request
twice or revive a finished one. Phases are bits so that each row is a mask.
"""

from __future__ import annotations

from enum import IntEnum


class Phase(IntEnum):
    """Bits, so that ``NEXT`` is a mask per phase."""

    HEAD = 1  # the request head is being read (HTTP/1.1), or waits its turn behind another
    ROUTING = 2  # the head is complete: being routed, or an answer looked up (ACME challenge)
    CONNECTING = 4  # waiting for a backend connection
    SENT = 8  # the request head is with the backend; no response head yet
    RESPONDING = 16  # the response head went to the client
    TUNNEL = 32  # after a 101: bytes both ways (HTTP/1.1 upgrades)
    DONE = 64  # the response is complete
    ABORTED = 128  # cut short: the client left or reset, or the response could not be finished


_HEAD, _ROUTING, _CONNECTING, _SENT = Phase.HEAD, Phase.ROUTING, Phase.CONNECTING, Phase.SENT
_RESPONDING, _TUNNEL, _DONE, _ABORTED = Phase.RESPONDING, Phase.TUNNEL, Phase.DONE, Phase.ABORTED

# The transition table: from each phase, the phases it may move to.
NEXT: dict[Phase, int] = {
    _HEAD: _ROUTING | _ABORTED,
    _ROUTING: _CONNECTING | _SENT | _RESPONDING | _ABORTED,
    _CONNECTING: _SENT | _RESPONDING | _ABORTED,
    _SENT: _CONNECTING | _RESPONDING | _TUNNEL | _ABORTED,  # CONNECTING: a retry on a fresh connection
    _RESPONDING: _DONE | _ABORTED,
    _TUNNEL: _DONE | _ABORTED,
    _DONE: 0,
    _ABORTED: 0,
}


class IllegalTransition(RuntimeError):
    def __init__(self, old: Phase, new: Phase) -> None:
        super().__init__(f"request phase {old.name} cannot move to {new.name}")
