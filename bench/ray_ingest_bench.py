"""Ray engine vs local engine: `clearsight index` with each, on the same images, in the same run.

Both engines run as users run them: the `clearsight index` command in a fresh process, paying for its
imports and for loading the model (the local engine once, the Ray engine once in the driver and once per
encoder actor), into fresh data directories, with the same random-weight CLIP of ViT-B/32 shapes (speed
does not depend on weight values), in alternating rounds; each keeps its best round, and every round
prints the share of the machine other processes used meanwhile. The Ray cluster is started once
before the rounds (`ray start --head`, as a long-lived cluster would be) and the Ray runs join it with
`--ray-address`. Short runs cannot amortise the actors' start-up; `--synthetic N` lengthens the run.
(Until 2026-11-28 the local round reused an encoder the bench had already loaded while every Ray round
loaded its model in its actors, which favoured the local engine by the model's load time.)
Floor (issue 14): Ray >= 0.8x the local throughput. `--device cuda` measures the GPU path where a
GPU exists and says so otherwise.

    flock /work/cpu.lock .venv/bin/python bench/ray_ingest_bench.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from machine import span

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = (REPO / ".." / "shared" / "data" / "coco-mini").resolve()
FLOOR = 0.8
RAY_NOTE = "; includes the Ray cluster's workers"
#: The command, in a fresh process with its own imports and model load, as a user runs it.
CLI = [sys.executable, "-m", "explainer.cli"]


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
        print(
            f"{len(files)} photos from {args.images} + {args.synthetic} synthetic; "
            f"encoder {args.arch} on {args.device}; workers {args.workers}, batch {args.batch_size}"
        )
        ray_bin = str(Path(sys.executable).with_name("ray"))
        # a throwaway loopback cluster for this bench only: no token to hand to the CLI processes
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        port = "6391"
        t0 = time.perf_counter()
        subprocess.run(
            [
                ray_bin,
                "start",
                "--head",
                f"--port={port}",
                "--num-cpus=2",
                "--include-dashboard=false",
                "--node-ip-address=127.0.0.1",
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        print(f"Ray cluster started in {time.perf_counter() - t0:.1f} s (not counted below)")
        common = [
            "index", str(src), "--model", str(model), "--batch-size", str(args.batch_size),
            "--workers", str(args.workers), "--device", args.device, "-q",
        ]  # fmt: skip
        engines = {"local": [], "ray": ["--engine", "ray", "--ray-address", f"127.0.0.1:{port}"]}
        best = {"local": 0.0, "ray": 0.0}
        try:
            for r in range(args.rounds):
                order = ["local", "ray"] if r % 2 == 0 else ["ray", "local"]
                for kind in order:
                    data = tmp / f"{kind}-{r}"
                    cmd = [*CLI, *common, "--data-dir", str(data), "--json", *engines[kind]]
                    with span() as s:
                        t0 = time.perf_counter()
                        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                        wall = time.perf_counter() - t0
                    if done.returncode:
                        print(f"{kind} failed (rc {done.returncode}): {done.stderr[-1500:]}")
                        return 1
                    encoded = int(json.loads(done.stdout)["encoded"])
                    rate = encoded / wall
                    best[kind] = max(best[kind], rate)
                    print(
                        f"round {r + 1} {kind:5s}: {encoded} images in {wall:.1f} s = {rate:.1f} img/s "
                        f"(CPU of other processes {s.others_text()}{RAY_NOTE if kind == 'ray' else ''})"
                    )
        finally:
            subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env)
        ratio = best["ray"] / best["local"] if best["local"] else 0.0
        print(
            f"best: local {best['local']:.1f} img/s, ray {best['ray']:.1f} img/s, ratio {ratio:.2f}x "
            f"({'PASS' if ratio >= FLOOR else 'FAIL'} floor {FLOOR}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
