"""Dense evidence: one forward pass per hit gives a per-patch similarity map, turned into a heatmap and boxes.

Grid evidence costs one encoder pass per cell; here each hit costs one pass (batched across hits),
and with patch features stored at index time none at all. Raw CLIP patch tokens match the text
poorly and light up the background, so the encoder's `patch_embeddings` applies value-value
attention in the last block (CLIP Surgery, ClearCLIP) before the projection.

The model only sees its own input crop (resize the shorter side, then centre crop), so the map is
mapped back through that geometry: boxes land in the displayed image's pixels, and parts of a
non-square image outside the centre crop carry no dense evidence (grid evidence covers them).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from retrieval.disjoint import DisjointSets
from retrieval.encoders import Encoder, l2_normalise
from retrieval.encoders.preprocess import PreprocessConfig, crop_offsets, resized_size
from retrieval.errors import ConfigError
from retrieval.evidence.batching import encode_in_batches, prepared_in_order
from retrieval.evidence.types import (
    Box,
    Evidence,
    EvidenceConfig,
    EvidenceTarget,
    Region,
    preprocess_config,
    query_row,
)
from retrieval.types import Float32Array


@runtime_checkable
class PatchEncoder(Protocol):
    """An encoder that can return per-patch embeddings in the joint space (HFDualEncoder for CLIP)."""

    def patch_embeddings(self, pixels: Float32Array, surgery: bool = True) -> Float32Array: ...


def can_give_patches(encoder: object) -> bool:
    """Whether dense (and stored) evidence can run on this encoder: it returns patch embeddings and
    says it supports them (HFDualEncoder.supports_patches: CLIP only)."""
    return isinstance(encoder, PatchEncoder) and bool(getattr(encoder, "supports_patches", False))


@dataclass(frozen=True)
class ViewGeometry:
    """Where the model's input crop sits in the displayed image.

    Crop pixel (u, v) shows displayed pixel (ox + u * sx, oy + v * sy); the crop is `crop_w` x `crop_h`.
    """

    ox: float
    oy: float
    sx: float
    sy: float
    crop_w: int
    crop_h: int

    def to_image(self, u0: float, v0: float, u1: float, v1: float, width: int, height: int) -> Box:
        """A crop-space rectangle as a non-empty box inside the displayed image."""
        x0 = min(width - 1, max(0, math.floor(self.ox + u0 * self.sx)))
        y0 = min(height - 1, max(0, math.floor(self.oy + v0 * self.sy)))
        x1 = max(x0 + 1, min(width, math.ceil(self.ox + u1 * self.sx - 1e-6)))
        y1 = max(y0 + 1, min(height, math.ceil(self.oy + v1 * self.sy - 1e-6)))
        return (x0, y0, x1, y1)

    def crop_box(self) -> Box:
        """The whole crop in displayed pixels, unclipped (it reaches past the image where padded)."""
        return (
            round(self.ox),
            round(self.oy),
            round(self.ox + self.crop_w * self.sx),
            round(self.oy + self.crop_h * self.sy),
        )


def view_geometry(width: int, height: int, pre: PreprocessConfig) -> ViewGeometry:
    """Undo the encoder's preprocessing (the geometry `preprocess_one` uses) for a width x height image."""
    rw, rh = resized_size(width, height, pre)
    if pre.crop_hw:
        ch, cw = pre.crop_hw
        pad_x, pad_y, left, top = crop_offsets(rw, rh, pre.crop_hw)
        off_x, off_y = left - pad_x, top - pad_y  # centre crop offset minus centre padding offset
    else:
        ch, cw, off_x, off_y = rh, rw, 0, 0
    sx, sy = width / rw, height / rh
    return ViewGeometry(off_x * sx, off_y * sy, sx, sy, cw, ch)


@dataclass(frozen=True)
class Runs:
    """The horizontal runs of a boolean mask, in raster order, with the component each belongs to."""

    row: np.ndarray  # (n,) the run's row
    start: np.ndarray  # (n,) its first column
    stop: np.ndarray  # (n,) one past its last column
    component: np.ndarray  # (n,) 1..count, numbered by each component's first cell in raster order
    count: int


def mask_runs(mask: np.ndarray) -> Runs:
    """4-connected components of a boolean mask, as runs joined by union-find.

    Runs are found row by row with one vectorised diff; two runs of neighbouring rows join when their
    column spans overlap. The work grows with the number of runs (tens on an evidence map), not with
    the distance a label would have to travel across the map.
    """
    rows, cols = mask.shape
    edges = np.zeros((rows, cols + 2), np.int8)
    edges[:, 1:-1] = mask
    step = np.diff(edges, axis=1)
    row, start = np.nonzero(step == 1)
    _, stop = np.nonzero(step == -1)
    n = len(row)
    sets = DisjointSets(n)  # the earlier run stays the root: roots are each component's first run
    first = np.searchsorted(row, np.arange(rows + 1)).tolist()
    starts, stops = start.tolist(), stop.tolist()
    for r in range(1, rows):
        i, i_end, j, j_end = first[r - 1], first[r], first[r], first[r + 1]
        while i < i_end and j < j_end:
            if starts[i] < stops[j] and starts[j] < stops[i]:
                sets.union(i, j)
            if stops[i] <= stops[j]:
                i += 1
            else:
                j += 1
    roots = np.fromiter((sets.find(k) for k in range(n)), np.int64, n)
    unique, component = np.unique(roots, return_inverse=True)
    return Runs(row, start, stop, component.astype(np.int32) + 1, len(unique))


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask, labelled 1..n by first cell in raster order (0 is
    background)."""
    runs = mask_runs(mask)
    out = np.zeros(mask.shape, np.int32)
    for r, a, b, k in zip(runs.row, runs.start, runs.stop, runs.component, strict=True):
        out[r, a:b] = k
    return out, runs.count


def component_stats(runs: Runs, values: np.ndarray) -> list[tuple[float, int, int, int, int, int]]:
    """Per component 1..count: (best value, x0, y0, x1, y1, cells), the box's far edges exclusive."""
    best = [-math.inf] * runs.count
    x0, y0 = [math.inf] * runs.count, [math.inf] * runs.count
    x1, y1 = [-math.inf] * runs.count, [-math.inf] * runs.count
    cells = [0] * runs.count
    for r, a, b, k in zip(
        runs.row.tolist(), runs.start.tolist(), runs.stop.tolist(), runs.component.tolist(), strict=True
    ):
        c = k - 1
        best[c] = max(best[c], float(values[r, a:b].max()))
        x0[c], x1[c] = min(x0[c], a), max(x1[c], b)
        y0[c], y1[c] = min(y0[c], r), max(y1[c], r + 1)
        cells[c] += b - a
    return [(best[c], int(x0[c]), int(y0[c]), int(x1[c]), int(y1[c]), cells[c]) for c in range(runs.count)]


def _upsample(sim: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return sim.astype(np.float32)
    rows, cols = sim.shape
    im = Image.fromarray(sim.astype(np.float32), mode="F")
    return np.asarray(im.resize((cols * factor, rows * factor), Image.Resampling.BILINEAR), np.float32)


def evidence_from_patches(
    target_id: int,
    patches: Float32Array,
    q: Float32Array,
    width: int,
    height: int,
    pre: PreprocessConfig,
    config: EvidenceConfig,
    method: str = "dense",
) -> Evidence:
    """Heatmap and boxes from unit patch embeddings (rows, cols, dim) and a unit query.

    Boxes are the connected components of the sub-patch map above `threshold` of its range, ranked
    by their best similarity; a flat map (a blank image) yields the whole view as one region.
    """
    geom = view_geometry(width, height, pre)
    sim = (patches @ q).astype(np.float32)
    lo, hi = float(sim.min()), float(sim.max())
    spread = hi - lo
    heat = ((sim - lo) / spread if spread > 1e-6 else np.zeros_like(sim)).astype(np.float32)
    regions: list[tuple[float, Box, int]] = []
    if spread > 1e-6:
        fine = _upsample(sim, config.upsample)
        runs = mask_runs((fine - lo) / spread >= config.threshold)
        cell_u, cell_v = geom.crop_w / fine.shape[1], geom.crop_h / fine.shape[0]
        min_area = max(1, config.upsample**2 // 2)  # drop slivers smaller than half a patch
        for best_value, x0, y0, x1, y1, cells in component_stats(runs, fine):
            box = geom.to_image(x0 * cell_u, y0 * cell_v, x1 * cell_u, y1 * cell_v, width, height)
            regions.append((best_value, box, cells))
        big = [r for r in regions if r[2] >= min_area]
        regions = big or regions
    regions.sort(key=lambda r: -r[0])
    # On tiny images several components map to the same pixels: keep the best of each box.
    best: dict[Box, tuple[float, Box, int]] = {}
    for r in regions:
        best.setdefault(r[1], r)
    regions = list(best.values())
    cap = len(regions) if config.max_regions is None else config.max_regions
    dropped = max(0, len(regions) - cap)
    picked = tuple(
        Region(box, score, rank, f"component {rank}")
        for rank, (score, box, _) in enumerate(regions[:cap], start=1)
    )
    if not picked:
        whole = geom.to_image(0, 0, geom.crop_w, geom.crop_h, width, height)
        picked = (Region(whole, float(sim.mean()), 1, "whole view"),)
    return Evidence(target_id, picked, method, (width, height), heat, geom.crop_box(), dropped_by_cap=dropped)


def patch_encoder(encoder: Encoder) -> PatchEncoder:
    if not isinstance(encoder, PatchEncoder):
        raise ConfigError(
            f"{type(encoder).__name__} cannot return patch embeddings", remedy="use_grid_evidence"
        )
    return encoder


@dataclass(frozen=True)
class PatchResult:
    """Patch embeddings of one target, with the displayed size they were computed for."""

    target: EvidenceTarget
    width: int
    height: int
    patches: Float32Array


@dataclass(frozen=True)
class _Loaded:
    target: EvidenceTarget
    width: int
    height: int
    pixels: Float32Array  # the model's input, one image


def iter_patches(
    encoder: Encoder, targets: Sequence[EvidenceTarget], config: EvidenceConfig
) -> Iterator[PatchResult | Evidence]:
    """Patch embeddings for each target, or a note when unreadable, in order: decoding runs in worker
    threads while the model works on full batches, and each result comes out as soon as its batch is
    done. An encoder without patch embeddings is refused here, before anything is decoded."""
    pe = patch_encoder(encoder)

    def prepare(t: EvidenceTarget, image: Image.Image, width: int, height: int) -> _Loaded:
        return _Loaded(t, width, height, encoder.preprocess([image])[0])

    def run(pixels: Float32Array) -> Float32Array:
        return pe.patch_embeddings(pixels, surgery=config.surgery)

    loaded = prepared_in_order(targets, prepare, "dense", encoder.info.image_size, config)
    return (
        r if isinstance(r, Evidence) else PatchResult(r[0].target, r[0].width, r[0].height, r[1][0])
        for r in encode_in_batches(loaded, _one_row, run, config.batch_size)
    )


def _one_row(x: _Loaded) -> Float32Array:
    return x.pixels[None]


#: How stored patch features keep their values (`retrieval.evidence.stored`); int8 is the store's default.
STORED_DTYPES = ("int8", "float16")


def stored_form(patches: Float32Array, dtype: str = "int8") -> np.ndarray:
    """Unit patch embeddings as a patch store keeps them: int8 rows scaled to +-127 (cosine ignores
    each row's scale, so none is kept), or float16."""
    if dtype == "int8":
        peak = np.maximum(np.abs(patches).max(axis=-1, keepdims=True), 1e-12)
        return np.rint(patches / peak * 127.0).astype(np.int8)
    return patches.astype(np.float16)


def as_stored(patches: Float32Array, dtype: str = "int8") -> Float32Array:
    """The features evidence draws on: `patches` as a store of `dtype` reads them back. Dense evidence
    uses them too, so an image's boxes are the same whether its features were computed now (the
    command line, a collection without a store) or stored by a server and read back."""
    return l2_normalise(stored_form(patches, dtype).astype(np.float32))


def dense_results(
    encoder: Encoder,
    q: Float32Array,
    pre: PreprocessConfig,
    targets: Sequence[EvidenceTarget],
    config: EvidenceConfig,
) -> Iterator[tuple[Evidence, PatchResult | None]]:
    """Dense evidence for each target (unit query `q`), in order, with the patch features computed
    (None for an unreadable image), so stored evidence can keep them. The evidence is drawn from the
    features as the default store keeps them (`as_stored`)."""
    for r in iter_patches(encoder, targets, config):
        if isinstance(r, Evidence):
            yield r, None
        else:
            feats = as_stored(r.patches)
            yield evidence_from_patches(r.target.id, feats, q, r.width, r.height, pre, config), r


def dense_evidence(
    encoder: Encoder, query_vec: Float32Array, targets: Sequence[EvidenceTarget], config: EvidenceConfig
) -> list[Evidence]:
    """Dense evidence for all targets, batched forward passes through the (patched) vision tower."""
    q = query_row(query_vec)
    pre = preprocess_config(encoder)
    return [ev for ev, _ in dense_results(encoder, q, pre, targets, config)]
