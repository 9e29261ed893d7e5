"""Draw evidence on its image: numbered boxes with scores, a heatmap overlay, or both, as PNG.

The picture is drawn on the image as displayed (EXIF orientation applied, full size), the space
the boxes are in, so what a user sees lines up with the numbers in the JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from retrieval import imageio
from retrieval.errors import BadImage, ConfigError
from retrieval.evidence.types import Evidence
from retrieval.paths import display_path
from retrieval.types import Float32Array, UInt8Array

STYLES = ("boxes", "heatmap", "both")

#: Anchors of a perceptually ordered dark-blue → teal → yellow colour map (viridis-like).
_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32
)
#: Box colours by rank, chosen to stay visible on both light and dark photos.
_BOX_COLOURS = [(255, 48, 48), (255, 160, 0), (255, 230, 0), (0, 200, 255), (200, 80, 255)]


def colour_map(values: Float32Array) -> UInt8Array:
    """Values in [0, 1] to RGB by piecewise-linear interpolation between the anchors."""
    v = np.clip(np.nan_to_num(values.astype(np.float32)), 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.minimum(v.astype(np.int32), len(_ANCHORS) - 2)
    frac = (v - lo)[..., None]
    rgb = _ANCHORS[lo] * (1.0 - frac) + _ANCHORS[lo + 1] * frac
    return np.rint(rgb).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _overlay_heatmap(image: Image.Image, ev: Evidence, sx: float, sy: float) -> Image.Image:
    placed = ev.placed_heatmap(sx, sy)
    assert placed is not None
    left, top, values = placed
    colours = Image.fromarray(colour_map(values), "RGB")
    # Strong where the evidence is, faint elsewhere, so the photo stays readable under the map.
    alpha = Image.fromarray(np.rint(255 * (0.15 + 0.45 * np.clip(values, 0, 1))).astype(np.uint8), "L")
    layer = Image.new("RGB", image.size)
    mask = Image.new("L", image.size, 0)
    layer.paste(colours, (left, top))
    mask.paste(alpha, (left, top))
    return Image.composite(layer, image, mask)


def _draw_boxes(image: Image.Image, ev: Evidence, sx: float, sy: float) -> None:
    draw = ImageDraw.Draw(image)
    side = min(image.size)
    line = max(1, round(side / 160))
    font = _font(max(9, round(side / 28)))
    # Draw the best region last so it is on top where regions overlap.
    for region in reversed(ev.regions):
        colour = _BOX_COLOURS[(region.rank - 1) % len(_BOX_COLOURS)]
        x0, y0, x1, y1 = region.box
        box = (x0 * sx, y0 * sy, max(x0 * sx, x1 * sx - 1), max(y0 * sy, y1 * sy - 1))
        draw.rectangle(box, outline=colour, width=line)
        text = f"{region.rank} {region.score:.3f}"
        tl = draw.textbbox((box[0] + line, box[1] + line), text, font=font)
        draw.rectangle(tl, fill=(0, 0, 0))
        draw.text((box[0] + line, box[1] + line), text, fill=colour, font=font)


def render_evidence(image: Image.Image, evidence: Evidence, style: str = "both") -> Image.Image:
    """A copy of `image` with the evidence drawn; the image may be a resized view of the displayed one."""
    if style not in STYLES:
        raise ConfigError(f"unknown evidence style {style!r}; use {', '.join(STYLES)}")
    out = imageio.to_rgb(image).copy()
    w, h = evidence.image_size
    sx, sy = out.width / max(1, w), out.height / max(1, h)
    if style in ("heatmap", "both") and evidence.heatmap is not None and evidence.heatmap_box is not None:
        out = _overlay_heatmap(out, evidence, sx, sy)
    if style in ("boxes", "both"):
        _draw_boxes(out, evidence, sx, sy)
    return out


def write_evidence_pngs(
    paths: Sequence[str], evidence: Sequence[Evidence], out_dir: Path | str, style: str = "both"
) -> list[Path | None]:
    """One annotated PNG per hit in `out_dir`, named by rank; None where the image cannot be read."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path | None] = []
    for rank, (path, ev) in enumerate(zip(paths, evidence, strict=True), start=1):
        try:
            image = imageio.open_image(Path(path)).image
        except BadImage:
            written.append(None)
            continue
        target = out / f"{rank:03d}-{ev.hit_id}-{display_path(Path(path).stem)[:60]}.png"
        render_evidence(image, ev, style).save(target, format="PNG")
        written.append(target)
    return written
