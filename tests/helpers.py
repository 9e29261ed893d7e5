"""Helpers the tests import: where the project's files are, synthetic photos, and an offline environment."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

#: The repository's root, whatever folder a test sits in.
ROOT = Path(__file__).resolve().parent.parent
#: What users see (CLI tables, pages) is checked against these files.
SNAPSHOTS = ROOT / "tests" / "snapshots"
#: Real captioned photos, beside the repository when the project's shared data is there.
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]


def draw_shape(path: Path, i: int, size: tuple[int, int] = (96, 72), fmt: str | None = None) -> Path:
    """A distinct synthetic photo: shape, colour and position vary with i."""
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    c = COLOURS[i % len(COLOURS)]
    x = (i * 7) % max(1, size[0] - 40)
    if (i // len(COLOURS)) % 2:
        d.ellipse([x, 10, x + 36, 46], fill=c)
    else:
        d.rectangle([x, 20, x + 30, 50], fill=c)
    d.text((2, size[1] - 12), str(i), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def make_folder(root: Path, n: int, start: int = 0) -> list[Path]:
    return [draw_shape(root / f"img_{i:04d}.jpg", i) for i in range(start, start + n)]


def env_offline() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def shape_caption(i: int) -> str:
    """What shape `i` of `draw_shape` shows, in words: "a red square", "a blue circle"..."""
    shape = "circle" if (i // len(COLOURS)) % 2 else "square"
    return f"a {COLOURS[i % len(COLOURS)]} {shape}"


def numbered_caption(i: int) -> str:
    """A caption that names one image only, for tests that look a hit up by its caption."""
    return f"shape number {i}"


def write_captions(images: Path, files: list[Path], caption: Callable[[int], str] = shape_caption) -> Path:
    """A captions.jsonl beside the images, one dataset caption each, as a user's folder would carry."""
    path = images / "captions.jsonl"
    path.write_text(
        "".join(json.dumps({"image": p.name, "captions": [caption(i)]}) + "\n" for i, p in enumerate(files))
    )
    return path


def index_shapes(
    root: Path, clip_dir: Path, n: int, caption: Callable[[int], str] = shape_caption
) -> tuple[Path, Path, list[Path]]:
    """The shared indexed collection: `n` shapes with captions, indexed by `clearsight index` itself.

    Returns (images folder, data dir, image files).
    """
    from typer.testing import CliRunner

    from explainer.cli.app import app
    from explainer.settings import get_settings

    images, data = root / "images", root / "data"
    files = make_folder(images, n)
    write_captions(images, files, caption)
    r = CliRunner().invoke(app, ["index", str(images), "-m", str(clip_dir), "--data-dir", str(data), "-q"])
    assert r.exit_code == 0, r.output
    get_settings.cache_clear()  # the test may set its own environment next; index read the settings
    return images, data, files


def textures(root: Path, n: int) -> list[Path]:
    """Smooth random colour fields: unlike the shape scenes, the tiny test CLIP keeps them apart (the
    near-duplicate tests need copies that stand out from different pictures)."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        cells = np.random.default_rng(i).integers(0, 256, size=(6, 8, 3)).astype(np.uint8)
        path = root / f"img_{i:04d}.jpg"
        Image.fromarray(cells).resize((96, 72), Image.Resampling.BICUBIC).save(path, quality=92)
        out.append(path)
    return out
