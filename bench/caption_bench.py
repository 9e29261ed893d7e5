"""Captioning throughput: BLIP-base batched vs one image at a time, in one process on the same images.

    .venv/bin/python bench/caption_bench.py                      # 8 images, batch 8, 20 tokens, CPU
    .venv/bin/python bench/caption_bench.py --device cuda        # on a GPU, in half precision
    .venv/bin/python bench/caption_bench.py --model DIR --beams 3
    .venv/bin/python bench/caption_bench.py --precision fp32,auto,int8   # batched, one row per precision

Without --model the captioner is Salesforce/blip-image-captioning-base's architecture with random
weights (`retrieval.demo.blip.make_blip(..., "base")`, vocabulary of the real size), loaded through
`create_captioner` like downloaded weights: speed does not depend on the weights' values. Every
caption is forced to exactly --tokens new tokens (min = max), so random weights cannot stop early
and both modes do the same work. Images are decoded before timing: this measures the model.

With one --precision (default fp32) it compares batched with one image at a time; with several it
captions batched in each (`auto` resolved as the captioner resolves it on this machine) and prints each
one's speed against the first. All modes run in the same process, one after the other (the order
alternates over --rounds), and
each prints the share of the machine that other processes used meanwhile, since on a shared
2-core machine a disturbed measurement is otherwise invisible.
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
from dataclasses import dataclass
from pathlib import Path

from data import add_data_option, coco_mini, describe
from PIL import Image, ImageDraw

from explainer.captions.captioner import (
    Captioner,
    CaptionerConfig,
    GenerationSettings,
    create_captioner,
)
from retrieval.demo.blip import make_blip


@dataclass(frozen=True)
class Timing:
    images: int
    wall: float
    own_cpu: float  # CPU seconds of this process
    others: float  # share of the machine other processes used meanwhile (0..1); -1 when unknown

    @property
    def rate(self) -> float:
        return self.images / self.wall if self.wall > 0 else float("inf")

    def line(self, label: str) -> str:
        others = f"{self.others:.0%}" if self.others >= 0 else "n/a"
        return (
            f"{label:<22} {self.rate:7.3f} img/s  ({self.images} in {self.wall:6.1f} s; "
            f"this process {self.own_cpu / self.wall:.2f} cores, other processes {others} of the machine)"
        )


def _machine_busy_seconds() -> float | None:
    """Non-idle CPU seconds of the whole machine since boot (Linux /proc/stat)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def timed(n: int, work: Callable[[], object], sync: Callable[[], None]) -> Timing:
    busy0, cpu0, t0 = _machine_busy_seconds(), os.times(), time.perf_counter()
    work()
    sync()
    wall = time.perf_counter() - t0
    busy1, cpu1 = _machine_busy_seconds(), os.times()
    own = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    others = -1.0
    if busy0 is not None and busy1 is not None:
        others = min(1.0, max(0.0, (busy1 - busy0 - own) / (wall * (os.cpu_count() or 1))))
    return Timing(n, wall, own, others)


def load_images(n: int, coco: Path) -> tuple[list[Image.Image], str]:
    """`n` photos from coco-mini, topped up with drawn pictures when it holds fewer (and said so)."""
    files = sorted((coco / "images").rglob("*.jpg"))[:n]
    images = [Image.open(f).convert("RGB") for f in files]
    for i in range(len(images), n):  # drawn pictures only when coco-mini is short
        im = Image.new("RGB", (640, 480), (40 * i % 256, 90, 160))
        ImageDraw.Draw(im).ellipse([50 + 20 * i, 60, 300 + 20 * i, 330], fill=(230, 200 - 10 * i, 40))
        images.append(im)
    source = describe(coco, len(files)) + (f" + {n - len(files)} drawn pictures" if len(files) < n else "")
    return images, source


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8, help="images captioned by each mode")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=20, help="new tokens per caption (forced: min = max)")
    ap.add_argument("--beams", type=int, default=1, help="1 = greedy (the default setting)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat both modes; the best round of each counts")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (GPU: half precision)")
    ap.add_argument("--model", default=None, help="a BLIP directory or hub id instead of random BLIP-base")
    ap.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, fp16, int8 (CPU), auto")
    add_data_option(ap)
    args = ap.parse_args(argv)
    coco = coco_mini(args.data)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"CUDA is not available on this machine: the {args.device} path was not run.")
        return 0
    sync: Callable[[], None] = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    command = "python bench/caption_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"# {command}")
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.2f}"
    )
    generation = GenerationSettings(
        num_beams=args.beams, max_new_tokens=args.tokens, min_new_tokens=args.tokens, repetition_penalty=1.0
    )
    with tempfile.TemporaryDirectory(prefix="caption-bench-") as tmp:
        model = args.model
        if model is None:
            t0 = time.perf_counter()
            model = str(make_blip(Path(tmp) / "blip-base-random", "base", seed=0))
            print(f"# built random-weight BLIP-base in {time.perf_counter() - t0:.0f} s")
        images, source = load_images(args.images, coco)
        print(
            f"# {source}; {args.tokens} new tokens per caption, beams {args.beams}, "
            f"batch {args.batch_size}, device {args.device}"
        )
        if len(precisions) > 1:
            return compare_precisions(model, args, generation, images, precisions, sync)
        cfg = CaptionerConfig(
            model=model,
            device=args.device,
            batch_size=args.batch_size,
            generation=generation,
            precision=precisions[0] if precisions else None,
        )
        captioner: Captioner = create_captioner(cfg)
        captioner.caption(images[:1])  # warm-up: first-call allocations are not throughput

        best: dict[str, Timing] = {}
        for r in range(args.rounds):
            modes = ["batched", "one at a time"]
            for mode in modes if r % 2 == 0 else modes[::-1]:
                if mode == "batched":
                    t = timed(len(images), lambda: captioner.caption(images), sync)
                else:
                    t = timed(len(images), lambda: [captioner.caption([im]) for im in images], sync)
                print(t.line(f"round {r + 1} {mode}"))
                if mode not in best or t.rate > best[mode].rate:
                    best[mode] = t
        captioner.close()

    b, s = best["batched"], best["one at a time"]
    print(f"batched (batch {args.batch_size}):   {b.rate:.3f} img/s  ({1 / b.rate:.2f} s per image)")
    print(f"one at a time:        {s.rate:.3f} img/s  ({1 / s.rate:.2f} s per image)")
    print(f"batched / one at a time: {b.rate / s.rate:.2f}x")
    return 0


def compare_precisions(
    model: str,
    args: argparse.Namespace,
    generation: GenerationSettings,
    images: list[Image.Image],
    precisions: list[str],
    sync: Callable[[], None],
) -> int:
    """Batched captioning in each precision, the models loaded side by side so rounds can alternate."""
    captioners: dict[str, Captioner] = {}
    for p in precisions:
        cfg = CaptionerConfig(
            model=model, device=args.device, batch_size=args.batch_size, generation=generation, precision=p
        )
        cap = create_captioner(cfg)
        label = p if p != "auto" else f"auto ({getattr(cap, 'precision', '?')})"
        captioners[label] = cap
        cap.caption(images[:1])  # warm-up
    best: dict[str, Timing] = {}
    texts: dict[str, list[str]] = {}
    for r in range(args.rounds):
        order = list(captioners) if r % 2 == 0 else list(captioners)[::-1]
        for label in order:
            cap = captioners[label]

            def work(cap: Captioner = cap, label: str = label) -> None:
                texts[label] = cap.caption(images)

            t = timed(len(images), work, sync)
            print(t.line(f"round {r + 1} {label}"))
            if label not in best or t.rate > best[label].rate:
                best[label] = t
    for cap in captioners.values():
        cap.close()
    first = next(iter(best))
    print(f"\n| precision | img/s | s per image | vs {first} | captions equal to {first}'s |")
    print("|---|---:|---:|---:|---:|")
    for label, t in best.items():
        same = sum(a == b for a, b in zip(texts[label], texts[first], strict=True))
        print(
            f"| {label} | {t.rate:.3f} | {1 / t.rate:.2f} | {t.rate / best[first].rate:.2f}x | "
            f"{same}/{len(images)} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
