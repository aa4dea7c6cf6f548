"""One timer per HTTP/1.1 connection; its meaning follows the connection's state.

A keep-alive connection moves its deadline on every request (head, response,
idle). Creating and cancelling a loop timer each time cost a ``call_at``
handle per request; instead the scheduled handle is kept while the deadline
only moves later, and re-arms itself when it fires early. The handle is
never later than the deadline, so no deadline is missed.
"""

from __future__ import annotations

import asyncio


class Deadline:
    """Mixed into the connection: ``_arm``, ``_cancel_timer``; ``_expired`` is the
    connection's, called once the deadline has passed."""

    _loop: asyncio.AbstractEventLoop
    _timer: asyncio.TimerHandle | None
    _timer_at: float  # when the scheduled handle fires
    _timer_deadline: float  # 0.0: none
    _timer_floor: float  # seconds: no new handle is scheduled further than this ahead

    def _arm(self, delay: float) -> None:
        """Move the deadline ``delay`` seconds ahead. A new handle is scheduled only
        when the deadline moves earlier than the one scheduled, and then at most
        ``_timer_floor`` ahead: the shortest delay this connection arms (the head
        timeout), so the next request's head timeout finds it early enough and a
        busy keep-alive connection creates no handle per request."""
        loop = self._loop
        now = loop.time()
        deadline = self._timer_deadline = now + delay
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()  # an earlier deadline than the one scheduled
            at = self._timer_at = now + min(delay, self._timer_floor)
            self._timer = loop.call_at(at, self._on_timer)

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
        now = loop.time()
        if now < deadline:
            # Pushed back since it was scheduled (activity), or scheduled early
            # on purpose (``_timer_floor``): sleep until the deadline.
            self._timer_at = deadline
            self._timer = loop.call_at(deadline, self._on_timer)
            return
        self._timer_deadline = 0.0
        self._expired()

    def _expired(self) -> None:
        raise NotImplementedError
