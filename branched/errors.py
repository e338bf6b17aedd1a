"""The errors a user or a client can cause, in one place.

Every class here is a :class:`BranchedError`: the ``branched`` command prints its message as one line
(exit status 2), and the servers turn a :class:`RequestError` into a 4xx with the message as JSON. The
messages are meant to be read by whoever made the mistake, so each one says what to do instead.
"""
from __future__ import annotations

__all__ = ["BranchedError", "UsageError", "ArtifactError", "ImageError", "DataError", "RequestError"]


class BranchedError(Exception):
    """Base class: a user-facing error whose message is one line that carries the fix."""


class UsageError(BranchedError, ValueError):
    """Settings that cannot work together (a bad option value, a missing dataset name, ...)."""


class ArtifactError(BranchedError, ValueError):
    """A model directory that is missing, damaged or not a branched model."""


class ImageError(BranchedError, ValueError):
    """An input that is not a usable image; the message says why (a client error, HTTP 4xx)."""


class DataError(BranchedError, ValueError):
    """A dataset folder that is missing or malformed (a user error: one line that says what to fix)."""


class RequestError(BranchedError, ValueError):
    """A client error for one request (HTTP 4xx); ``status`` says which."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
