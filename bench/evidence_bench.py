"""Region evidence speed: grid 3x3 batched vs hit by hit, dense vs grid, dense from stored patch features.

ViT-B/32 architecture (random weights: speed does not depend on them), top-K hits of real photos
(coco-mini: `--data DIR` or $CLEARSIGHT_BENCH_DATA; missing, the bench says so and exits 2; drawn
640x480 pictures only with `--drawn`), one text query, all modes in one process.
Each mode runs once to warm up, then `--rounds` times with the order rotated per round; the best
round counts, and each line says how much of the machine other processes used meanwhile.
Decoding the hit files is part of every timing except "stored", which needs no pixels at all.

    .venv/bin/python bench/evidence_bench.py                 # 10 hits, 3 rounds
    .venv/bin/python bench/evidence_bench.py --hits 10 --rounds 2

Floors (printed PASS/FAIL): batched grid >= 1.5x the per-hit loop; dense >= 5x faster than grid 3x3
(batched); evidence from stored patch features for 10 hits <= 50 ms.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from data import MISSING, add_data_option, coco_mini, describe
from machine import load_average, span
from PIL import Image, ImageDraw

from retrieval.demo.tiny import make_clip
from retrieval.encoders import Encoder, EncoderConfig, create_encoder
from retrieval.evidence import (
    EvidenceConfig,
    EvidenceTarget,
    PatchStore,
    dense_evidence,
    grid_evidence,
    grid_evidence_per_hit,
    store_patch_features,
    stored_evidence,
)
from retrieval.types import Float32Array


class OneAtATime:
    """The encoder, but every crop in its own forward pass: the naive per-region loop, for context."""

    def __init__(self, encoder: Encoder) -> None:
        self._encoder = encoder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def encode_pixels(self, pixels: Float32Array) -> Float32Array:
        return np.concatenate([self._encoder.encode_pixels(pixels[i : i + 1]) for i in range(len(pixels))])


def hit_images(n: int, coco: Path) -> list[Path]:
    """`n` coco-mini photos; too few is missing data, said and exited on, never silently replaced."""
    found = sorted((coco / "images").rglob("*.jpg"))
    if len(found) < n:
        where = coco / "images"
        print(f"bench data missing: {n} photos asked for, {len(found)} under {where}", file=sys.stderr)
        raise SystemExit(MISSING)
    return found[:n]


def drawn_images(n: int, tmp: Path) -> list[Path]:
    """Drawn 640x480 pictures, only when asked for with --drawn (the header then says so)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        im = Image.new("RGB", (640, 480), tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = (int(v) for v in rng.integers(0, 560, 2))
            draw.ellipse(
                (x, y % 400, x + 80, y % 400 + 80), fill=tuple(int(v) for v in rng.integers(0, 255, 3))
            )
        paths.append(tmp / f"hit_{i:02d}.jpg")
        im.save(paths[-1], quality=90)
    return paths


def model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    cached = Path(tempfile.gettempdir()) / "clearsight-bench-vit-b-32"
    if not (cached / "config.json").exists():
        make_clip(cached, "vit-b-32", seed=0)
    return cached


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hits", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", help="model directory [default: ViT-B/32 shapes, random weights]")
    ap.add_argument("--device", default="cpu")
    add_data_option(ap)
    ap.add_argument("--drawn", action="store_true", help="measure on drawn 640x480 pictures, not photos")
    args = ap.parse_args()
    coco = None if args.drawn else coco_mini(args.data)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"CUDA is not available on this machine: the {args.device} path was not run.")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="evidence-bench-"))
    encoder = create_encoder(EncoderConfig(model=str(model_dir(args.model)), device=args.device))
    paths = drawn_images(args.hits, tmp) if coco is None else hit_images(args.hits, coco)
    data = f"{args.hits} drawn 640x480 pictures (--drawn)" if coco is None else describe(coco, args.hits)
    targets = [EvidenceTarget.from_path(i, p, key=f"{i:04d}bench") for i, p in enumerate(paths)]
    sizes = sorted({t.size() for t in targets})
    query = encoder.encode_texts(["a dog on a beach"])
    grid3 = EvidenceConfig(grids=(3,))
    dense = EvidenceConfig()
    store = PatchStore(tmp / "data", encoder.info)
    with span() as stored_span:
        report = store_patch_features(encoder, store, targets, dense)
    bare = [EvidenceTarget(t.id, t.width, t.height, key=t.key) for t in targets]  # catalog sizes, no pixels

    modes: dict[str, Callable[[], object]] = {
        "grid 3x3 batched": lambda: grid_evidence(encoder, query, targets, grid3),
        "grid 3x3 per hit": lambda: grid_evidence_per_hit(encoder, query, targets, grid3),
        "dense": lambda: dense_evidence(encoder, query, targets, dense),
    }
    best: dict[str, float] = {}
    others: dict[str, list[str]] = {}
    for fn in modes.values():
        fn()  # warm-up
    names = list(modes)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            with span() as s:
                modes[name]()
            best[name] = min(best.get(name, float("inf")), s.wall)
            others.setdefault(name, []).append(s.others_text())
    # context only, measured once (it is slow): every crop in its own forward pass
    with span() as s:
        grid_evidence_per_hit(OneAtATime(encoder), query, targets, grid3)
    best["grid 3x3 per region (once)"], others["grid 3x3 per region (once)"] = s.wall, [s.others_text()]
    names.append("grid 3x3 per region (once)")
    stored_times = []
    stored_evidence(encoder, query, bare, dense, store)
    for _ in range(30):
        t0 = time.perf_counter()
        stored_evidence(encoder, query, bare, dense, store)
        stored_times.append(time.perf_counter() - t0)

    n = len(targets)
    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}"
    )
    print(f"# command: {shlex.join([sys.executable.split('/')[-1], *sys.argv])}")
    print(
        f"# model: {encoder.info.model_id} ({encoder.info.image_size}px, patch {encoder.info.patch_size}); "
        f"{n} hits: {data}, sizes {sizes[:3]}..."
    )
    print(f"# load average at the end: {load_average()}")
    print("| mode | ms for all hits | ms per hit | others' CPU share per round |")
    print("|---|---:|---:|---|")
    for name in names:
        print(
            f"| {name} | {best[name] * 1000:.0f} | {best[name] * 1000 / n:.0f} | {', '.join(others[name])} |"
        )
    med = float(np.median(stored_times)) * 1000
    print(
        f"| dense from stored patch features | {med:.1f} (median of 30; best {min(stored_times) * 1000:.1f}) "
        f"| {med / n:.2f} | |"
    )
    print(
        f"stored patch features: {report.written} images in {stored_span.wall:.1f} s, "
        f"{report.bytes_per_image:.0f} bytes per image on disk (int8, {store.disk_bytes()} bytes in all)"
    )
    ratio_batch = best["grid 3x3 per hit"] / best["grid 3x3 batched"]
    ratio_dense = best["grid 3x3 batched"] / best["dense"]
    ratio_region = best["grid 3x3 per region (once)"] / best["grid 3x3 batched"]
    floors = [
        (f"batched grid vs per-hit loop: {ratio_batch:.2f}x (floor 1.5x)", ratio_batch >= 1.5),
        (f"dense vs grid 3x3 batched: {ratio_dense:.1f}x faster (floor 5x)", ratio_dense >= 5),
        (f"stored patch features, {n} hits: {med:.1f} ms (floor 50 ms)", med <= 50),
    ]
    print(f"(context: batched grid vs one forward pass per region: {ratio_region:.2f}x)")
    for text, ok in floors:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    print("GPU: not run (no CUDA device on this machine).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
