"""Measure the near-duplicate threshold: copies of real photos against different photos, per model.

Each of N photos gets three copies a photo library really holds: resized to half (JPEG quality 85),
recompressed hard (quality 30), and centre-cropped to 90% of each side. Originals and copies are
encoded exactly as ingest encodes them. A pair is a true duplicate when both images come from one
photo; every other pair is a different photo. For each cosine threshold the bench prints pair precision
and recall (and the recall of each kind of copy against its original), and the highest cosine between
two different photos against the lowest between two copies. It does the same at the collection
threshold `clearsight duplicates` and search folding use by default (`collapse_threshold`), computed
on the originals alone (a library of distinct photos) and on the whole set.

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
from retrieval.duplicates import SEPARATION_SAMPLE, collapse_threshold, similar_pairs
from retrieval.encoders import EncoderConfig, create_encoder
from retrieval.types import Float32Array

THRESHOLDS = (0.80, 0.85, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
#: Each photo's files, in this order: the original, then its copies.
KINDS = ("original", "half", "q30", "crop")


def copies(src: Path, out: Path) -> list[Path]:
    """The original and three copies of it, as files."""
    with Image.open(src) as opened:
        im = opened.convert("RGB")
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
        # encode_images takes the pixel path ingest takes (uint8 crops, normalised on the device)
        vectors = encoder.encode_images([imageio.open_image(p).image for p in paths], batch_size=32)
        encoder.close()
    report(vectors, len(groups), args.model, describe(coco, len(files)))


def evenly(vectors: Float32Array, limit: int) -> Float32Array:
    """At most `limit` rows spread evenly, as the catalog samples a collection for its threshold."""
    if len(vectors) <= limit:
        return vectors
    return vectors[np.linspace(0, len(vectors) - 1, limit).round().astype(int)]


def report(vectors: Float32Array, photos: int, model: str, data: str) -> None:
    """Precision and recall of fixed thresholds and of the collection threshold, overall and per kind of
    copy; `vectors` are the photos' [original, half, q30, crop] rows, photo by photo."""
    owner = np.repeat(np.arange(photos), len(KINDS))
    kind = np.tile(np.arange(len(KINDS)), photos)
    sims = vectors @ vectors.T
    upper = np.triu_indices(len(vectors), k=1)
    same = owner[upper[0]] == owner[upper[1]]
    pair_sims = sims[upper]
    print(f"data: {data}, {len(KINDS) - 1} copies each; model: {model}")
    print(f"lowest cosine between copies of one photo: {pair_sims[same].min():.4f}")
    print(f"highest cosine between different photos: {pair_sims[~same].max():.4f}")
    print(f"median cosine between different photos: {np.median(pair_sims[~same]):.4f}")
    print(f"copy pairs: {int(same.sum())} of {len(pair_sims)} pairs ({100 * same.mean():.2f}%)")
    # The collection threshold as the product computes it (collapse_threshold on a sample of at most
    # SEPARATION_SAMPLE images): on a library of distinct photos (the originals), and on this whole set
    # taken as one collection, where copies are a far larger share of the pairs than in a real library.
    originals = vectors[kind == 0]
    guards = {
        "collection threshold, originals only": collapse_threshold(evenly(originals, SEPARATION_SAMPLE)),
        "collection threshold, whole set": collapse_threshold(evenly(vectors, SEPARATION_SAMPLE)),
    }
    for name, value in guards.items():
        print(f"{name}: {value:.4f}")
    head = " | ".join(f"recall {k}" for k in KINDS[1:])
    print(f"| threshold | pairs found | precision | recall | {head} |")
    print("|---|---:|---:|---:|" + "---:|" * (len(KINDS) - 1))
    rows = [(f"{t:.2f}", t) for t in THRESHOLDS] + [(f"{n} ({v:.4f})", v) for n, v in guards.items()]
    for label, t in rows:
        found = {(i, j) for i, j, _ in similar_pairs(vectors, t)}
        true = sum(1 for i, j in found if owner[i] == owner[j])
        precision = true / len(found) if found else 1.0
        recall = true / int(same.sum())
        per_kind = []
        for k in range(1, len(KINDS)):  # the original and its copy of kind k
            wanted = {(i, i + k) for i in range(0, len(vectors), len(KINDS))}
            per_kind.append(f"{len(wanted & found) / len(wanted):.3f}")
        print(f"| {label} | {len(found)} | {precision:.3f} | {recall:.3f} | {' | '.join(per_kind)} |")


if __name__ == "__main__":
    main()
