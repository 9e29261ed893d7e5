"""Small types shared by the library and its callers: array aliases, and the evidence region."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Float32Array = npt.NDArray[np.float32]
Int64Array = npt.NDArray[np.int64]
UInt8Array = npt.NDArray[np.uint8]

#: A half-open pixel rectangle (x0, y0, x1, y1) in the displayed image's coordinates.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Region:
    """One evidence region; `rank` is 1-based, best first.

    The one box type of the product: evidence methods return it, the explainer puts it into words
    and cards carry it (pydantic validates and serialises it as a plain object)."""

    box: Box
    score: float
    rank: int
    label: str | None = None

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.box
        if x1 <= x0 or y1 <= y0 or x0 < 0 or y0 < 0:
            raise ValueError(
                f"box must be [x0, y0, x1, y1] with 0 <= x0 < x1 and 0 <= y0 < y1, got {self.box}"
            )
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")

    def to_dict(self) -> dict[str, object]:
        return {"box": list(self.box), "score": round(self.score, 6), "rank": self.rank, "label": self.label}
