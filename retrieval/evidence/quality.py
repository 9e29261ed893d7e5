"""Measuring evidence against known boxes: the pointing game and deletion AUC, with random baselines.

Evidence that merely looks plausible is easy to produce; these two numbers say whether it is
right. The pointing game asks whether the most salient point falls on the object the query names.
Deletion blanks the image, most salient part first, and tracks how fast the query's score falls:
evidence that found what the model matches on makes it fall fast (a low area under the curve).
Both are compared with random evidence on the same images, the floor any method must clear.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from retrieval.encoders import Encoder
from retrieval.evidence.types import Box, Evidence, Region, query_row
from retrieval.types import Float32Array

#: Deletion runs on images no larger than this (longer side): the metric needs shape, not detail.
_DELETION_SIDE = 256
#: Random saliency is drawn on this many cells per side, blocks like a patch map rather than pixel noise.
_RANDOM_CELLS = 8


@dataclass(frozen=True)
class QualityReport:
    """Mean figures over cases; `deletion_auc` is normalised (1 = the score never fell), lower is better."""

    method: str
    cases: int
    pointing: float
    deletion_auc: float

    def line(self) -> str:
        return (
            f"{self.method:<8} pointing {self.pointing:.3f}  "
            f"deletion AUC {self.deletion_auc:.3f}  (n={self.cases})"
        )


def inside(point: tuple[float, float], box: Box, tolerance: float = 0.0) -> bool:
    x, y = point
    x0, y0, x1, y1 = box
    return x0 - tolerance <= x < x1 + tolerance and y0 - tolerance <= y < y1 + tolerance


def pointing_point(evidence: Evidence, use: str = "box") -> tuple[float, float] | None:
    """The point a method names: the top box's centre ("box") or the heatmap's maximum ("peak")."""
    if use == "peak":
        return evidence.peak()
    top = evidence.top
    if top is None:
        return None
    x0, y0, x1, y1 = top.box
    return (x0 + x1) / 2, (y0 + y1) / 2


def pointing_game(
    evidence: Sequence[Evidence], truths: Sequence[Box], use: str = "box", tolerance: float = 0.0
) -> float:
    """Share of cases whose pointed-at point lies inside the ground-truth box."""
    hits = [
        (p := pointing_point(ev, use)) is not None and inside(p, truth, tolerance)
        for ev, truth in zip(evidence, truths, strict=True)
    ]
    return float(np.mean(hits)) if hits else 0.0


def random_evidence(hit_id: int, width: int, height: int, rng: np.random.Generator) -> Evidence:
    """The baseline: a random box and a random blocky heatmap, as uninformed as evidence can be."""
    bw, bh = max(1, int(rng.integers(1, width + 1) // 2)), max(1, int(rng.integers(1, height + 1) // 2))
    x0, y0 = int(rng.integers(0, width - bw + 1)), int(rng.integers(0, height - bh + 1))
    region = Region((x0, y0, x0 + bw, y0 + bh), 0.0, 1, "random")
    heat = rng.random((_RANDOM_CELLS, _RANDOM_CELLS)).astype(np.float32)
    return Evidence(hit_id, (region,), "random", (width, height), heat, (0, 0, width, height))


def random_pointing(truths: Sequence[Box], sizes: Sequence[tuple[int, int]]) -> float:
    """Expected pointing score of a uniformly random point: the truth's share of the image."""
    shares = [
        max(0, min(b[2], w) - max(b[0], 0)) * max(0, min(b[3], h) - max(b[1], 0)) / (w * h)
        for b, (w, h) in zip(truths, sizes, strict=True)
    ]
    return float(np.mean(shares)) if shares else 0.0


def saliency_image(evidence: Evidence, width: int, height: int) -> Float32Array:
    """Saliency at (height, width): the heatmap placed in its box, else boxes weighted by rank."""
    out = np.zeros((height, width), np.float32)
    w0, h0 = evidence.image_size
    sx, sy = width / max(1, w0), height / max(1, h0)
    placed = evidence.placed_heatmap(sx, sy)
    if placed is not None:
        left, top, big = placed
        bh, bw = big.shape
        ys, xs = slice(max(0, top), min(height, top + bh)), slice(max(0, left), min(width, left + bw))
        out[ys, xs] = big[ys.start - top : ys.stop - top, xs.start - left : xs.stop - left]
        return out
    for r in evidence.regions:
        x0, y0, x1, y1 = r.box
        region = out[round(y0 * sy) : round(y1 * sy), round(x0 * sx) : round(x1 * sx)]
        np.maximum(region, 1.0 / r.rank, out=region)
    return out


def deletion_curve(
    encoder: Encoder,
    image: Image.Image,
    query_vec: Float32Array,
    saliency: Float32Array,
    steps: int = 10,
    seed: int = 0,
) -> Float32Array:
    """Query scores as the most salient 0, 1/steps, ..., all of the image is blanked (median colour).

    Ties in saliency are broken at random so that a flat map is not read as "top-left first".
    """
    q = query_row(query_vec)
    rgb = np.asarray(image.convert("RGB"), np.uint8)
    h, w = rgb.shape[:2]
    fill = np.median(rgb.reshape(-1, 3), axis=0).astype(np.uint8)
    jitter = np.random.default_rng(seed).random(h * w) * 1e-6
    order = np.argsort(-(saliency.reshape(-1).astype(np.float64) + jitter), kind="stable")
    frames = []
    for k in range(steps + 1):
        flat = rgb.reshape(-1, 3).copy()
        flat[order[: round(k / steps * h * w)]] = fill
        frames.append(Image.fromarray(flat.reshape(h, w, 3), "RGB"))
    return (encoder.encode_images(frames) @ q).astype(np.float32)


def deletion_auc(curve: Float32Array) -> float | None:
    """Area under the curve scaled so the intact score is 1 and the blank score 0; None if they coincide."""
    start, end = float(curve[0]), float(curve[-1])
    if abs(start - end) < 1e-6:
        return None
    norm = (curve.astype(np.float64) - end) / (start - end)
    return float(np.sum((norm[1:] + norm[:-1]) / 2) / (len(curve) - 1))


def _small(image: Image.Image) -> Image.Image:
    scale = _DELETION_SIDE / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))


def evaluate(
    encoder: Encoder,
    method: str,
    evidence: Sequence[Evidence],
    images: Sequence[Image.Image],
    query_vecs: Sequence[Float32Array],
    truths: Sequence[Box],
    use: str = "box",
    steps: int = 10,
) -> QualityReport:
    """Pointing game and mean deletion AUC of one method's evidence over a set of cases."""
    aucs = []
    for i, (ev, image, q) in enumerate(zip(evidence, images, query_vecs, strict=True)):
        small = _small(image)
        sal = saliency_image(ev, small.width, small.height)
        auc = deletion_auc(deletion_curve(encoder, small, q, sal, steps, seed=i))
        if auc is not None:
            aucs.append(auc)
    return QualityReport(
        method,
        len(evidence),
        pointing_game(evidence, truths, use),
        float(np.mean(aucs)) if aucs else float("nan"),
    )
