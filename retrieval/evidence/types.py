"""Evidence types: what an evidence method returns, how it is configured, and what it works on.

Boxes are half-open pixel rectangles `(x0, y0, x1, y1)` in the coordinates of the image as it is
displayed (EXIF orientation applied, full size), the same convention as `retrieval.demo.synthetic`, so
`0 <= x0 < x1 <= width` always holds for a returned region.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from retrieval import imageio
from retrieval.encoders.base import l2_normalise
from retrieval.encoders.preprocess import PreprocessConfig
from retrieval.errors import ConfigError
from retrieval.types import Box, Float32Array, Region

#: The evidence methods; "auto" picks the default (see `default_method`).
METHODS: tuple[str, ...] = ("grid", "dense", "stored")


@dataclass(frozen=True)
class EvidenceConfig:
    """How evidence is computed; validated on construction so a bad option fails before any model work."""

    method: str = "auto"
    #: Grid evidence: cells per side of each grid, all scales at once.
    grids: tuple[int, ...] = (2, 3, 4)
    #: Grid evidence: fraction by which neighbouring cells overlap (0 = a plain grid).
    overlap: float = 0.0
    #: The reference rule: always this many regions...
    top_n: int = 4
    #: ...plus every region scoring within this ratio of the best.
    ratio: float = 0.95
    #: An optional cap on top of the rule (None: no cap, the reference behaviour). When set, the regions
    #: it drops are counted in `Evidence.dropped_by_cap`, so output can say a cap applied.
    max_regions: int | None = None
    #: Regions narrower or shorter than this (in original pixels) are skipped, not encoded.
    min_region_px: int = 4
    #: Crops or images per encoder forward pass.
    batch_size: int = 32
    #: Dense evidence: patches above this fraction of the map's range form evidence components.
    threshold: float = 0.6
    #: Dense evidence: sub-patch resolution of the map that components are cut from.
    upsample: int = 4
    #: Dense evidence: value-value attention in the last block (off only to measure the raw baseline).
    surgery: bool = True
    #: Decode and crop images in this many threads while the encoder runs.
    workers: int = 2

    def __post_init__(self) -> None:
        if self.method not in (*METHODS, "auto"):
            raise ConfigError(f"unknown evidence method {self.method!r}; known: auto, {', '.join(METHODS)}")
        if not self.grids or any(not isinstance(g, int) or not 1 <= g <= 16 for g in self.grids):
            raise ConfigError(f"grids must be cells per side between 1 and 16, got {self.grids}")
        if not 0.0 <= self.overlap < 0.9:
            raise ConfigError(f"overlap must be in [0, 0.9), got {self.overlap}")
        if self.top_n < 1 or (self.max_regions is not None and self.max_regions < self.top_n):
            raise ConfigError(
                f"need 1 <= top_n <= max_regions, got top_n={self.top_n}, max_regions={self.max_regions}"
            )
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.min_region_px < 1 or self.batch_size < 1 or self.workers < 1 or self.upsample < 1:
            raise ConfigError("min_region_px, batch_size, workers and upsample must be at least 1")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")


@dataclass(frozen=True)
class Evidence:
    """The evidence for one hit.

    `heatmap` (rows, cols, values in [0, 1]) covers `heatmap_box`, which can reach past the image
    where the model's preprocessing padded it; renderers and the pointing game read it from there.
    `note` says why a hit has no regions (an unreadable file), instead of failing the whole query.
    """

    hit_id: int
    regions: tuple[Region, ...]
    method: str
    image_size: tuple[int, int]  # (width, height) of the displayed image
    heatmap: Float32Array | None = field(default=None, compare=False, repr=False)
    heatmap_box: Box | None = None
    note: str | None = None
    #: Regions the selection rule chose that `EvidenceConfig.max_regions` left out (0 without a cap).
    dropped_by_cap: int = 0

    @property
    def top(self) -> Region | None:
        return self.regions[0] if self.regions else None

    def peak(self) -> tuple[float, float] | None:
        """The most salient point in original pixels: the heatmap's maximum, else the top box centre."""
        if self.heatmap is not None and self.heatmap_box is not None and self.heatmap.size:
            rows, cols = self.heatmap.shape
            r, c = np.unravel_index(int(np.argmax(self.heatmap)), self.heatmap.shape)
            x0, y0, x1, y1 = self.heatmap_box
            return float(x0 + (c + 0.5) * (x1 - x0) / cols), float(y0 + (r + 0.5) * (y1 - y0) / rows)
        if self.regions:
            x0, y0, x1, y1 = self.regions[0].box
            return (x0 + x1) / 2, (y0 + y1) / 2
        return None

    def placed_heatmap(self, sx: float, sy: float) -> tuple[int, int, Float32Array] | None:
        """The heatmap resized onto an image scaled by (sx, sy) from the displayed one: (left, top,
        values), values of shape (h, w) with the corner at (left, top), which may lie outside the image."""
        if self.heatmap is None or self.heatmap_box is None:
            return None
        x0, y0, x1, y1 = self.heatmap_box
        w, h = max(1, round((x1 - x0) * sx)), max(1, round((y1 - y0) * sy))
        heat = Image.fromarray(self.heatmap.astype(np.float32), mode="F")
        values = np.asarray(heat.resize((w, h), Image.Resampling.BILINEAR), np.float32)
        return round(x0 * sx), round(y0 * sy), values

    def to_dict(self) -> list[dict[str, object]]:
        """The JSON form of a result's `evidence` list."""
        return [r.to_dict() for r in self.regions]


class CatalogRow(Protocol):
    """What a search hit and a catalog record share: enough to explain the image."""

    @property
    def id(self) -> int: ...
    @property
    def path(self) -> str: ...
    @property
    def width(self) -> int | None: ...
    @property
    def height(self) -> int | None: ...
    @property
    def content_hash(self) -> str | None: ...


@dataclass(frozen=True)
class EvidenceTarget:
    """An image to explain.

    `image` may be a reduced decode (JPEG draft mode) of the displayed image: regions are always
    computed in `width` x `height`, the displayed full size, and scaled to whatever was decoded.
    """

    id: int
    width: int
    height: int
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    path: str | None = None
    key: str | None = None  # content hash, for stored patch features

    @classmethod
    def from_image(cls, id: int, image: Image.Image, key: str | None = None) -> EvidenceTarget:
        rgb = imageio.to_rgb(image)
        return cls(id=id, width=rgb.width, height=rgb.height, image=rgb, key=key)

    @classmethod
    def from_row(cls, row: CatalogRow) -> EvidenceTarget:
        """A hit or catalog record: path to decode, displayed size and content hash as recorded."""
        return cls(
            id=row.id, width=row.width or 0, height=row.height or 0, path=row.path, key=row.content_hash
        )

    @classmethod
    def from_path(cls, id: int, path: Path | str, key: str | None = None) -> EvidenceTarget:
        """Header only: the size as displayed, without decoding the pixels."""
        w, h = imageio.probe_size(imageio.read_bytes(Path(path)))
        return cls(id=id, width=w, height=h, path=str(path), key=key)

    def load(self, draft_size: int | None = None) -> tuple[Image.Image, int, int]:
        """RGB pixels and the displayed (width, height), decoded now if only a path was given.

        The size comes from the decode when there is one: a file changed since indexing still gets
        boxes in its current coordinates. Raises BadImage when the file cannot be read.
        """
        if self.image is not None:
            return self.image, self.width, self.height
        if self.path is None:
            raise ConfigError(f"evidence target {self.id} has neither an image nor a path")
        dec = imageio.open_image(Path(self.path), draft_size=draft_size)
        return dec.image, dec.width, dec.height

    def size(self) -> tuple[int, int]:
        """The displayed size, read from the file header when the target was made without one."""
        if self.width > 0 and self.height > 0:
            return self.width, self.height
        if self.path is None:
            raise ConfigError(f"evidence target {self.id} has neither a size nor a path")
        return imageio.probe_size(imageio.read_bytes(Path(self.path)))


def unreadable(target: EvidenceTarget, method: str, reason: str) -> Evidence:
    return Evidence(target.id, (), method, (target.width, target.height), note=f"image unreadable: {reason}")


def query_row(query_vec: Float32Array) -> Float32Array:
    """The query as one unit row of float32, whatever shape it came in."""
    q = np.asarray(query_vec, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(q))
    if norm < 1e-12 or not np.isfinite(norm):
        raise ConfigError("the query vector is zero or not finite; embed the query with Searcher.embed_query")
    return l2_normalise(q)


def preprocess_config(encoder: object) -> PreprocessConfig:
    """The encoder's resize and crop settings, which evidence needs to map model pixels back to the image."""
    pre = getattr(encoder, "pre", None)
    if not isinstance(pre, PreprocessConfig):
        raise ConfigError(
            f"{type(encoder).__name__} does not expose its preprocessing (.pre); evidence needs it "
            "to map regions back to image pixels"
        )
    return pre
