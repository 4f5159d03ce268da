"""The errors of eplb's file readers and writers."""

from __future__ import annotations

from eplb.ir.errors import EplbError

__all__ = ["InputError", "MissingExtraError", "RanksNeededError"]


class InputError(EplbError, ValueError):
    """A file or option a user gave cannot be used: the message names the value, the rule and the
    fix (the CLI prints it as one line and exits with status 2)."""


class RanksNeededError(InputError):
    """A placement file does not record its rank count and none was given."""


class MissingExtraError(InputError):
    """Reading a format needs an optional package that is not installed."""
