"""HTTP/2 (RFC 9113) and HPACK (RFC 7541) for the client side of the data path.

Sans-I/O: ``H2Connection.receive_data`` takes bytes and returns events,
``data_to_send`` hands back the bytes to write. No sockets, no timers, no
asyncio here; the protocol adapter in ``edge.proxy`` owns those.
"""

import logging

from edge.h2.connection import H2Connection
from edge.h2.errors import ErrorCode
from edge.h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RequestReceived,
    StreamReset,
    TrailersReceived,
    WindowOpened,
)
from edge.h2.settings import H2Settings

__all__ = [
    "ConnectionTerminated",
    "DataReceived",
    "ErrorCode",
    "Event",
    "H2Connection",
    "H2Settings",
    "RequestReceived",
    "StreamReset",
    "TrailersReceived",
    "WindowOpened",
]

# hpack logs every field it decodes at DEBUG: header values (cookies, tokens)
# must not reach edge's logs, and a debug log would drown in them.
logging.getLogger("hpack").setLevel(logging.WARNING)
