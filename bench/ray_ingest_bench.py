"""Ray engine vs local engine: `ray_ingest` against `ingest` on the same images, in the same run.

Both engines index the same files into fresh data directories with the same random-weight CLIP of
ViT-B/32 shapes (speed does not depend on weight values), in alternating rounds; each keeps its best
round, and every round prints the share of the machine other processes used meanwhile. The Ray
cluster is started once before the rounds (as a long-lived cluster would be); each Ray round still
pays for its worker processes starting and its actors loading the model, since that is part of every
real `--engine ray` run: a fixed cost of several seconds that short runs cannot amortise (`--synthetic N`
lengthens the run).
Floor (issue 14): Ray >= 0.8x the local throughput. `--device cuda` measures the GPU path where a
GPU exists and says so otherwise.

    flock /work/cpu.lock .venv/bin/python bench/ray_ingest_bench.py --rounds 2
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from machine import span

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = (REPO / ".." / "shared" / "data" / "coco-mini").resolve()
FLOOR = 0.8
RAY_NOTE = "; includes the Ray workers"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--limit", type=int, default=240)
    p.add_argument(
        "--synthetic",
        type=int,
        default=0,
        help="add N synthetic 640x480 JPEGs (longer runs amortise start-up)",
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="decode threads (local) / encoder actors (Ray)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="vit-b-32")
    args = p.parse_args(argv)
    print("# Ray vs local ingest")
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(f"date: {datetime.now(UTC).isoformat(timespec='seconds')}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available here: the --device cuda path (one GPU per actor, fp16) was not run.")
        return 0
    import ray

    from retrieval import Collection, IngestConfig
    from retrieval.distributed.ingest import RayConfig, ray_ingest
    from retrieval.encoders import EncoderConfig, create_encoder
    from retrieval.ingest import ingest
    from retrieval.testing.tiny import make_clip

    files = sorted(p for p in args.images.rglob("*.jpg"))[: args.limit]
    if not files:
        print(f"no images under {args.images}")
        return 0
    with tempfile.TemporaryDirectory(prefix="clearsight-ray-bench-") as t:
        tmp = Path(t)
        src = tmp / "images"
        src.mkdir()
        for i, f in enumerate(files):  # one flat folder, so both engines see the very same files
            (src / f"{i:05d}.jpg").symlink_to(f)
        if args.synthetic:
            from ingest_bench import write_synthetic

            write_synthetic(src / "synthetic", args.synthetic)
        model = make_clip(tmp / "model", arch=args.arch)
        enc_cfg = EncoderConfig(model=str(model), device=args.device)
        encoder = create_encoder(enc_cfg)
        print(
            f"{len(files)} photos from {args.images} + {args.synthetic} synthetic; "
            f"encoder {args.arch} on {encoder.device}, {getattr(encoder, 'precision', '?')}; "
            f"workers {args.workers}, batch {args.batch_size}"
        )
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"local Ray cluster started in {time.perf_counter() - t0:.1f} s (not counted below)")
        cfg = IngestConfig(batch_size=args.batch_size, workers=args.workers, progress=False)
        best = {"local": 0.0, "ray": 0.0}
        for r in range(args.rounds):
            order = ["local", "ray"] if r % 2 == 0 else ["ray", "local"]
            for kind in order:
                data = tmp / f"{kind}-{r}"
                with span() as s:
                    t0 = time.perf_counter()
                    if kind == "local":
                        summary = ingest(src, Collection(data), encoder, cfg)
                    else:
                        summary = ray_ingest(
                            src,
                            Collection(data),
                            encoder,
                            enc_cfg,
                            cfg,
                            RayConfig(workers=args.workers, device=None),
                        )
                    wall = time.perf_counter() - t0
                rate = summary.encoded / wall
                best[kind] = max(best[kind], rate)
                print(
                    f"round {r + 1} {kind:5s}: {summary.encoded} images in {wall:.1f} s = {rate:.1f} img/s "
                    f"(CPU outside this process {s.others_text()}{RAY_NOTE if kind == 'ray' else ''})"
                )
        ratio = best["ray"] / best["local"] if best["local"] else 0.0
        print(
            f"best: local {best['local']:.1f} img/s, ray {best['ray']:.1f} img/s, ratio {ratio:.2f}x "
            f"({'PASS' if ratio >= FLOOR else 'FAIL'} floor {FLOOR}x)"
        )
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
