"""What an edge HTTP/2 connection allows its client (config ``[proxy]``)."""

from __future__ import annotations

from dataclasses import dataclass

from edge.h2.frames import DEFAULT_WINDOW, MIN_MAX_FRAME_SIZE


@dataclass(frozen=True, slots=True)
class H2Settings:
    max_concurrent_streams: int = 100
    initial_window_size: int = DEFAULT_WINDOW  # per stream, what a client may send ahead
    connection_window: int = 1 << 20  # the whole connection (bounded anyway by streams x window)
    max_frame_size: int = MIN_MAX_FRAME_SIZE
    max_header_list_size: int = 64 * 1024  # above it a request is answered 431
    hard_header_list_size: int = 256 * 1024  # above it the connection ends (HPACK bomb)
    max_header_block: int = 128 * 1024  # compressed, all CONTINUATION frames together
    glitch_budget: int = 1000
