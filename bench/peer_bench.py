"""Clearsight beside rclip, the command-line photo search a user may already have: a cold search from the
shell, a re-scan with nothing changed, a new query on a warm process (quiet, and with two busy loops
holding the cores), the first query after `clearsight serve` starts, indexing 300 photos from scratch,
and the peak memory of a search and of an index run.

Everything runs through the product's commands on a random CLIP ViT-B/32 (transformers' `CLIPConfig`
defaults: the shapes of openai/clip-vit-base-patch32, random weights) and copies of the coco-mini photos,
each copy made a distinct file (a few bytes appended after the JPEG's end, which decoders ignore), so
every photo is encoded rather than recognised as a duplicate.

rclip runs beside it when `--rclip` names the Python of an environment holding rclip 4.0.8 (it needs
Python >= 3.12: here `/root/.pyenv/versions/3.12.1/bin/python -m venv V && V/bin/pip install rclip==4.0.8`).
rclip would download its two ONNX files from a model hub; instead the bench exports the same random weights
for it (`export_for_rclip`: torch's ONNX exporter, which needs the `peer` extra, `pip install -e ".[peer]"`)
at rclip's input size, 256 (its ViT-B-32-256), the 7x7 position grid resized to 8x8 as transformers'
`interpolate_pos_encoding` does. rclip's tokenizer reads CLIP's BPE vocabulary, `--clip-vocab`
(bpe_simple_vocab_16e6.txt.gz, e.g. from the open_clip_torch wheel). The legal files rclip checks for are
written as placeholders that say so. rclip's warm query is timed in process (its `RClip.search`), as
issue 28 did. Without `--rclip`, its column is the figures quoted in issue 28 and the table says so.

    flock /work/cpu.lock .venv/bin/python bench/peer_bench.py            # 1,050 photos, 3 cold runs
    .venv/bin/python bench/peer_bench.py --photos 300 --runs 1 --queries 4  # a quick look
    ... bench/peer_bench.py --rclip /work/rclip-venv/bin/python --clip-vocab bpe_simple_vocab_16e6.txt.gz
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
#: The photos copied: ../shared beside a checkout, or where --source points (a worktree has no ../shared).
PHOTOS = ROOT.parent / "shared" / "data" / "coco-mini" / "images"
CLI = [sys.executable, "-m", "explainer.cli"]
#: rclip 4.0.8 as issue 28 measured it on this machine type: the column when rclip is not run (no --rclip).
RCLIP_QUOTED = {
    "cold": 0.74,
    "rescan": 0.81,
    "warm_quiet": 0.064,
    "warm_busy": 0.125,
    "index300": 12.3,
    "mem_search": 441.0,
    "mem_index": 862.0,
}
QUERIES = [
    "a dog on a couch",
    "a red bus in the street",
    "two people playing tennis",
    "a plate of food on a table",
    "a cat sleeping on a bed",
    "a train at the station",
    "a man riding a horse",
    "boats in a harbour",
    "a child with a kite on the beach",
    "a bowl of fruit",
    "a giraffe near trees",
    "a kitchen with a window",
]


@dataclass
class Ran:
    seconds: float
    peak_mb: float
    out: str


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("GROQ_API_KEY", None)
    env["CLEARSIGHT_EXPLAIN_BACKEND"] = "offline"
    return env


def run(args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> Ran:
    """Run a command; its wall time and its own peak resident memory (wait4's rusage of that child)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env or _env(), cwd=cwd
    )
    assert proc.stdout is not None
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(args[2:5])} failed ({proc.returncode}): {out[-800:]}")
    return Ran(seconds, usage.ru_maxrss / 1024, out)


def build_model(out: Path) -> Path:
    """A random CLIP ViT-B/32 (CLIPConfig's defaults) with the demo's small tokenizer."""
    code = (
        "import json, sys, torch\nfrom pathlib import Path\nfrom transformers import CLIPConfig, CLIPModel\n"
        "from retrieval.demo.tiny import ARCHS, BOS, EOS, save_tokenizer_and_processor\n"
        "out = Path(sys.argv[1]); save_tokenizer_and_processor(out, ARCHS['vit-b-32'])\n"
        "v = json.loads((out / 'vocab.json').read_text()); torch.manual_seed(0)\n"
        "ids = {'bos_token_id': v[BOS], 'eos_token_id': v[EOS], 'pad_token_id': v[EOS]}\n"
        "CLIPModel(CLIPConfig(text_config=ids)).save_pretrained(str(out))\n"
    )
    run([sys.executable, "-c", code, str(out)])
    return out


#: rclip's files under its data dir (rclip/model_download.py of 4.0.8).
RCLIP_MODEL_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"
RCLIP_LEGAL = ("LICENSE", "OPENAI-CLIP-MIT.txt", "README.md", "THIRD_PARTY_NOTICES.md")
RCLIP_SIZE = 256

_EXPORT = """
import sys, torch
import torch.nn.functional as F
from pathlib import Path
from transformers import CLIPModel

src, out, size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
base = CLIPModel.from_pretrained(src).eval()
config = base.config
config.vision_config.image_size = size
model = CLIPModel(config).eval()
state = {k: v for k, v in base.state_dict().items() if not k.endswith("position_ids")}
key = "vision_model.embeddings.position_embedding.weight"
cls, grid = state[key][:1], state[key][1:]
n, m = int(grid.shape[0] ** 0.5), size // config.vision_config.patch_size
grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)
grid = F.interpolate(grid, size=(m, m), mode="bicubic", align_corners=False)
state[key] = torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(m * m, -1)])
model.load_state_dict(state, strict=False)
model.text_model.eos_token_id = 49407  # rclip's tokenizer ends a text with CLIP's end token


def plain(o):
    return o if torch.is_tensor(o) else o.pooler_output


class Tower(torch.nn.Module):  # one tower of the CLIP model: `features` names the model's method

    def __init__(self, m, features, arg):
        super().__init__()
        self.m, self.features, self.arg = m, features, arg

    def forward(self, x):
        return plain(getattr(self.m, self.features)(**{self.arg: x}))


axes = {"input": {0: "batch"}, "output": {0: "batch"}}
for name, module, example in (
    ("visual.onnx", Tower(model, "get_image_features", "pixel_values"), torch.zeros(1, 3, size, size)),
    ("textual.onnx", Tower(model, "get_text_features", "input_ids"), torch.ones(1, 77, dtype=torch.long)),
):
    torch.onnx.export(
        module, (example,), str(out / name), input_names=["input"], output_names=["output"],
        dynamic_axes=axes, opset_version=17, dynamo=False,
    )
"""


def export_for_rclip(model: Path, vocab: Path, dest: Path) -> Path:
    """rclip's model files from the bench's random weights: both towers as ONNX (float32, as rclip ships
    them) at rclip's input size, CLIP's BPE vocabulary, and placeholder legal files that say what they are."""
    models = dest / RCLIP_MODEL_SUBDIR
    if not (models / "textual.onnx").exists():
        models.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-c", _EXPORT, str(model), str(models), str(RCLIP_SIZE)])
    (dest / "tokenizer").mkdir(exist_ok=True)
    shutil.copyfile(vocab, dest / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz")
    for name in RCLIP_LEGAL:
        (dest / name).write_text(
            "Placeholder written by Clearsight's bench/peer_bench.py: the ONNX files beside it are random "
            "weights, not rclip's model.\n"
        )
    return dest


def rclip_data(models: Path, dest: Path) -> Path:
    """A fresh rclip data dir (its index database) sharing the exported model files."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for entry in models.iterdir():
        (dest / entry.name).symlink_to(entry.resolve())
    return dest


def _rclip_env(data: Path) -> dict[str, str]:
    env = dict(os.environ, RCLIP_DATADIR=str(data), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    return env


def rclip(python: Path, data: Path, photos: Path, text: str, *, index: bool = True, top: int = 10) -> Ran:
    """`rclip [-n] -t TOP -f TEXT` in the photos folder, as its user runs it (it indexes the current
    directory unless -n). 10 hits, as `clearsight search` gives by default."""
    args = [str(python), "-m", "rclip", *([] if index else ["-n"]), "-t", str(top), "-f", text]
    return run(args, env=_rclip_env(data), cwd=photos)


_RCLIP_WARM = """
import json, sys, time
from rclip.main import init_rclip

photos, queries = sys.argv[1], json.loads(sys.argv[2])
searcher, model, db = init_rclip(photos, 8, no_indexing=True)
searcher.search("a warm-up query", photos, 12)
took = []
for text in queries:
    start = time.perf_counter()
    searcher.search(text, photos, 12)
    took.append(time.perf_counter() - start)
print(json.dumps(took))
"""


def rclip_warm(python: Path, data: Path, photos: Path, queries: list[str]) -> list[float]:
    """New text queries on a warm rclip, in process (`RClip.search`, after one warm-up query)."""
    out = run(
        [str(python), "-c", _RCLIP_WARM, str(photos), json.dumps(queries)], env=_rclip_env(data), cwd=photos
    ).out
    return [float(t) for t in json.loads(out.strip().splitlines()[-1])]


def copy_photos(dest: Path, count: int, start: int = 0, source: Path = PHOTOS) -> Path:
    """`count` distinct photo files: the coco-mini photos, again and again, each with its own trailer."""
    sources = sorted(source.rglob("*.jpg"))
    if not sources:
        sys.exit(
            f"no photos under {source}: this bench needs coco-mini (../shared/data/coco-mini or --source)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        src = sources[i % len(sources)]
        (dest / f"{i:05d}_{src.name}").write_bytes(src.read_bytes() + f"copy {i}".encode())
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(http: httpx.Client, text: str) -> float:
    start = time.perf_counter()
    r = http.post("/api/search", json={"text": text, "top_k": 12, "explain": False})
    took = time.perf_counter() - start
    if r.status_code != 200:
        sys.exit(f"POST /api/search answered {r.status_code}: {r.text[:300]}")
    return took


def _curl(base: str, text: str) -> float:
    """One query through curl: its own time_total. httpx answers ~40 ms later than curl from the same
    server on this machine (measured 86 against 46 ms), so the client is part of what the row measures."""
    body = json.dumps({"text": text, "top_k": 12, "explain": False})
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_total}",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data",
            body,
            f"{base}/api/search",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if len(out) != 2 or out[0] != "200":
        sys.exit(f"curl POST /api/search answered {out}")
    return float(out[1])


@contextlib.contextmanager
def busy_loops(n: int = 2) -> Iterator[None]:
    """The fixed synthetic load, for the block: `n` processes spinning in pure Python (one per core here),
    given half a second to take the cores first."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for p in loops:
            p.kill()
            p.wait()


def serve_rows(data: Path, queries: int) -> dict[str, object]:
    """Start `clearsight serve`, then: its first query, warm new queries quiet and under load."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    args = [*CLI, "serve", "--data-dir", str(data), "--host", "127.0.0.1", "--port", str(port)]
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*args, "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        with httpx.Client(base_url=base, timeout=60.0) as http:
            while True:
                if proc.poll() is not None:
                    sys.exit(f"clearsight serve exited with {proc.returncode}")
                try:
                    if http.get("/api/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            ready_s = time.perf_counter() - start
            first = _post(http, QUERIES[0])
            pool = iter(QUERIES[1:] * 10)
            # while the server fills patch features in the background (each hit not stored yet runs the
            # image tower, as every hit did before the fill); then, once it is filled, the steady state
            filling = [_post(http, f"{next(pool)} filling {i}") for i in range(queries)]
            fill_s = _wait_filled(http, proc)
            quiet = [_post(http, f"{next(pool)} {i}") for i in range(queries)]
            curl = (
                [_curl(base, f"{next(pool)} curl {i}") for i in range(queries)]
                if shutil.which("curl")
                else []
            )
            with busy_loops():
                busy = [_post(http, f"{next(pool)} busy {i}") for i in range(queries)]
            rss = _rss_mb(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    return {
        "ready_s": ready_s,
        "first": first,
        "filling": filling,
        "fill_s": fill_s,
        "quiet": quiet,
        "curl": curl,
        "busy": busy,
        "serve_rss_mb": rss,
    }


def _wait_filled(http: httpx.Client, proc: subprocess.Popen[bytes], limit_s: float = 1800.0) -> float | None:
    """Seconds until health says the background fill of patch features is done (None: the server does
    not fill, CLEARSIGHT_PATCH_FEATURES=off). Polled once a second: the poll is not a query."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        if proc.poll() is not None:
            sys.exit(f"clearsight serve exited with {proc.returncode}")
        patches = http.get("/api/health").json().get("patches")
        if patches is None:
            return None
        if patches["idle"] or patches.get("problem"):  # unreadable images stay unfilled: idle says done
            return time.perf_counter() - start
        time.sleep(1.0)
    sys.exit(f"the patch features were not filled within {limit_s:.0f} s")


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _ratio(ours: float, theirs: float) -> str:
    if ours <= theirs:
        return f"{theirs / ours:.1f}x faster" if theirs / ours >= 1.05 else "same"
    return f"{ours / theirs:.1f}x slower"


def _mem_ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=1050, help="photos in the searched collection")
    ap.add_argument("--index-photos", type=int, default=300, help="photos indexed from scratch")
    ap.add_argument("--runs", type=int, default=3, help="cold searches and re-scans (median)")
    ap.add_argument("--queries", type=int, default=8, help="warm new queries, quiet and under load")
    ap.add_argument("--work", type=Path, default=None, help="keep the model, photos and data here")
    ap.add_argument("--source", type=Path, default=PHOTOS, help="the coco-mini images folder")
    ap.add_argument(
        "--rclip", type=Path, default=None, help="the Python of an environment with rclip 4.0.8 (run beside)"
    )
    ap.add_argument("--clip-vocab", type=Path, default=None, help="bpe_simple_vocab_16e6.txt.gz, for rclip")
    args = ap.parse_args()
    if args.rclip is not None:
        if not args.rclip.is_file():
            ap.error(f"--rclip {args.rclip}: no such Python")
        if args.clip_vocab is None or not args.clip_vocab.is_file():
            ap.error("--rclip needs --clip-vocab: CLIP's BPE vocabulary, bpe_simple_vocab_16e6.txt.gz")

    work = args.work or Path(tempfile.mkdtemp(prefix="peer-bench-"))
    model = work / "clip"
    if not (model / "config.json").exists():
        build_model(model)
    photos = work / "photos"
    if not photos.exists():
        copy_photos(photos, args.photos, source=args.source)
    data = work / "data"
    if not (data / "index").exists():
        run([*CLI, "index", str(photos), "--model", str(model), "--data-dir", str(data), "--quiet"])
    rc: Path | None = args.rclip
    rc_models = export_for_rclip(model, args.clip_vocab, work / "rclip-models") if rc else None
    rc_data = work / "rclip-data"
    rc_first: Ran | None = None
    if rc and rc_models is not None and not (rc_data / "db.sqlite3").exists():
        rc_first = rclip(rc, rclip_data(rc_models, rc_data), photos, QUERIES[0])  # rclip indexes the folder

    text = QUERIES[0]
    search_cmd = [*CLI, "search", text, "--data-dir", str(data), "--json"]
    rescan_cmd = [*CLI, "index", str(photos), "--data-dir", str(data), "--quiet"]
    run(search_cmd)  # the first search after indexing: the page cache holds what a user's would
    if rc:
        rclip(rc, rc_data, photos, text, index=False)
    cold: list[Ran] = []
    rescans: list[Ran] = []
    rc_cold: list[Ran] = []
    rc_rescans: list[Ran] = []
    for _ in range(args.runs):  # alternating, as the two would be used
        cold.append(run(search_cmd))
        if rc:
            rc_cold.append(rclip(rc, rc_data, photos, text, index=False))
        rescans.append(run(rescan_cmd))
        if rc:
            rc_rescans.append(rclip(rc, rc_data, photos, text))
    hits = len(json.loads(cold[-1].out[cold[-1].out.index("{") :])["results"])

    served = serve_rows(data, args.queries)
    rc_quiet: list[float] = []
    rc_busy: list[float] = []
    if rc:
        rc_quiet = rclip_warm(
            rc, rc_data, photos, [f"{q} rclip {i}" for i, q in enumerate(QUERIES[: args.queries])]
        )
        with busy_loops():
            rc_busy = rclip_warm(
                rc, rc_data, photos, [f"{q} rclip busy {i}" for i, q in enumerate(QUERIES[: args.queries])]
            )

    fresh = copy_photos(
        work / f"photos-{args.index_photos}", args.index_photos, start=100_000, source=args.source
    )
    fresh_data = work / f"data-{args.index_photos}"
    shutil.rmtree(fresh_data, ignore_errors=True)  # from scratch, also when --work is reused
    index_run = run(
        [*CLI, "index", str(fresh), "--model", str(model), "--data-dir", str(fresh_data), "--quiet"]
    )
    rc_index: Ran | None = None
    if rc and rc_models is not None:  # the same photo files, a fresh rclip database
        rc_index = rclip(rc, rclip_data(rc_models, work / f"rclip-data-{args.index_photos}"), fresh, text)

    med = statistics.median
    quiet, busy, filling, curl = served["quiet"], served["busy"], served["filling"], served["curl"]
    assert isinstance(quiet, list) and isinstance(busy, list) and isinstance(filling, list)
    assert isinstance(curl, list)
    ours = {
        "cold": med(r.seconds for r in cold),
        "rescan": med(r.seconds for r in rescans),
        "warm_quiet": med(quiet),
        "warm_busy": med(busy),
        "index300": index_run.seconds,
        "mem_search": max(r.peak_mb for r in cold),
        "mem_index": index_run.peak_mb,
    }
    if rc and rc_index:
        q = {
            "cold": med(r.seconds for r in rc_cold),
            "rescan": med(r.seconds for r in rc_rescans),
            "warm_quiet": med(rc_quiet),
            "warm_busy": med(rc_busy),
            "index300": rc_index.seconds,
            "mem_search": max(r.peak_mb for r in rc_cold),
            "mem_index": rc_index.peak_mb,
        }
        theirs = "rclip 4.0.8"
        how = (
            f"rclip 4.0.8 **run beside it** ({rc}, ONNX Runtime, float32) on the same weights exported to "
            f"ONNX at its input size {RCLIP_SIZE}, runs alternating; its warm query in process "
            "(`RClip.search`, 12 hits)."
        )
    else:
        q = RCLIP_QUOTED
        theirs = "rclip (quoted)"
        how = "rclip: **quoted from issue 28**, not run here (no --rclip)."
    first = float(served["first"])  # type: ignore[arg-type]
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())

    def spread(xs: list[float]) -> str:
        return f"({min(xs) * 1000:.0f}-{max(xs) * 1000:.0f})" if xs else ""

    lines = [
        f"## Peer bench (issue 28): Clearsight beside rclip, {when} UTC",
        "",
        f"`{' '.join(sys.argv)}` on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; random CLIP ViT-B/32 (CLIPConfig defaults), {args.photos} distinct "
        f"photo files (coco-mini copies), {hits} hits per search from the shell and 12 on a warm "
        f"process. {how}",
        "",
        f"| step | {theirs} | Clearsight | Clearsight / rclip |",
        "|---|---:|---:|---:|",
        f"| `search` from the shell, cold process ({args.runs} runs, median) | {q['cold']:.2f} s | "
        f"{ours['cold']:.2f} s | {_ratio(ours['cold'], q['cold'])} |",
        f"| re-scan with nothing changed ({args.runs} runs, median) | {q['rescan']:.2f} s | "
        f"{ours['rescan']:.2f} s | {_ratio(ours['rescan'], q['rescan'])} |",
        f"| a new text query on a warm process (Clearsight: `POST /api/search`, explain off; {args.queries}, "
        f"median) | {q['warm_quiet'] * 1000:.0f} ms {spread(rc_quiet)} | {ours['warm_quiet'] * 1000:.0f} ms "
        f"{spread(quiet)} | {_ratio(ours['warm_quiet'], q['warm_quiet'])} |",
        "| the same while two busy loops hold both cores | "
        f"{q['warm_busy'] * 1000:.0f} ms {spread(rc_busy)} | "
        f"{ours['warm_busy'] * 1000:.0f} ms {spread(busy)} | {_ratio(ours['warm_busy'], q['warm_busy'])} |",
        f"| index {args.index_photos} photos from scratch, end to end | {q['index300']:.1f} s | "
        f"{ours['index300']:.1f} s | {_ratio(ours['index300'], q['index300'])} |",
        f"| peak memory: a search / an index run | {q['mem_search']:.0f} MB / {q['mem_index']:.0f} MB | "
        f"{ours['mem_search']:.0f} MB / {ours['mem_index']:.0f} MB | "
        f"{_mem_ratio(ours['mem_search'], q['mem_search'])} / "
        f"{_mem_ratio(ours['mem_index'], q['mem_index'])} |",
        "",
        f"- While the server was still filling patch features (just started; each hit not stored yet "
        f"runs the image tower): {med(filling) * 1000:.0f} ms {spread(filling)}; the fill of {args.photos} "
        "photos took "
        + (
            f"{served['fill_s']:.0f} s after those queries."
            if served["fill_s"] is not None
            else "no time (off)."
        )
        + " The two warm rows above are measured once it was filled.",
        (
            f"- The quiet warm query through curl instead of httpx: {med(curl) * 1000:.0f} ms "
            f"{spread(curl)}; against {theirs}: {_ratio(med(curl), q['warm_quiet'])}."
            if curl
            else "- curl is not installed: no curl row."
        ),
        f"- Busy / quiet for a warm query: Clearsight {ours['warm_busy'] / ours['warm_quiet']:.1f}x, "
        f"{theirs} {q['warm_busy'] / q['warm_quiet']:.1f}x.",
        f"- `clearsight serve`: health answered after {served['ready_s']:.1f} s; "
        "the first `POST /api/search` "
        f"took {first * 1000:.0f} ms = {first / ours['warm_quiet']:.1f}x a warm new query "
        f"(issue 26's floor: <= 2x); the server held {served['serve_rss_mb']:.0f} MB.",
        f"- Clearsight's cold searches: {', '.join(f'{r.seconds:.2f}' for r in cold)} s; re-scans: "
        f"{', '.join(f'{r.seconds:.2f}' for r in rescans)} s; "
        f"re-scan peak {max(r.peak_mb for r in rescans):.0f} MB.",
    ]
    if rc:
        lines.append(
            f"- rclip's cold searches: {', '.join(f'{r.seconds:.2f}' for r in rc_cold)} s; re-scans (each "
            f"also searches, as rclip does): {', '.join(f'{r.seconds:.2f}' for r in rc_rescans)} s; re-scan "
            f"peak {max(r.peak_mb for r in rc_rescans):.0f} MB"
            + (
                f"; its first index of the {args.photos} photos took {rc_first.seconds:.1f} s."
                if rc_first
                else "."
            )
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
