"""Measure the near-duplicate threshold: copies of real photos against different photos, per model.

Each of N photos gets three copies a photo library really holds: resized to half (JPEG quality 85),
recompressed hard (quality 30), and centre-cropped to 90% of each side. Originals and copies are
encoded exactly as ingest encodes them. A pair is a true duplicate when both images come from one
photo; every other pair is a different photo. For each cosine threshold the bench prints pair precision
and recall, and the highest cosine between two different photos against the lowest between two copies.

    python bench/duplicates_bench.py --data ../shared/data/coco-mini --n 120 --model random-vit-b-32

`--model` takes a local model directory, or `random-vit-b-32` / `tiny` for a CLIP of that shape with
random weights (no weights can be downloaded here); say which one every figure is of.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from data import add_data_option, coco_mini, describe
from PIL import Image

from retrieval import imageio
from retrieval.demo.tiny import make_clip
from retrieval.duplicates import similar_pairs
from retrieval.encoders import EncoderConfig, create_encoder

THRESHOLDS = (0.80, 0.85, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)


def copies(src: Path, out: Path) -> list[Path]:
    """The original and three copies of it, as files."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        paths = [out / f"{src.stem}-orig.jpg", out / f"{src.stem}-half.jpg", out / f"{src.stem}-q30.jpg"]
        im.save(paths[0], quality=95)
        im.resize((w // 2, h // 2), Image.Resampling.LANCZOS).save(paths[1], quality=85)
        im.save(paths[2], quality=30)
        dx, dy = w // 20, h // 20
        paths.append(out / f"{src.stem}-crop.jpg")
        im.crop((dx, dy, w - dx, h - dy)).save(paths[3], quality=90)
    return paths


def model_dir(name: str, tmp: Path) -> str:
    if name in ("random-vit-b-32", "tiny"):
        return str(make_clip(tmp / name, "vit-b-32" if name == "random-vit-b-32" else "tiny", seed=0))
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=120, help="photos to copy")
    ap.add_argument("--model", default="random-vit-b-32")
    add_data_option(ap)
    args = ap.parse_args()
    coco = coco_mini(args.data)  # exits 2, saying where it looked, when the photos are missing
    files = sorted((coco / "images").rglob("*.jpg"))[: args.n]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "copies").mkdir()
        groups = [copies(f, tmp / "copies") for f in files]
        encoder = create_encoder(
            EncoderConfig(model=model_dir(args.model, tmp), device="cpu", precision="fp32")
        )
        paths = [p for g in groups for p in g]
        pixels = np.stack([encoder.preprocess([imageio.open_image(p).image])[0] for p in paths])
        vectors = np.concatenate(
            [encoder.encode_pixels(pixels[i : i + 32]) for i in range(0, len(pixels), 32)]
        )
        encoder.close()
    owner = np.repeat(np.arange(len(groups)), 4)
    sims = vectors @ vectors.T
    upper = np.triu_indices(len(paths), k=1)
    same = owner[upper[0]] == owner[upper[1]]
    pair_sims = sims[upper]
    print(f"data: {describe(coco, len(files))}, 3 copies each; model: {args.model}")
    print(f"lowest cosine between copies of one photo: {pair_sims[same].min():.4f}")
    print(f"highest cosine between different photos: {pair_sims[~same].max():.4f}")
    print(f"median cosine between different photos: {np.median(pair_sims[~same]):.4f}")
    print("| threshold | pairs found | precision | recall |")
    print("|---:|---:|---:|---:|")
    for t in THRESHOLDS:
        found = {(i, j) for i, j, _ in similar_pairs(vectors, t)}
        true = sum(1 for i, j in found if owner[i] == owner[j])
        precision = true / len(found) if found else 1.0
        recall = true / int(same.sum())
        print(f"| {t:.2f} | {len(found)} | {precision:.3f} | {recall:.3f} |")


if __name__ == "__main__":
    main()
