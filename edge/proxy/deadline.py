"""One timer per HTTP/1.1 connection; its meaning follows the connection's state.

A keep-alive connection moves its deadline on every request (head, response,
idle). The scheduled handle is kept while the deadline only moves later, and
re-arms itself when it fires early, so a busy connection creates no timer
per request; it is never later than the deadline, so no deadline is missed.
"""

from __future__ import annotations

import asyncio

from edge.proxy.downstream import ClientConnection


class DeadlineConnection(ClientConnection):
    """A client connection with one deadline: ``_arm``, ``_cancel_timer``; ``_expired``
    is the subclass's, called once the deadline has passed. A base class rather than a
    mixin: mypyc compiles single inheritance from a native class, not mixins."""

    _loop: asyncio.AbstractEventLoop
    _timer: asyncio.TimerHandle | None
    _timer_at: float  # when the scheduled handle fires
    _timer_deadline: float  # 0.0: none

    def _arm(self, delay: float) -> None:
        """Move the deadline ``delay`` seconds ahead; a new handle only when it
        moves earlier than the one scheduled."""
        loop = self._loop
        deadline = self._timer_deadline = loop.time() + delay
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()  # an earlier deadline than the one scheduled
            self._timer = loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _cancel_timer(self) -> None:
        self._timer_deadline = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._timer_deadline
        if not deadline:
            return
        loop = self._loop
        if loop.time() < deadline:
            # Pushed back since it was scheduled (activity): sleep until the new deadline.
            self._timer = loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
            return
        self._timer_deadline = 0.0
        self._expired()

    def _expired(self) -> None:
        raise NotImplementedError
