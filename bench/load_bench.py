"""Loopback load on `POST /api/search`: latency and throughput at 1, 8 and 32 clients, then the same
while `clearsight index` adds images to the collection being served.

Everything runs through the product's own commands on 127.0.0.1: a synthetic collection is indexed
with a tiny CLIP (`clearsight index`), captioned once with a tiny BLIP (`clearsight caption`, so
every card's caption is a cache hit), and served by `clearsight serve` with the offline explainer
(no key). Each request asks for 8 cards with evidence, caption and explanation. Request counts are
bounded; the figures are printed and appended to bench/RESULTS.md.

    .venv/bin/python bench/load_bench.py                 # defaults: 240 images, 60/160/320 requests
    .venv/bin/python bench/load_bench.py --images 120 --requests 30 80 160

The second phase checks what users would notice: searches keep answering (zero errors) while the
indexer writes, and the server swaps in the new index version atomically (the image count seen
by /api/health only ever grows, ending at the new total).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLI = [str(Path(sys.executable).with_name("clearsight"))]
#: Cap on requests while the indexer runs (the phase normally ends when indexing does).
MAX_DURING = 20_000
QUERIES = [
    "a red circle",
    "a blue square in the top left",
    "a green triangle",
    "a yellow star above a purple cross",
    "an orange ring",
    "a picture of a purple circle in the bottom right",
]


@dataclass
class Run:
    label: str
    clients: int
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    error_samples: list[str] = field(default_factory=list)

    def row(self) -> str:
        lat = np.asarray(self.latencies_ms or [float("nan")])
        n = len(self.latencies_ms) + self.errors
        return (
            f"| {self.label} | {self.clients} | {n} | {np.percentile(lat, 50):.1f} | "
            f"{np.percentile(lat, 99):.1f} | {n / max(self.seconds, 1e-9):.1f} | {self.errors} |"
        )


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("GROQ_API_KEY", None)
    env["CLEARSIGHT_EXPLAIN_BACKEND"] = "offline"
    return env


def _run(args: list[str]) -> None:
    r = subprocess.run(args, capture_output=True, text=True, env=_env())
    if r.returncode:
        sys.exit(f"{' '.join(args[:2])} failed ({r.returncode}): {(r.stderr or r.stdout)[-600:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(work: Path, n_images: int) -> tuple[Path, Path, Path]:
    """Scenes, tiny models, an index and cached captions; returns (images dir, data dir, clip dir)."""
    from retrieval.demo.blip import make_blip
    from retrieval.demo.synthetic import SyntheticConfig, write_scenes
    from retrieval.demo.tiny import make_clip

    images, data = work / "scenes", work / "data"
    write_scenes(SyntheticConfig(n_train=n_images, n_val=0, n_test=0, image_size=128), images, progress=False)
    clip = make_clip(work / "clip", "tiny", seed=0)
    blip = make_blip(work / "blip", "tiny", seed=0)
    _run([*CLI, "index", str(images), "--model", str(clip), "--data-dir", str(data), "-q"])
    _run([*CLI, "caption", "--model", str(blip), "--data-dir", str(data), "-q"])
    return images, data, clip


async def _client(
    http: httpx.AsyncClient, run: Run, budget: list[int], stop: asyncio.Event | None, seed: int
) -> None:
    i = seed
    while budget[0] > 0 and not (stop is not None and stop.is_set()):
        budget[0] -= 1
        body = {"text": QUERIES[i % len(QUERIES)], "top_k": 8, "offset": (i // len(QUERIES)) % 3 * 8}
        i += 1
        start = time.perf_counter()
        try:
            r = await http.post("/api/search", json=body)
            ok = r.status_code == 200 and len(r.json()["results"]) > 0
            if not ok and len(run.error_samples) < 3:
                run.error_samples.append(f"{r.status_code} {r.text[:200]}")
        except httpx.HTTPError as exc:
            ok = False
            if len(run.error_samples) < 3:
                run.error_samples.append(repr(exc))
        if ok:
            run.latencies_ms.append((time.perf_counter() - start) * 1000.0)
        else:
            run.errors += 1


async def load(base: str, run: Run, requests: int, stop: asyncio.Event | None = None) -> Run:
    limits = httpx.Limits(max_connections=run.clients, max_keepalive_connections=run.clients)
    async with httpx.AsyncClient(base_url=base, timeout=60.0, limits=limits) as http:
        budget = [requests]
        start = time.perf_counter()
        await asyncio.gather(*(_client(http, run, budget, stop, k) for k in range(run.clients)))
        run.seconds = time.perf_counter() - start
    return run


async def _watch_health(base: str, stop: asyncio.Event, seen: list[tuple[str | None, int | None]]) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=10.0) as http:
        while not stop.is_set():
            body = (await http.get("/api/health")).json()
            index = body.get("index") or {}
            if not seen or seen[-1] != (index.get("version"), index.get("images")):
                seen.append((index.get("version"), index.get("images")))
            await asyncio.sleep(0.25)


async def while_indexing(base: str, images: Path, data: Path, clip: Path, extra: int, clients: int) -> dict:
    """Add `extra` images and run `clearsight index` while `clients` keep searching."""
    from retrieval.demo.synthetic import SyntheticConfig, write_scenes

    write_scenes(
        SyntheticConfig(n_train=extra, n_val=0, n_test=0, image_size=128, seed=7),
        images / "more",
        progress=False,
    )
    stop = asyncio.Event()
    seen: list[tuple[str | None, int | None]] = []
    run = Run("during `clearsight index`", clients)
    watcher = asyncio.create_task(_watch_health(base, stop, seen))
    loader = asyncio.create_task(load(base, run, MAX_DURING, stop))
    await asyncio.sleep(1.0)  # load is running before the indexer starts
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *CLI, "index", str(images), "--model", str(clip), "--data-dir", str(data), "-q",
        env=_env(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    index_s = time.perf_counter() - started
    if proc.returncode:
        sys.exit(f"clearsight index failed during the load: {err.decode()[-600:]}")
    await asyncio.sleep(2.0)  # longer than the reload interval: the new version must be picked up
    stop.set()
    await asyncio.gather(loader, watcher)
    return {"run": run, "versions": seen, "index_s": index_s}


def serve(data: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    args = [*CLI, "serve", "--data-dir", str(data), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--reload-interval", "0.5", "--log-level", "warning"]
    with log.open("wb") as fh:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"clearsight serve exited with {proc.returncode}")
        try:
            if httpx.get(base + "/api/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    sys.exit("clearsight serve did not become healthy")


def report(args: argparse.Namespace, runs: list[Run], during: dict, n_images: int, cached: str) -> str:
    versions = during["versions"]
    counts = [c for _, c in versions if c is not None]
    lines = [
        "",
        f"## Server load (`bench/load_bench.py`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Loopback `POST /api/search` on {platform.machine()} with {os.cpu_count()} cores: tiny CLIP, "
        f"{n_images} synthetic images, 8 cards per request with evidence, cached BLIP captions and the "
        f"offline explainer (generated captions on {cached} cards of a sample page); one `clearsight serve` "
        "process (uvicorn, one worker).",
        "",
        "| phase | clients | requests | p50 ms | p99 ms | req/s | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[r.row() for r in runs],
        during["run"].row(),
        "",
        f"While searching, `clearsight index` added {args.extra} images in {during['index_s']:.1f} s; "
        f"/api/health saw index versions {' → '.join(f'{v} ({c})' for v, c in versions)}; image counts "
        f"{'only grew' if counts == sorted(counts) else 'WENT BACKWARDS'}, "
        f"ending at {counts[-1] if counts else '?'} (expected {n_images + args.extra}).",
        f"Load average at the end (1, 5, 15 min): {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(the client, the server and the indexer share the same cores, with whatever else runs).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--extra", type=int, default=120, help="images added while searching")
    parser.add_argument("--requests", type=int, nargs=3, default=[60, 160, 320], help="per 1/8/32 clients")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="clearsight-load-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        print(f"preparing {args.images} images, tiny models, index and captions in {work} ...", flush=True)
        images, data, clip = prepare(work, args.images)
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        proc = serve(data, port, work / "server.log")
        wait_ready(base, proc)
        asyncio.run(load(base, Run("warm-up", 4), 24))
        sample = httpx.post(base + "/api/search", json={"text": QUERIES[0], "top_k": 8}, timeout=60).json()
        sources = [c["caption_source"] or "none" for c in sample["results"]]
        cached = sum(s.startswith("generated:") for s in sources)
        print(f"captions served from the cache: {cached}/{len(sources)} cards", flush=True)
        runs = []
        for clients, n in zip((1, 8, 32), args.requests, strict=True):
            run = asyncio.run(load(base, Run("steady", clients), n))
            print(run.row(), flush=True)
            runs.append(run)
        during = asyncio.run(while_indexing(base, images, data, clip, args.extra, 8))
        print(during["run"].row(), flush=True)
        text = report(args, runs, during, args.images, f"{cached}/{len(sources)}")
        print(text)
        failures = [r for r in [*runs, during["run"]] if r.errors]
        for r in failures:
            print(f"errors in {r.label} x{r.clients}: {r.error_samples}", file=sys.stderr)
        if not args.no_write:
            results = ROOT / "bench" / "RESULTS.md"
            with results.open("a", encoding="utf-8") as fh:  # append only: other benches write here too
                fh.write(text)
            print(f"appended to {results}")
        if failures:
            sys.exit(1)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
