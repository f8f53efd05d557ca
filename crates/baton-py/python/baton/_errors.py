"""baton's exception classes. The native module raises these; import them from ``baton``."""

import builtins
from typing import Optional

__all__ = [
    "Error",
    "BusyError",
    "TimeoutError",
    "LostError",
    "NotHeldError",
    "NotFoundError",
    "InvalidKeyError",
    "InvalidInputError",
    "LimitMismatchError",
    "UnavailableError",
    "CorruptError",
    "UnsupportedError",
    "FencedError",
]


class Error(Exception):
    """Any baton failure. The message is the line the CLI prints after ``baton: ``.

    Attributes (set on every error baton raises):
      kind: the Rust ``ErrorKind`` as a short name (``"busy"``, ``"timeout"``, ...).
      retryable: whether trying the same call later may succeed.
      grant_unknown: it is unknown whether the store granted the request (a network store
        whose reply was lost): treat the outcome as unknown.
      current_limit: for LimitMismatchError, the limit the key has.
      op, key, store: the operation, key and store (URL without secrets) concerned.
    """

    kind: str = "error"
    retryable: bool = False
    grant_unknown: bool = False
    current_limit: Optional[int] = None
    op: Optional[str] = None
    key: Optional[str] = None
    store: Optional[str] = None


class BusyError(Error):
    """Every slot is held and the request said not to wait (``wait=0``)."""


class TimeoutError(Error, builtins.TimeoutError):
    """Every slot stayed held until the wait ran out. Also Python's builtin TimeoutError."""


class LostError(Error):
    """The lease was lost: the keeper could not renew it in time, or the store no longer
    held it (expired, broken, taken over). Stop the work; a newer holder may exist."""


class NotHeldError(Error):
    """The lease is not held (released already, or lost)."""


class NotFoundError(Error, LookupError):
    """The key does not exist in the store (status of a key never used)."""


class InvalidKeyError(Error, ValueError):
    """Not a valid key: 1-200 bytes of ``[A-Za-z0-9._-]`` with ``/`` between parts, no ``..``."""


class InvalidInputError(Error, ValueError):
    """Some other argument is invalid: a URL, a duration, a limit."""


class LimitMismatchError(Error):
    """The key exists with another limit than the one requested (see ``current_limit``)."""


class UnavailableError(Error):
    """The store cannot be reached or used right now (I/O, permissions, network)."""


class CorruptError(Error):
    """The store holds state baton did not write or cannot read."""


class UnsupportedError(Error):
    """The store does not support this operation (``resize`` on kernel locks, ...)."""


class FencedError(Error):
    """A fenced write carried a token older than one the resource has seen."""
