"""Errors a user can act on, shared by every layer."""

from __future__ import annotations


class InputError(Exception):
    """The prompt file (or model) cannot be used at all; nothing is run and nothing written.

    The message names the file, line or row, and says what to do."""
