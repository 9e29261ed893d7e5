"""Put evidence boxes into words.

Language models (and people reading a card) handle "the top-left region" far better than pixel
coordinates, and the offline explainer needs the same wording, so both use this module. A box is
placed on a 3×3 grid of the image: boxes that cover most of the image, a whole row or a whole
column of the grid get a band name; the rest are named by the cell holding their centre.
"""

from __future__ import annotations

from collections.abc import Sequence

from retrieval.types import Region

_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "centre", "right")
#: A grid cell counts as covered when the box spans at least this fraction of its extent.
_COVER = 0.5
#: Area fraction from which a box is simply "the whole image".
_WHOLE_AREA = 0.75


def _covered(lo: int, hi: int, size: int) -> list[int]:
    """Indices of the grid thirds (along one axis) that [lo, hi) covers by at least half."""
    third = size / 3.0
    out = []
    for i in range(3):
        a, b = i * third, (i + 1) * third
        overlap = max(0.0, min(hi, b) - max(lo, a))
        if overlap >= _COVER * third:
            out.append(i)
    return out


def _cell_name(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "centre"
    row_word = "centre" if row == 1 else _ROWS[row]
    return f"{row_word}-{_COLS[col]} region"


def describe_box(box: tuple[int, int, int, int], image_size: tuple[int, int]) -> str:
    """Name where `box` sits in an image of `image_size` (w, h), e.g. "top-left region"."""
    w, h = image_size
    x0, y0 = max(0, box[0]), max(0, box[1])
    x1, y1 = min(w, box[2]), min(h, box[3])
    if x1 <= x0 or y1 <= y0:
        return "outside the image"
    area = (x1 - x0) * (y1 - y0) / float(w * h)
    cols, rows = _covered(x0, x1, w), _covered(y0, y1, h)
    if area >= _WHOLE_AREA or (len(cols) == 3 and len(rows) == 3):
        return "whole image"
    if len(cols) == 3:
        if len(rows) == 1:
            return f"{_ROWS[rows[0]]} band"
        if rows == [0, 1]:
            return "top half"
        if rows == [1, 2]:
            return "bottom half"
    if len(rows) == 3:
        if len(cols) == 1:
            return "central vertical band" if cols[0] == 1 else f"{_COLS[cols[0]]} band"
        if cols == [0, 1]:
            return "left half"
        if cols == [1, 2]:
            return "right half"
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    col = min(2, int(3 * cx / w))
    row = min(2, int(3 * cy / h))
    return _cell_name(row, col)


def strength_word(region: Region, top_score: float) -> str:
    """Relative strength of a region against the best one; rank 1 is always "strongest match"."""
    if region.rank == 1:
        return "strongest match"
    if top_score <= 0:
        return "weaker match"
    ratio = region.score / top_score
    if ratio >= 0.9:
        return "almost as strong"
    if ratio >= 0.7:
        return "weaker match"
    return "much weaker match"


def describe_regions(evidence: Sequence[Region], image_size: tuple[int, int]) -> list[str]:
    """One phrase per region, best first, such as "centre (strongest match)"."""
    ordered = sorted(evidence, key=lambda r: r.rank)
    if not ordered:
        return []
    top = ordered[0].score
    return [f"{describe_box(r.box, image_size)} ({strength_word(r, top)})" for r in ordered]


def strongest_region(evidence: Sequence[Region], image_size: tuple[int, int]) -> str | None:
    """Where the best-ranked region is, or None when the hit has no evidence boxes."""
    if not evidence:
        return None
    best = min(evidence, key=lambda r: r.rank)
    return describe_box(best.box, image_size)
