"""Time to a complete first page at real model sizes: a cold page of uncaptioned cards, its captions, and a
second page while the background captioner runs.

    .venv/bin/python bench/page_bench.py                 # 40 photos, a page of 12, 20 tokens per caption
    .venv/bin/python bench/page_bench.py --images 24 --top-k 8

ViT-B/32 and BLIP-base shapes with random weights (`make_clip(..., "vit-b-32")`, `make_blip(..., "base")`),
loaded through the product's own code: speed does not depend on the weights' values. Captions are forced to
exactly --tokens new tokens (min = max) so random weights cannot stop early. The app runs in this process
(FastAPI's TestClient, the offline explainer): the figures are the server's work, not the network's.

Three servers over the same collection, one after the other: captions off (the page as it was); on, with
the background off (a cold page on an idle worker); on, with the background at work. Reported: time to the
page in the first two (captions must not hold it), time to the first and to the last of the page's captions
(asked as the page's script asks, POST /api/captions), and the time to a page while the background works.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from data import add_data_option, coco_mini, describe
from fastapi.testclient import TestClient
from PIL import Image

from explainer.server import create_app
from explainer.settings import Settings
from retrieval import Collection, EncoderConfig, IngestConfig, create_encoder
from retrieval.demo.blip import make_blip
from retrieval.demo.tiny import make_clip
from retrieval.ingest import ingest

QUERIES = ("a dog on a couch", "a plate of food on a table", "a person riding a bike")


def _photos(folder: Path, n: int, coco: Path) -> str:
    folder.mkdir(parents=True)
    files = sorted((coco / "images").rglob("*.jpg"))[:n]
    for f in files:
        Image.open(f).convert("RGB").save(folder / f.name, quality=90)
    return describe(coco, len(files))


def _settings(data: Path, tmp: Path, **values: Any) -> Settings:
    base: dict[str, Any] = {
        "data_dir": data,
        "thumb_dir": tmp / "thumbs",
        "explain_backend": "offline",
        "reload_interval_s": 0.0,
        "allowed_hosts": ["testserver"],
    }
    return Settings(_env_file=None, **{**base, **values})  # type: ignore[call-arg]


def _search(client: TestClient, text: str, top_k: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    r = client.post("/api/search", json={"text": text, "top_k": top_k, "explain": False})
    r.raise_for_status()
    return time.perf_counter() - t0, [x["id"] for x in r.json()["results"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--top-k", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16", "auto"], help="the servers' models'"
    )
    add_data_option(ap)
    args = ap.parse_args(argv)
    coco = coco_mini(args.data)  # exits 2, saying where it looked, when the photos are missing

    import torch

    print(f"# python bench/page_bench.py {' '.join(argv or [])}")
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="page-bench-") as name:
        tmp = Path(name)
        source = _photos(tmp / "photos", args.images, coco)
        clip = make_clip(tmp / "clip", "vit-b-32", seed=0)
        blip = make_blip(tmp / "blip", "base", seed=0)
        encoder = create_encoder(EncoderConfig(model=str(clip), device="cpu", precision="fp32"))
        with Collection(tmp / "data") as c:
            ingest(tmp / "photos", c, encoder, IngestConfig(progress=False))
        encoder.close()
        print(
            f"# {source}; ViT-B/32 + BLIP-base, random weights, {args.tokens} tokens each, {args.precision}"
        )
        tokens = {"caption_max_new_tokens": args.tokens, "caption_min_new_tokens": args.tokens}

        off = _settings(tmp / "data", tmp, server_captions="off", precision=args.precision)
        with TestClient(create_app(off)) as client:
            _search(client, "warm-up", args.top_k)
            page_off, _ = _search(client, QUERIES[0], args.top_k)

        def on(background: bool) -> Settings:
            return _settings(
                tmp / "data",
                tmp,
                server_captions="on",
                caption_model=str(blip),
                caption_background=background,
                precision=args.precision,
                **tokens,
            )

        def ready(client: TestClient) -> None:
            while not client.get("/api/captions/status").json()["ready"]:  # as a server up for a while
                time.sleep(0.2)

        # The cold page on an idle worker (background off, so no background image is in progress)...
        with TestClient(create_app(on(False))) as client:
            ready(client)
            _search(client, "warm-up", args.top_k)
            t0 = time.perf_counter()
            page_on, ids = _search(client, QUERIES[0], args.top_k)
            first = last = None
            want = list(ids)
            while want:
                body = client.post("/api/captions", json={"ids": want, "wait_s": 30}).json()
                now = time.perf_counter() - t0
                got = [c["id"] for c in body["captions"] if not c["pending"]]
                if got and first is None:
                    first = now
                want = [i for i in want if i not in got]
                last = now
        # ...then another page on a server whose background captioner is at work.
        with TestClient(create_app(on(True))) as client:
            ready(client)
            _search(client, "warm-up", args.top_k)
            time.sleep(1.5)  # past the worker's quiet second
            progress = client.get("/api/captions/status").json()
            page_bg, _ = _search(client, QUERIES[1], args.top_k)

    n = len(ids)
    print("\n| what | seconds |")
    print("|---|---:|")
    print(f"| page of {n}, captions off | {page_off:.2f} |")
    print(f"| page of {n} uncaptioned cards, captions on | {page_on:.2f} ({page_on / page_off:.2f}x) |")
    print(f"| first caption of the page | {first:.2f} |")
    print(f"| all {n} captions of the page | {last:.2f} ({(last or 0) / n:.2f} per card) |")
    print(
        f"| another page while the background captions ({progress['done']}/{progress['total']} done) | "
        f"{page_bg:.2f} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
