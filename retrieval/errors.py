"""Typed errors of the retrieval library.

Library code raises these and never prints or exits; the boundaries translate them (the CLI into a
one-line message and an exit code, the server into a JSON body with a 4xx/503 status). Each error
carries a message written for the person who has to act on it.
"""

from __future__ import annotations


class ClearsightError(Exception):
    """Base of every error the product raises on purpose."""

    #: Process exit code the CLI uses for this kind of error.
    exit_code: int = 1
    #: HTTP status the server uses for this kind of error.
    http_status: int = 400


class ModelUnavailable(ClearsightError):
    """Weights are not on disk and cannot be downloaded (or fail to load)."""

    exit_code = 3
    http_status = 503


class ConfigError(ClearsightError):
    """A setting, model name or option is invalid."""

    exit_code = 2


class BadQuery(ClearsightError):
    """The query itself is unusable (empty, unreadable image, out-of-range weight...)."""

    exit_code = 2
    http_status = 422


class BadImage(BadQuery):
    """An image could not be decoded or is unsafe to decode; `reason` is stored in the catalog."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class IndexError_(ClearsightError):
    """Base for problems with the stored index (missing, incompatible, corrupt)."""

    exit_code = 4
    http_status = 503


class IndexMissing(IndexError_):
    """No index exists yet in the data directory."""


class IndexMismatch(IndexError_):
    """The stored index was built with another model, dimension or schema."""


class IndexCorrupt(IndexError_):
    """The stored index cannot be read."""


class NotEnoughData(ClearsightError):
    """An operation needs more data than there is (e.g. training IVF-PQ on too few vectors)."""

    exit_code = 2
    http_status = 409


class ShapeError(ClearsightError, ValueError):
    """Arrays entering the index have the wrong shape, dtype or normalisation."""

    exit_code = 5
    http_status = 500
