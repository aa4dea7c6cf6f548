"""Errors shared by the process start-up code paths."""

from __future__ import annotations


class StartupError(RuntimeError):
    """edge cannot start; the message says why and what to do."""
