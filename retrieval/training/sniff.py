"""Guess an annotation file's dataset format from its first bytes, so a wrong format is answered with the
right one instead of only a parse error."""

from __future__ import annotations

import re
from pathlib import Path

#: How much of an annotation file is read to guess its format: enough for a header and a few records.
_SNIFF_BYTES = 64 * 1024


def guess_formats(path: Path) -> list[str]:
    """The formats an annotation file looks like, from its first 64 KB (a guess, for error messages only).

    Karpathy-style JSON is both 'karpathy' and 'rsicd'; a COCO captions file is 'coco' (and 'rsicd',
    which also comes COCO-style). Nothing is guessed for a directory or an unreadable file.
    """
    try:
        with Path(path).open("rb") as fh:
            head = fh.read(_SNIFF_BYTES).decode("utf-8-sig", errors="replace")
    except OSError:
        return []
    text = head.lstrip()
    first = text.splitlines()[0] if text else ""
    if first.startswith("{") and first.rstrip().endswith("}") and '"image"' in first:
        return ["jsonl"]
    if text.startswith("{"):
        if '"sentences"' in head and '"images"' in head:
            return ["karpathy", "rsicd"]
        if '"annotations"' in head and '"images"' in head:
            return ["coco", "rsicd"]
        return []
    if first.replace(" ", "").lower().startswith("image,caption"):
        return ["kaggle"]
    if re.match(r"^[^\t#]+\.(jpe?g|png)#\d+\t", first, re.I):
        return ["flickr8k"]
    return []
