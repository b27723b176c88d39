"""Errors of the adapter registry, each carrying the HTTP status the API answers with.

The registry raises these instead of `adapters_core`'s errors so that the API layer maps one family to
statuses without knowing where a failure came from: `NotFound` (404: unknown or deleted name), `Conflict`
(409: name taken, adapter deactivated), `TooLarge` (413: weights or archive over a size limit), `Invalid`
(422: the adapter does not fit the model or breaks a rule; 400 when the input cannot even be parsed) and
`Unavailable` (503: every device slot is pinned or in use); `GenerationFailed` (500: one request's own
generation failed in the engine, e.g. its adapter gave non-finite logits; 400 when its own grammar failed as it
ran; other requests are unaffected). Messages name the adapter and the limit or
field at fault, because they are shown to the person who uploaded the adapter.
"""

from __future__ import annotations

from typing import Optional


class RegistryError(Exception):
    """Base class; `status` is the HTTP status, `str(error)` the message for the client."""

    status: int = 500

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self)


class NotFound(RegistryError):
    status = 404


class Conflict(RegistryError):
    status = 409


class TooLarge(RegistryError):
    status = 413


class Invalid(RegistryError):
    status = 422


class Unavailable(RegistryError):
    status = 503


class GenerationFailed(RegistryError):
    status = 500
