"""Ray engine vs local engine: `clearsight index` with each, on the same images, in the same run.

Both engines run as users run them: the `clearsight index` command in a fresh process, paying for its
imports and for loading the model (the local engine once, the Ray engine once in the driver and once per
encoder actor), into fresh data directories, with the same random-weight CLIP of ViT-B/32 shapes (speed
does not depend on weight values), in alternating order; every run prints the share of the machine other
processes used meanwhile. The Ray cluster is started once before the rounds (`ray start --head`, as a
long-lived cluster would be) and the Ray runs join it with `--ray-address`.

Each engine indexes two jobs: the photos alone, and the photos plus `--synthetic N` photo-like JPEGs.
A run's time is a fixed start-up plus a rate per image, so the two sizes give each engine's
throughput (the extra images over the extra seconds) and its fixed start-up (what is left of the
small job once its images are paid at that rate). Floor (issue 14): Ray >= 0.8x the local throughput;
the end-to-end ratio of each job and the job size at which it reaches the floor are printed beside it,
since on a short job the start-up dominates. `--device cuda` measures the GPU path where a GPU exists
and says so otherwise.

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

from data import MISSING, add_data_option, coco_mini
from machine import span

FLOOR = 0.8
RAY_NOTE = "; includes the Ray cluster's workers"
#: The command, in a fresh process with its own imports and model load, as a user runs it.
CLI = [sys.executable, "-m", "explainer.cli"]


def fit(small_n: int, small_s: float, large_n: int, large_s: float) -> tuple[float, float]:
    """(images per second, fixed seconds) of a run that takes fixed + n / rate seconds."""
    rate = (large_n - small_n) / max(large_s - small_s, 1e-9)
    return rate, small_s - small_n / rate


def crossing(target: float, r_loc: float, f_loc: float, r_ray: float, f_ray: float) -> str:
    """From which job size the end-to-end ratio reaches `target`.

    At n images the ratio is (f_loc + n / r_loc) / (f_ray + n / r_ray); it reaches the target where
    n * (1 / r_loc - target / r_ray) >= target * f_ray - f_loc.
    """
    gap = 1 / r_loc - target / r_ray
    need = target * f_ray - f_loc
    if need <= 0 and gap >= 0:
        return "at every size"
    if gap > 0:
        return f"from about {need / gap:.0f} images on"
    if need < 0:  # ahead on small jobs, behind on large ones
        return f"up to about {need / gap:.0f} images"
    return "at no size (its throughput is below the target)"


def report(best: dict[tuple[str, str], float], counts: dict[str, int]) -> None:
    n_small, n_large = counts["small"], counts["large"]
    model = {
        kind: fit(n_small, best[kind, "small"], n_large, best[kind, "large"]) for kind in ("local", "ray")
    }
    for kind, (rate, fixed) in model.items():
        print(f"{kind:5s}: throughput {rate:.1f} img/s, fixed start-up {fixed:.1f} s (fastest runs)")
    (r_loc, f_loc), (r_ray, f_ray) = model["local"], model["ray"]
    for job, n in counts.items():
        e2e = best["local", job] / best["ray", job]
        loc, ray = best["local", job], best["ray", job]
        print(f"end to end, {n} images: local {loc:.1f} s, ray {ray:.1f} s = {e2e:.2f}x")
    ratio = r_ray / r_loc
    for target in (FLOOR, 1.0):
        print(f"end-to-end ratio reaches {target}x {crossing(target, r_loc, f_loc, r_ray, f_ray)}")
    print(
        f"throughput ratio ray/local {ratio:.2f}x ({'PASS' if ratio >= FLOOR else 'FAIL'} floor {FLOOR}x); "
        f"Ray's start-up costs {f_ray - f_loc:+.1f} s a run"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=Path, default=None, help="folder of photos (default: coco-mini's)")
    add_data_option(p)
    p.add_argument("--limit", type=int, default=240)
    p.add_argument(
        "--synthetic",
        type=int,
        default=600,
        help="the larger job adds N synthetic 640x480 JPEGs to the photos",
    )
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="decode threads (local) / encoder actors (Ray)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="vit-b-32")
    args = p.parse_args(argv)
    if args.synthetic < 1:
        p.error("--synthetic must be at least 1: the two job sizes are what separate rate from start-up")
    images = args.images if args.images is not None else coco_mini(args.data) / "images"
    print("# Ray vs local ingest")
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(f"date: {datetime.now(UTC).isoformat(timespec='seconds')}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available here: the --device cuda path (one GPU per actor, fp16) was not run.")
        return 0
    from retrieval.demo.tiny import make_clip

    files = sorted(p for p in images.rglob("*.jpg"))[: args.limit]
    if not files:
        print(f"bench data missing: no photos under {images}", file=sys.stderr)
        return MISSING
    with tempfile.TemporaryDirectory(prefix="clearsight-ray-bench-") as t:
        tmp = Path(t)
        jobs = {"small": tmp / "photos", "large": tmp / "photos-and-synthetic"}
        for src in jobs.values():
            src.mkdir()
            for i, f in enumerate(files):  # one flat folder, so both engines see the very same files
                (src / f"{i:05d}.jpg").symlink_to(f)
        from ingest_bench import write_synthetic

        write_synthetic(jobs["large"] / "synthetic", args.synthetic)
        model = make_clip(tmp / "model", arch=args.arch)
        print(
            f"jobs: {len(files)} photos from {images}, and the same + {args.synthetic} synthetic "
            f"640x480 JPEGs; encoder {args.arch} on {args.device}; workers {args.workers}, "
            f"batch {args.batch_size}"
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
            "index", "--model", str(model), "--batch-size", str(args.batch_size),
            "--workers", str(args.workers), "--device", args.device, "-q",
        ]  # fmt: skip
        engines = {"local": [], "ray": ["--engine", "ray", "--ray-address", f"127.0.0.1:{port}"]}
        best: dict[tuple[str, str], float] = {}  # (engine, job) -> fastest wall seconds
        counts: dict[str, int] = {}
        try:
            for r in range(args.rounds):
                order = ["local", "ray"] if r % 2 == 0 else ["ray", "local"]
                for job, src in jobs.items():
                    for kind in order:
                        data = tmp / f"{kind}-{job}-{r}"
                        cmd = [*CLI, *common, str(src), "--data-dir", str(data), "--json", *engines[kind]]
                        with span() as s:
                            t0 = time.perf_counter()
                            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                            wall = time.perf_counter() - t0
                        if done.returncode:
                            print(f"{kind} failed (rc {done.returncode}): {done.stderr[-1500:]}")
                            return 1
                        counts[job] = int(json.loads(done.stdout)["encoded"])
                        best[kind, job] = min(best.get((kind, job), wall), wall)
                        print(
                            f"round {r + 1} {job:5s} {kind:5s}: {counts[job]} images in {wall:.1f} s = "
                            f"{counts[job] / wall:.1f} img/s (CPU of other processes {s.others_text()}"
                            f"{RAY_NOTE if kind == 'ray' else ''})"
                        )
        finally:
            subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env)
        report(best, counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
