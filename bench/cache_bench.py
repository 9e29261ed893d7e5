"""Whole-query result cache: a repeated search against the first time the same query is asked.

Indexes synthetic images with a randomly initialised CLIP of the chosen shape (`--arch vit-b-32`
by default: the text tower costs what a real ViT-B/32's does; the weights do not matter for
timing), then asks each of `--queries` distinct text queries twice, in the same process, through
`Searcher.embed_query` + `Searcher.search_vector` (what the card pipeline calls):

- first: the encoder runs and the index is searched (the calibration for confidence is fitted once
  per index version beforehand, by a warm-up query that is not counted);
- repeat: the same query again, answered from the cache (`cached: true`, no encoder call).

    .venv/bin/python bench/cache_bench.py                 # vit-b-32 shapes, 200 images, 50 queries
    .venv/bin/python bench/cache_bench.py --arch tiny
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import load_average, span
from PIL import Image, ImageDraw

from retrieval.collection import Collection
from retrieval.demo.tiny import make_clip
from retrieval.encoders import EncoderConfig, create_encoder
from retrieval.ingest import IngestConfig, ingest
from retrieval.search import Query, Searcher

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square"]


def _images(root: Path, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (160, 120), "white")
        d = ImageDraw.Draw(im)
        colour = COLOURS[i % len(COLOURS)]
        x = (i * 13) % 100
        (d.ellipse if (i // len(COLOURS)) % 2 else d.rectangle)([x, 20, x + 50, 80], fill=colour)
        im.save(root / f"img_{i:04d}.png")


def _ms(xs: list[float]) -> str:
    a = np.asarray(xs) * 1000
    return (
        f"p50 {np.percentile(a, 50):8.3f} ms   p99 {np.percentile(a, 99):8.3f} ms   mean {a.mean():8.3f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit-b-32", help="tiny, small or vit-b-32 (random weights)")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--queries", type=int, default=50)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    model = make_clip(tmp / "model", args.arch, seed=0)
    encoder = create_encoder(EncoderConfig(model=str(model), device="cpu"))
    _images(tmp / "images", args.images)
    with Collection(tmp / "data") as col:
        ingest(tmp / "images", col, encoder, IngestConfig(progress=False))
    searcher = Searcher.open(tmp / "data", encoder=encoder)
    texts = [
        f"a {COLOURS[i % 6]} {SHAPES[(i // 6) % 2]} number {i} on a white background"
        for i in range(args.queries)
    ]

    def ask(text: str) -> tuple[float, bool]:
        q = Query(text=text, top_k=12)
        t0 = time.perf_counter()
        vec = searcher.embed_query(q)
        result = searcher.search_vector(vec, q, kind=q.kind)
        return time.perf_counter() - t0, result.cached

    t0 = time.perf_counter()
    ask("warm-up: fits the confidence calibration of this index version")
    calibration_s = time.perf_counter() - t0
    first: list[float] = []
    repeat: list[float] = []
    with span() as sp:
        for text in texts:
            dt, cached = ask(text)
            assert not cached
            first.append(dt)
        for text in texts:
            dt, cached = ask(text)
            assert cached, "a repeated query was not answered from the cache"
            repeat.append(dt)
    print(f"# cache bench  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"# {platform.platform()}, python {platform.python_version()}, load average {load_average()}")
    print(
        f"# arch {args.arch}, {args.images} synthetic images (flat index), "
        f"{args.queries} distinct text queries, top 12"
    )
    print(f"warm-up query (encoder + search + calibration fit): {calibration_s * 1000:.1f} ms")
    print(f"first   (encoder + search + confidence): {_ms(first)}")
    print(f"repeat  (result cache)                 : {_ms(repeat)}")
    print(f"speed-up of the median: {np.median(first) / np.median(repeat):.0f}x")
    print(f"other processes' CPU share meanwhile: {sp.others_text()}")
    searcher.close()


if __name__ == "__main__":
    main()
