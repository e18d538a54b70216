"""The error a start-up cannot go past: its message is the one line the user sees."""

from __future__ import annotations


class StartupError(Exception):
    """The exporter cannot start; the message is the one line the user sees."""
