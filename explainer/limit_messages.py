"""Messages about the server's limits (sizes, page depth, result counts), worded once for the
command line, the page and the API alike."""

from __future__ import annotations


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KB', 10485760 -> '10 MB' (binary multiples, as upload limits are set)."""
    size = float(n)
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            text = f"{size:.1f}".rstrip("0").rstrip(".") if unit != "bytes" else str(int(size))
            return f"{text} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def image_too_large(limit: int) -> str:
    return f"The image is larger than {human_bytes(limit)}, the most this server accepts"


def too_many_results(limit: int, asked: int) -> str:
    return f"Show at most {limit} results per page (asked for {asked})"


def offset_too_far(limit: int, asked: int) -> str:
    return f"Results can be paged through up to result {limit} (asked to start at {asked})"
