"""Grid evidence, the reference method: crop each hit into grid cells, encode every cell, rank by the query.

It needs nothing but the encoder's image tower, so it works with any dual encoder, and it sees the
whole image (dense evidence only sees the model's centre crop). Its cost is one encoder pass per
cell: all cells of all hits therefore go through the encoder in shared batches while worker threads
decode and crop the next hits, instead of one small batch per hit (see `pipeline`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image

from retrieval.encoders import Encoder
from retrieval.encoders.preprocess import PreprocessConfig
from retrieval.evidence.batching import Prepare, encode_in_batches, load_and_prepare, prepared_in_order
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

#: Resolution (cells on the longer side) of the saliency map drawn from grid scores.
_SALIENCY_CELLS = 48


def _spans(length: int, cells: int, overlap: float, min_px: int) -> list[tuple[int, int]]:
    """`cells` equal windows covering [0, length), neighbours sharing `overlap` of a window."""
    window = length / (cells - (cells - 1) * overlap)
    stride = window * (1.0 - overlap)
    spans = []
    for i in range(cells):
        a, b = round(i * stride), min(length, round(i * stride + window))
        if b - a >= min_px:
            spans.append((a, b))
    return spans


def grid_boxes(
    width: int, height: int, grids: Sequence[int], overlap: float = 0.0, min_px: int = 4
) -> list[tuple[Box, str]]:
    """Cells of every grid, coarse first; cells below `min_px` are skipped and duplicates merged.

    An image too small for any cell still gets one region, the whole image, so a 1x1 picture has
    evidence rather than none.
    """
    seen: dict[Box, str] = {}
    for g in grids:
        rows = _spans(height, g, overlap, min_px)
        cols = _spans(width, g, overlap, min_px)
        for r, (y0, y1) in enumerate(rows):
            for c, (x0, x1) in enumerate(cols):
                seen.setdefault((x0, y0, x1, y1), f"{g}x{g} r{r + 1}c{c + 1}")
    if not seen:
        return [((0, 0, width, height), "whole image")]
    return list(seen.items())


def select_regions_counted(
    boxes: Sequence[Box], labels: Sequence[str], scores: Float32Array, config: EvidenceConfig
) -> tuple[tuple[Region, ...], int]:
    """The reference rule: always the best `top_n` (4), plus every region within `ratio` (95 %) of the
    best; then the optional `max_regions` cap. Returns the regions and how many the cap dropped.

    A fixed threshold on cosine similarity means nothing across models and queries; relative to the
    best region it keeps the top four when one stands out and more when the match is spread out.
    "Within ratio" is measured on the score's magnitude so it also works when all scores are negative.
    """
    if len(scores) == 0:
        return (), 0
    order = np.argsort(-scores, kind="stable")
    best = float(scores[order[0]])
    cut = best - (1.0 - config.ratio) * abs(best)
    keep = [int(i) for k, i in enumerate(order) if k < config.top_n or float(scores[i]) >= cut]
    dropped = 0
    if config.max_regions is not None and len(keep) > config.max_regions:
        dropped = len(keep) - config.max_regions
        keep = keep[: config.max_regions]
    regions = tuple(
        Region(boxes[i], float(scores[i]), rank, labels[i]) for rank, i in enumerate(keep, start=1)
    )
    return regions, dropped


def select_regions(
    boxes: Sequence[Box], labels: Sequence[str], scores: Float32Array, config: EvidenceConfig
) -> tuple[Region, ...]:
    """`select_regions_counted` without the count."""
    return select_regions_counted(boxes, labels, scores, config)[0]


def grid_saliency(width: int, height: int, boxes: Sequence[Box], scores: Float32Array) -> Float32Array:
    """Per-pixel mean score of the regions covering it, scaled to [0, 1]: a coarse heatmap.

    Averaging over scales lets a small cell that matches stand out inside a larger one that also
    matches; the map feeds the heatmap overlay and the deletion metric.
    """
    scale = _SALIENCY_CELLS / max(width, height)
    cols, rows = max(1, round(width * scale)), max(1, round(height * scale))
    total = np.zeros((rows, cols), np.float64)
    count = np.zeros((rows, cols), np.float64)
    for (x0, y0, x1, y1), s in zip(boxes, scores, strict=True):
        c0, c1 = int(x0 * cols / width), max(int(x0 * cols / width) + 1, round(x1 * cols / width))
        r0, r1 = int(y0 * rows / height), max(int(y0 * rows / height) + 1, round(y1 * rows / height))
        total[r0:r1, c0:c1] += float(s)
        count[r0:r1, c0:c1] += 1
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    if np.all(np.isnan(mean)):
        return np.zeros((rows, cols), np.float32)
    lo, hi = np.nanmin(mean), np.nanmax(mean)
    heat = (mean - lo) / (hi - lo) if hi - lo > 1e-9 else np.zeros_like(mean)
    return np.nan_to_num(heat, nan=0.0).astype(np.float32)


def crop_for_encoder(
    image: Image.Image, width: int, height: int, box: Box, pre: PreprocessConfig
) -> Image.Image:
    """The part of a region the encoder would see, cut from the (possibly reduced) decoded image.

    A CLIP-style encoder only sees the centre of a non-square input after its resize and centre
    crop; cutting that centre here first gives the same view while keeping the resize small for
    very elongated cells (a 10000x50 image would otherwise be upscaled to a huge strip).
    """
    sx, sy = image.width / width, image.height / height
    x0, y0, x1, y1 = box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy
    if pre.crop_hw and not pre.resize_hw:
        ch, cw = pre.crop_hw
        w, h = x1 - x0, y1 - y0
        if w * ch > h * cw:  # wider than the crop's aspect: keep the centre columns
            keep = h * cw / ch
            x0, x1 = x0 + (w - keep) / 2, x0 + (w + keep) / 2
        else:
            keep = w * ch / cw
            y0, y1 = y0 + (h - keep) / 2, y0 + (h + keep) / 2
    left, top = int(x0), int(y0)
    right = min(image.width, max(left + 1, round(x1)))
    bottom = min(image.height, max(top + 1, round(y1)))
    return image.crop((left, top, right, bottom))


@dataclass(frozen=True)
class _Prepared:
    target: EvidenceTarget
    width: int
    height: int
    boxes: list[Box]
    labels: list[str]
    pixels: Float32Array


def _cells(
    encoder: Encoder,
    config: EvidenceConfig,
    pre: PreprocessConfig,
    target: EvidenceTarget,
    image: Image.Image,
    width: int,
    height: int,
) -> _Prepared:
    """Every cell of one decoded image, cropped and preprocessed for the encoder."""
    cells = grid_boxes(width, height, config.grids, config.overlap, config.min_region_px)
    boxes = [b for b, _ in cells]
    crops = [crop_for_encoder(image, width, height, b, pre) for b in boxes]
    return _Prepared(target, width, height, boxes, [label for _, label in cells], encoder.preprocess(crops))


def _prepare_cells(encoder: Encoder, config: EvidenceConfig, pre: PreprocessConfig) -> Prepare[_Prepared]:
    return partial(_cells, encoder, config, pre)


def _draft_size(encoder: Encoder, config: EvidenceConfig) -> int:
    """Decode reduced, but fine enough for the finest grid."""
    return encoder.info.image_size * max(config.grids)


def _pixels(p: _Prepared) -> Float32Array:
    return p.pixels


def _finish(p: _Prepared, embeddings: Float32Array, q: Float32Array, config: EvidenceConfig) -> Evidence:
    scores = (embeddings @ q).astype(np.float32)
    regions, dropped = select_regions_counted(p.boxes, p.labels, scores, config)
    return Evidence(
        hit_id=p.target.id,
        regions=regions,
        dropped_by_cap=dropped,
        method="grid",
        image_size=(p.width, p.height),
        heatmap=grid_saliency(p.width, p.height, p.boxes, scores),
        heatmap_box=(0, 0, p.width, p.height),
    )


def grid_evidence(
    encoder: Encoder, query_vec: Float32Array, targets: Sequence[EvidenceTarget], config: EvidenceConfig
) -> list[Evidence]:
    """Grid evidence for all targets: cells of all hits share encoder batches (the fast path)."""
    q = query_row(query_vec)
    pre = preprocess_config(encoder)
    prepare = _prepare_cells(encoder, config, pre)
    prepared = prepared_in_order(targets, prepare, "grid", _draft_size(encoder, config), config)
    return [
        r if isinstance(r, Evidence) else _finish(r[0], r[1], q, config)
        for r in encode_in_batches(prepared, _pixels, encoder.encode_pixels, config.batch_size)
    ]


def grid_evidence_per_hit(
    encoder: Encoder, query_vec: Float32Array, targets: Sequence[EvidenceTarget], config: EvidenceConfig
) -> list[Evidence]:
    """The same grid evidence computed hit by hit, the way the reference implementation does it.

    Kept as the baseline the benchmark compares against and the tests check numerically.
    """
    q = query_row(query_vec)
    pre = preprocess_config(encoder)
    prepare, draft_size = _prepare_cells(encoder, config, pre), _draft_size(encoder, config)
    results: list[Evidence] = []
    for t in targets:
        p = load_and_prepare(t, prepare, "grid", draft_size)
        if isinstance(p, Evidence):
            results.append(p)
            continue
        results.append(_finish(p, encoder.encode_pixels(p.pixels), q, config))
    return results
