"""Ingest throughput: the encoder's own forward rate vs a naive loop vs the real `ingest` pipeline.

All three run in one process on the same model and the same files, so their ratios are fair even
on a 2-core machine shared with other work, where absolute figures drift. To tame that drift the
three measurements are repeated in `--rounds` rounds (the order reversed every other round) and
each keeps its best round; every round is printed, with the share of the machine's CPU that other
processes used meanwhile (from /proc/stat), so a disturbed round is visible rather than hidden.

    .venv/bin/python bench/ingest_bench.py                  # coco-mini photos, up to 200 (--data DIR)
    .venv/bin/python bench/ingest_bench.py --synthetic 200  # ... and 200 synthetic 640x480 JPEGs

The model is a random-weight CLIP with ViT-B/32 shapes (`retrieval.demo.tiny.make_clip`): speed does
not depend on the weights' values. Floors (issue targets): pipeline >= 1.6x naive and pipeline >=
85% of the forward rate at the same batch size. They print PASS/FAIL; the exit code stays 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from data import MISSING, add_data_option, coco_mini
from machine import load_average, span
from PIL import Image, ImageDraw, ImageFilter

from retrieval.encoders import Encoder
from retrieval.types import Float32Array

NAIVE_FLOOR = 1.6  # pipeline / naive
FORWARD_FLOOR = 0.85  # pipeline / encoder forward
BUSY = 0.10  # other processes' CPU share above which a measurement is flagged as unreliable
KINDS = ("forward", "forward1", "naive", "pipeline")
FORWARD1_IMAGES = 32  # batch-1 forward is context only: a few images suffice


# -- measuring under other people's load ----------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One timed measurement: images per second, and how busy the rest of the machine was."""

    n: int
    wall: float
    own_cpu: float  # CPU seconds of this process (all threads)
    others: float  # share of the machine's CPU used by other processes meanwhile (0..1), -1 unknown
    stages: dict[str, float] = field(default_factory=dict)  # seconds inside instrumented calls

    @property
    def rate(self) -> float:
        return self.n / self.wall if self.wall > 0 else float("inf")

    def describe(self) -> str:
        others = f"{self.others:4.0%}" if self.others >= 0 else " n/a"
        return (
            f"{self.rate:8.2f} img/s  ({self.n} in {self.wall:5.1f} s; this process "
            f"{self.own_cpu / self.wall:4.2f} cores; other processes {others} of the machine)"
        )


@dataclass
class Meter:
    n: int = 0
    sample: Sample | None = None


@contextmanager
def metered(n: int) -> Iterator[Meter]:
    meter = Meter(n)
    with span() as sp:
        yield meter
    meter.sample = Sample(meter.n, sp.wall, sp.own_cpu, sp.others)


class StageClock:
    """Seconds spent inside wrapped functions, summed across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def timed(*args: object, **kwargs: object) -> object:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.totals[name] += time.perf_counter() - t0

        return timed


@contextmanager
def instrumented(enc: Encoder) -> Iterator[StageClock]:
    """Time the pipeline's stages from outside (no change to the library): the forward pass, decoding
    and preprocessing (in worker threads), and the final index sync. Undone on exit."""
    from retrieval import decode_pool, imageio
    from retrieval import ingest as ingest_mod

    clock = StageClock()
    targets: list[tuple[object, str, str]] = [
        (enc, "encode_pixels", "forward"),
        (enc, "encode_staged", "forward"),
        (enc, "stage", "stage"),
        (enc, "preprocess", "preprocess"),
        (decode_pool, "preprocess_uint8", "preprocess"),
        (imageio, "decode", "decode"),
        (ingest_mod, "sync_indexes", "index sync"),
    ]
    targets = [t for t in targets if hasattr(t[0], t[1])]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in targets]
    try:
        for obj, attr, name in targets:
            setattr(obj, attr, clock.wrap(name, getattr(obj, attr)))
        yield clock
    finally:
        for obj, attr, original in saved:
            if obj is enc:
                delattr(obj, attr)  # drop the instance attribute, the class method shows again
            else:
                setattr(obj, attr, original)


# -- inputs ---------------------------------------------------------------------------------------
def find_images(root: Path) -> list[Path]:
    from retrieval.ingest import walk

    return [Path(f.path) for f in walk(root) if f.error is None]


def write_synthetic(out: Path, n: int, seed: int = 0, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """Photo-like JPEGs: smooth colour fields, soft shapes and sensor noise, so JPEG decoding costs
    about what it costs on real photos (flat colour would decode unrealistically fast)."""
    rng = np.random.default_rng(seed)
    w, h = size
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i in range(n):
        low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(low, "RGB").resize((w, h), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(4, 12))):
            x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
            x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
            colour = (int(rng.integers(256)), int(rng.integers(256)), int(rng.integers(256)))
            if rng.random() < 0.5:
                draw.ellipse((x0, y0, x1, y1), fill=colour)
            else:
                draw.rectangle((x0, y0, x1, y1), fill=colour)
        im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
        arr = np.asarray(im, dtype=np.int16) + rng.normal(0, 6, size=(h, w, 3)).astype(np.int16)
        path = out / f"synthetic_{i:05d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(path, quality=90)
        paths.append(path)
    return paths


def stage_files(files: list[Path], root: Path) -> list[Path]:
    """Copy the chosen files into one flat folder: `ingest` indexes a folder, and every
    measurement then reads the very same bytes, already in the page cache."""
    root.mkdir(parents=True, exist_ok=True)
    staged = []
    for i, f in enumerate(files):
        dst = root / f"{i:05d}_{f.name}"
        shutil.copyfile(f, dst)
        staged.append(dst)
    for f in staged:
        f.read_bytes()  # warm the page cache so no measurement pays for the disk
    return staged


# -- the three measurements -----------------------------------------------------------------------
@dataclass
class Suite:
    label: str
    files: list[Path]
    root: Path
    pixels: Float32Array  # pre-built model input, exactly as ingest prepares it
    context: dict[str, float] = field(default_factory=dict)  # single-thread rates, img/s
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {k: [] for k in KINDS})
    crops: np.ndarray | None = None  # the uint8 crops ingest hands over (--patches: forward with both heads)

    def best(self, kind: str) -> Sample:
        return max(self.samples[kind], key=lambda s: s.rate)


def prepare_suite(label: str, files: list[Path], enc: Encoder, tmp: Path, patches: bool = False) -> Suite:
    """Stage the files and measure, single-threaded, the CPU work the pipeline does per image."""
    from retrieval import imageio

    root = tmp / f"{label}-root"
    staged = stage_files(files, root)
    n, draft = len(staged), int(enc.info.image_size)

    def timed(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return n / (time.perf_counter() - t0)

    context = {
        "decode (full size)": timed(lambda: [imageio.open_image(p) for p in staged]),
        f"decode (JPEG draft >= {draft}px, as ingest)": timed(
            lambda: [imageio.open_image(p, draft_size=draft) for p in staged]
        ),
    }
    decoded = [imageio.open_image(p, draft_size=draft).image for p in staged]
    t0 = time.perf_counter()
    pixels = np.stack([enc.preprocess([im])[0] for im in decoded])
    context["preprocess (from the draft decode)"] = n / (time.perf_counter() - t0)
    crops = np.stack([enc.preprocess_uint8(im) for im in decoded]) if patches else None  # type: ignore[attr-defined]
    return Suite(label, staged, root, pixels, context, crops=crops)


def measure_forward(enc: Encoder, suite: Suite, batch_size: int, limit: int | None = None) -> Sample:
    """`encode_pixels` alone on pre-built batches, cut exactly as ingest cuts them; with --patches the pass
    ingest then runs, embeddings and patch features from one pass, on the uint8 crops."""
    px = suite.pixels[:limit]
    with metered(len(px)) as m:
        for i in range(0, len(px), batch_size):
            if suite.crops is not None:
                enc.encode_staged_with_patches(enc.stage(suite.crops[i : i + batch_size]))  # type: ignore
            else:
                enc.encode_pixels(px[i : i + batch_size])
    assert m.sample is not None
    return m.sample


def measure_naive(enc: Encoder, suite: Suite) -> Sample:
    """What a first attempt looks like: open each file, preprocess it, encode it alone."""
    from retrieval import imageio

    with metered(len(suite.files)) as m:
        for p in suite.files:
            im = imageio.open_image(p).image
            enc.encode_pixels(enc.preprocess([im]))
    assert m.sample is not None
    return m.sample


def measure_pipeline(enc: Encoder, suite: Suite, args: argparse.Namespace, data_dir: Path) -> Sample:
    """`retrieval.ingest.ingest` into a fresh data dir: scan, decode threads, batches, catalog, index."""
    from retrieval.collection import Collection
    from retrieval.ingest import IngestConfig, ingest

    config = IngestConfig(
        batch_size=args.batch_size,
        workers=args.workers,
        decoder=args.decoder,
        progress=False,
        patch_features=args.patches,
    )
    with Collection(data_dir) as coll, instrumented(enc) as clock, metered(0) as m:
        summary = ingest(suite.root, coll, enc, config)
        m.n = summary.encoded
    if summary.encoded != len(suite.files):
        print(
            f"WARNING: ingest encoded {summary.encoded} of {len(suite.files)} images (failed "
            f"{summary.failed}, reused {summary.reused}); the rate counts encoded images only"
        )
    shutil.rmtree(data_dir, ignore_errors=True)
    assert m.sample is not None
    return replace(m.sample, stages=dict(clock.totals))


def run_rounds(suite: Suite, enc: Encoder, args: argparse.Namespace, tmp: Path) -> None:
    # Warm-up at both batch shapes so no measurement pays for first-call allocations.
    enc.encode_pixels(suite.pixels[: args.batch_size])
    enc.encode_pixels(suite.pixels[:1])
    workers = args.workers if args.workers is not None else "default"
    names = {
        "forward": f"(a) encoder forward, batch {args.batch_size}",
        "forward1": f"(d) encoder forward, batch 1 (<= {FORWARD1_IMAGES} images)",
        "naive": "(b) naive loop, batch 1",
        "pipeline": f"(c) pipeline ingest(), batch {args.batch_size}, workers {workers}",
    }
    for r in range(args.rounds):
        order = KINDS if r % 2 == 0 else tuple(reversed(KINDS))
        for kind in order:
            if kind == "forward":
                s = measure_forward(enc, suite, args.batch_size)
            elif kind == "forward1":
                s = measure_forward(enc, suite, 1, limit=FORWARD1_IMAGES)
            elif kind == "naive":
                s = measure_naive(enc, suite)
            else:
                s = measure_pipeline(enc, suite, args, tmp / f"{suite.label}-data-{r}")
            suite.samples[kind].append(s)
            print(f"round {r + 1}  {names[kind]:<48} {s.describe()}", flush=True)
            if s.stages:
                print(" " * 10 + stage_line(s), flush=True)


def stage_line(s: Sample) -> str:
    """Where the pipeline's wall time went (decode and preprocess are summed over worker threads)."""
    st = s.stages
    fw, sync = st.get("forward", 0.0), st.get("index sync", 0.0)
    rest = s.wall - fw - sync
    inside = s.n / fw if fw > 0 else float("inf")
    return (
        f"stages: forward {fw:.1f} s ({inside:.2f} img/s inside the pipeline), index sync {sync:.1f} s, "
        f"staging (uint8 -> normalised model input) {st.get('stage', 0.0):.1f} s, "
        f"main thread otherwise (scan, waiting for decodes, catalog) {rest - st.get('stage', 0.0):.1f} s; "
        "worker threads (in this process): "
        f"decode {st.get('decode', 0.0):.1f} s, preprocess {st.get('preprocess', 0.0):.1f} s"
    )


# -- report ---------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(s: Suite, batch_size: int) -> None:
    fw, nv, pl, f1 = s.best("forward"), s.best("naive"), s.best("pipeline"), s.best("forward1")
    vs_naive, vs_forward = pl.rate / nv.rate, pl.rate / fw.rate
    print(f"\n### {s.label}: {len(s.files)} images, best of {len(s.samples['forward'])} round(s)\n")
    print("| measurement | img/s | other processes' CPU share |\n|---|---:|---:|")
    for title, smp in (
        (f"(a) encoder forward, pre-built batches of {batch_size}", fw),
        ("(b) naive loop: open, preprocess, encode at batch 1", nv),
        (f"(c) pipeline `retrieval.ingest.ingest`, batch {batch_size}", pl),
        (f"(d) context: encoder forward at batch 1 ({f1.n} images)", f1),
    ):
        others = f"{smp.others:.0%}" if smp.others >= 0 else "n/a"
        print(f"| {title} | {smp.rate:.2f} | {others} |")
    for title, v in s.context.items():
        print(f"| context: single-thread {title} | {v:.1f} | |")
    print(
        f"\npipeline / naive   = {vs_naive:5.2f}x  (floor >= {NAIVE_FLOOR:.2f}x)  "
        f"{verdict(vs_naive >= NAIVE_FLOOR)}"
        f"\npipeline / forward = {vs_forward:5.1%}  (floor >= {FORWARD_FLOOR:.0%})   "
        f"{verdict(vs_forward >= FORWARD_FLOOR)}"
    )
    busy = [
        (name, smp) for name, smp in (("forward", fw), ("naive", nv), ("pipeline", pl)) if smp.others > BUSY
    ]
    if busy:
        print(
            "UNRELIABLE: other processes used "
            + ", ".join(
                f"{smp.others:.0%} of the machine's CPU during the best {name} round" for name, smp in busy
            )
            + "; the ratios above are distorted. Rerun with more --rounds, or when the machine is quiet."
        )
    # Where the time goes, per image: the CPU work decode threads add on top of the forward pass.
    draft_key = next(k for k in s.context if k.startswith("decode (JPEG draft"))
    cpu_ms = 1000 / s.context[draft_key] + 1000 / s.context["preprocess (from the draft decode)"]
    print(
        f"per image: forward {1000 / fw.rate:.0f} ms wall ({fw.own_cpu / fw.n * 1000:.0f} ms CPU); "
        f"decode+preprocess {cpu_ms:.1f} ms CPU on one thread; pipeline {1000 / pl.rate:.0f} ms wall "
        f"({pl.own_cpu / pl.n * 1000:.0f} ms CPU)",
        flush=True,
    )
    print("best pipeline round, " + stage_line(pl), flush=True)
    print(
        f"batching alone is worth forward(batch {batch_size}) / forward(batch 1) = "
        f"{fw.rate / f1.rate:.2f}x on this machine: the ceiling of pipeline / naive when "
        f"decoding is free and the cores are shared "
        f"(naive reaches {nv.rate / f1.rate:.0%} of the batch-1 forward rate)",
        flush=True,
    )


# -- main -----------------------------------------------------------------------------------------
def machine_facts() -> str:
    import PIL
    import torch
    import transformers

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    load = load_average()
    return (
        f"machine: {platform.platform()}, python {platform.python_version()}\n"
        f"cores: os.cpu_count()={os.cpu_count()}, usable={usable}; load average {load}\n"
        f"torch {torch.__version__}: intra-op threads={torch.get_num_threads()}, "
        f"inter-op threads={torch.get_num_interop_threads()}; transformers {transformers.__version__}, "
        f"numpy {np.__version__}, Pillow {PIL.__version__}"
    )


def measure_precision(
    args: argparse.Namespace, model_dir: Path, tmp: Path, precision: str
) -> list[tuple[str, str, float, float]]:
    """Every measurement with the encoder in one precision.

    Returns (precision/input, precision it ran in, forward img/s, pipeline img/s) per input.
    """
    import torch

    from retrieval.encoders import EncoderConfig, create_encoder

    print(f"\n# precision {precision}", flush=True)
    encoder = create_encoder(EncoderConfig(model=str(model_dir), device=args.device, precision=precision))
    ran = str(getattr(encoder, "precision", "?"))
    print(
        f"encoder: {args.arch} on {encoder.device} ({ran}), "
        f"input {encoder.info.image_size}px, dim {encoder.info.dim}"
    )
    if encoder.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    picked = getattr(encoder, "ingest_batch_size", lambda: 32)()
    if args.batch_size is None:
        args.batch_size = picked
    print(f"batch size {args.batch_size} (auto on this device: {picked})")

    inputs: list[tuple[str, list[Path]]] = []
    if args.images is not None:
        real = find_images(args.images)[: args.limit]
        if not real:  # missing data is said and exited on, never silently skipped
            print(f"bench data missing: no images under {args.images}", file=sys.stderr)
            raise SystemExit(MISSING)
        inputs.append(("photos", real))
        print(f"data: photos = {len(real)} images from {args.images}")
    if args.synthetic > 0:
        inputs.append(
            (
                "synthetic",
                write_synthetic(tmp / f"synthetic-src-{precision}", min(args.synthetic, args.limit)),
            )
        )
        print(f"data: synthetic = {min(args.synthetic, args.limit)} generated 640x480 JPEGs")
    if not inputs:
        print("nothing to measure: give --images DIR or --synthetic N")
        encoder.close()
        return []

    suites = []
    work = tmp / f"work-{precision}"
    work.mkdir(exist_ok=True)
    for label, files in inputs:
        suite = prepare_suite(label, files, encoder, work, args.patches)
        print(f"\n## {label} ({ran}): {len(suite.files)} images", flush=True)
        run_rounds(suite, encoder, args, work)
        suites.append(suite)
    for suite in suites:
        report(suite, args.batch_size)
    encoder.close()
    return [(f"{precision}/{s.label}", ran, s.best("forward").rate, s.best("pipeline").rate) for s in suites]


def _precisions(text: str) -> list[str]:
    """`fp32,auto` -> ["fp32", "auto"]; the same model and files are measured in each, one after the other."""
    from retrieval.encoders import PRECISIONS

    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in PRECISIONS]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"use a comma-separated list of {', '.join(PRECISIONS)}; got {text!r}"
        )
    return list(dict.fromkeys(values))


def _batch_size(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"use a whole number or auto; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a batch holds at least 1 image; got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--images", type=Path, default=None, help="folder of real photos (default: coco-mini's)")
    add_data_option(p)
    p.add_argument("--no-photos", action="store_true", help="measure only the --synthetic N JPEGs")
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="also run on N synthetic JPEGs")
    p.add_argument("--limit", type=int, default=200, help="images per measurement (default: %(default)s)")
    p.add_argument(
        "--batch-size",
        type=_batch_size,
        default=None,
        help="batch size of the forward and the pipeline: a number, or auto (default): what ingest "
        "picks for the device",
    )
    p.add_argument("--workers", type=int, default=None, help="ingest decode workers (default: ingest's auto)")
    p.add_argument(
        "--decoder", choices=["auto", "threads", "processes"], default="auto", help="ingest's decoder"
    )
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument(
        "--precision",
        type=_precisions,
        default=["fp32", "auto"],
        help="encoder precisions to measure in turn, comma-separated (default: fp32,auto; auto: fp16 on "
        "GPU, bf16 on a CPU with native bf16, else fp32)",
    )
    p.add_argument(
        "--arch", default="vit-b-32", help="retrieval.demo.tiny architecture (default: %(default)s)"
    )
    p.add_argument(
        "--patches",
        action="store_true",
        help="store patch features while indexing, as `clearsight index` does by default; the forward (a) "
        "is then the one pass that gives both",
    )
    p.add_argument("--rounds", type=int, default=2, help="repeat all three, keep each one's best")
    p.add_argument("--model-dir", type=Path, default=None, help="reuse or create the model here")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    if args.no_photos:
        if args.synthetic < 1:
            p.error("--no-photos leaves nothing to measure without --synthetic N")
        args.images = None
    elif args.images is None:
        args.images = coco_mini(args.data) / "images"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print("# Clearsight ingest benchmark")
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(f"date: {datetime.now(UTC).isoformat(timespec='seconds')}")
    print(machine_facts())
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "CUDA is not available on this machine: the GPU path (--device cuda, fp16 weights, the same "
            "measurements) is written the standard way but was not run here. Nothing measured."
        )
        return 0

    from retrieval.demo.tiny import make_clip
    from retrieval.encoders import cpu_has_native_bf16

    with tempfile.TemporaryDirectory(prefix="clearsight-ingest-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = args.model_dir or tmp / "model"
        if not (model_dir / "config.json").exists():
            t0 = time.perf_counter()
            make_clip(model_dir, arch=args.arch)
            print(f"built a random-weight {args.arch} CLIP in {model_dir} ({time.perf_counter() - t0:.0f} s)")
        print(f"CPU with native bf16 (avx512_bf16 or AMX): {cpu_has_native_bf16()}")
        summary: list[tuple[str, str, float, float]] = []
        for precision in args.precision:
            summary += measure_precision(args, model_dir, tmp, precision)
        print("\n### precisions side by side (best rounds)\n")
        print("| requested | ran in | input | encoder forward img/s | pipeline img/s | pipeline / forward |")
        print("|---|---|---|---:|---:|---:|")
        for label, ran, fw, pl in summary:
            req, inp = label.split("/")
            print(f"| {req} | {ran} | {inp} | {fw:.2f} | {pl:.2f} | {pl / fw:.1%} |")
    print(f"\nload average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
