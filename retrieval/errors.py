"""Typed errors of the retrieval library.

Library code raises these and never prints or exits. A message says what went wrong in the
library's own terms; what the user can do about it is a `remedy` code, which each boundary turns
into its own words (the CLI names its flags, the server its fields), so the library never speaks
of command-line options, HTTP statuses or exit codes.
"""

from __future__ import annotations

#: Remedy codes the library may attach to an error; the boundaries word them.
REMEDIES: frozenset[str] = frozenset(
    {
        "rebuild",  # replace the index (built with another model, or unreadable)
        "other_data_dir",  # keep the old index, write the new one elsewhere
        "use_index_model",  # search with the model the index was built with
        "add_captions",  # attach dataset captions or generate some
        "use_grid_evidence",  # the model has no per-patch projection
        "name_val_split",  # fine-tuning needs a validation split
        "force_write",  # write a model the guard refused
        "other_out_dir",  # the output folder belongs to something else
        "index_first",  # there is no collection yet
        "list_models",  # a model name the registry does not know
    }
)


class ClearsightError(Exception):
    """Base of every error the product raises on purpose."""

    def __init__(self, message: str = "", *, remedy: str | None = None) -> None:
        if remedy is not None and remedy not in REMEDIES:
            raise ValueError(f"unknown remedy {remedy!r}")
        super().__init__(message)
        self.remedy = remedy


class ModelUnavailable(ClearsightError):
    """Weights are not on disk and cannot be downloaded (or fail to load)."""


class ConfigError(ClearsightError):
    """A setting, model name or option is invalid."""


class BadQuery(ClearsightError):
    """The query itself is unusable (empty, unreadable image, out-of-range weight...)."""


class BadImage(BadQuery):
    """An image could not be decoded or is unsafe to decode; `reason` is stored in the catalog."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class IndexError_(ClearsightError):
    """Base for problems with the stored index (missing, incompatible, corrupt)."""


class IndexMissing(IndexError_):
    """No index exists yet in the data directory."""


class IndexMismatch(IndexError_):
    """The stored index was built with another model, dimension or schema."""


class IndexCorrupt(IndexError_):
    """The stored index cannot be read."""


class NotEnoughData(ClearsightError):
    """An operation needs more data than there is (e.g. training IVF-PQ on too few vectors)."""


class ShapeError(ClearsightError, ValueError):
    """Arrays entering the index have the wrong shape, dtype or normalisation."""


class FinetuneRefused(ClearsightError):
    """The fine-tuned model is worse on validation than the start; nothing was written.

    `result` is the training's result (typed loosely here: the training package defines it and
    imports this module, not the other way round)."""

    def __init__(self, message: str, result: object, *, remedy: str | None = "force_write") -> None:
        super().__init__(message, remedy=remedy)
        self.result = result
