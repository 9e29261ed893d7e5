"""Server memory under hostile-but-small requests: what 8 concurrent 6000x6000 PNG uploads and 16
concurrent maximum-size JSON bodies add to `clearsight serve`'s resident memory (issue 11).

A 6000x6000 white PNG is about 100 KiB on the wire but 108 MiB or more once decoded; a JSON body
at the server's body limit (about 13.9 MB with the default 10 MiB upload limit) is parsed into
Python objects several times its size. The bench indexes a few synthetic scenes with a tiny CLIP,
starts `clearsight serve` on 127.0.0.1 from the tree named by `--tree` (PYTHONPATH), samples the
server's VmRSS every 20 ms during each burst, and prints idle, peak-minus-idle and
after-burst-minus-idle figures. Run it under the CPU lock; it is not a timed test.

    flock /work/cpu.lock .venv/bin/python bench/memory_bench.py --tree . --label after
    flock /work/cpu.lock .venv/bin/python bench/memory_bench.py --tree ../before --label before
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("GROQ_API_KEY", None)
    env.pop("CLEARSIGHT_API_TOKEN", None)
    env["CLEARSIGHT_EXPLAIN_BACKEND"] = "offline"
    env["PYTHONPATH"] = str(tree.resolve())
    return env


def _cli(tree: Path, *args: str) -> list[str]:
    return [PYTHON, "-m", "explainer.cli", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _post(url: str, body: bytes, content_type: str) -> int:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        e.read()
        return int(e.code)
    except OSError:
        return -1


def burst(pid: int, n: int, send: object) -> dict[str, object]:
    """Run `send` n times at once; RSS sampled throughout and 3 s after."""
    assert callable(send)
    idle = _rss_mib(pid)
    peak = [idle]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mib(pid))
            time.sleep(0.02)

    codes: list[int] = []
    w = threading.Thread(target=watch)
    w.start()
    started = time.perf_counter()
    ts = [threading.Thread(target=lambda: codes.append(send())) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=600)
    seconds = time.perf_counter() - started
    stop.set()
    w.join()
    time.sleep(3)
    after = _rss_mib(pid)
    return {
        "idle_mib": round(idle, 1),
        "peak_added_mib": round(peak[0] - idle, 1),
        "after_added_mib": round(after - idle, 1),
        "seconds": round(seconds, 2),
        "statuses": sorted(set(codes)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=ROOT, help="project tree whose code serves (PYTHONPATH)")
    ap.add_argument("--label", default="", help="printed with the figures (before / after)")
    args = ap.parse_args()
    tree: Path = args.tree
    env = _env(tree)
    work = Path(tempfile.mkdtemp(prefix="memory-bench-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        sys.path.insert(0, str(tree.resolve()))
        from retrieval.demo.tiny import make_clip

        images = work / "images"
        images.mkdir()
        for i in range(12):
            Image.new("RGB", (96, 72), (20 * i, 255 - 20 * i, 90)).save(images / f"img_{i:02d}.jpg")
        clip = make_clip(work / "clip", "tiny", seed=0)
        data = work / "data"
        r = subprocess.run(
            _cli(tree, "index", str(images), "--model", str(clip), "--data-dir", str(data), "-q"),
            env=env,
            capture_output=True,
            text=True,
        )
        if r.returncode:
            sys.exit(f"index failed: {r.stderr[-500:]}")
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(work / "serve.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            _cli(tree, "serve", "--data-dir", str(data), "--host", "127.0.0.1", "--port", str(port)),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for _ in range(240):
            try:
                if urllib.request.urlopen(base + "/api/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            sys.exit("server never became healthy: " + (work / "serve.log").read_text()[-500:])
        time.sleep(2)

        buf = io.BytesIO()
        Image.new("RGB", (6000, 6000), "white").save(buf, "PNG")
        png = buf.getvalue()
        bnd = "----memorybench"
        multipart = (
            (
                f'--{bnd}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                "Content-Type: image/png\r\n\r\n"
            ).encode()
            + png
            + f"\r\n--{bnd}--\r\n".encode()
        )
        png_run = burst(
            proc.pid,
            8,
            lambda: _post(base + "/api/search", multipart, f"multipart/form-data; boundary={bnd}"),
        )

        # the largest JSON body the server accepts with default settings: 10 MiB upload as base64 + slack
        limit = (10 * 1024 * 1024 * 4) // 3 + 64 * 1024
        filler = base64.b64encode(os.urandom((limit - 200) * 3 // 4)).decode()
        body = json.dumps({"text": "a red circle", "image_base64": filler, "top_k": 3}).encode()
        assert len(body) <= limit, (len(body), limit)
        json_run = burst(proc.pid, 16, lambda: _post(base + "/api/search", body, "application/json"))
        print(
            json.dumps(
                {
                    "label": args.label,
                    "data": "synthetic scenes (tiny CLIP), a white 6000x6000 PNG, random base64 JSON",
                    "tree": str(tree.resolve()),
                    "png_6000x6000_bytes": len(png),
                    "png_uploads_8": png_run,
                    "json_body_bytes": len(body),
                    "json_bodies_16": json_run,
                }
            )
        )
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
