"""Decoding for ingest: the JPEG fast path agrees with Pillow's, workers are sized sanely, and a decode
process that dies costs speed, never files."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval import Collection, IngestConfig
from retrieval import decode_pool as dp
from retrieval.encoders import Encoder
from retrieval.encoders.preprocess import PreprocessConfig
from retrieval.errors import BadImage
from retrieval.ingest import ingest
from tests.helpers import make_folder

CLIP = PreprocessConfig(
    224,
    None,
    (224, 224),
    3,
    1 / 255,
    (0.48145466, 0.4578275, 0.40821073),
    (0.26862954, 0.26130258, 0.27577711),
)
FAST = dp.DecodeSpec(CLIP, 224, 10**9)
PILLOW = dp.DecodeSpec(CLIP, 224, 10**9, fast_jpeg=False)


def jpeg(w: int, h: int, mode: str = "RGB", orientation: int | None = None, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8), "RGB").resize(
        (w, h), Image.BICUBIC
    )
    im = base.convert(mode)
    buf = io.BytesIO()
    if orientation is None:
        im.save(buf, "JPEG", quality=92)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


needs_simplejpeg = pytest.mark.skipif(dp.simplejpeg is None, reason="simplejpeg not installed")


@needs_simplejpeg
@pytest.mark.parametrize("orientation", [None, 3, 6, 8])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_scaled_jpeg_decoding_agrees_with_pillow(mode: str, orientation: int | None) -> None:
    data = jpeg(640, 427, mode, orientation)
    fast = dp._scaled_jpeg(data, FAST)
    assert fast is not None  # the fast path took it
    slow = dp.decode_uint8(data, PILLOW)
    assert (fast.width, fast.height) == (slow.width, slow.height)  # displayed size, upright
    assert fast.pixels.shape == slow.pixels.shape == (224, 224, 3)
    # the same picture as Pillow's path (decoded at the scale its draft mode picks)
    assert np.abs(fast.pixels.astype(int) - slow.pixels.astype(int)).mean() < 3


@needs_simplejpeg
def test_the_fast_path_declines_what_pillow_must_handle() -> None:
    assert dp._scaled_jpeg(jpeg(300, 200, "CMYK"), FAST) is None
    assert dp._scaled_jpeg(b"\xff\xd8 not really a jpeg", FAST) is None
    assert dp._scaled_jpeg(jpeg(300, 200), dp.DecodeSpec(CLIP, 224, 1000)) is None
    png = io.BytesIO()
    Image.new("RGB", (30, 30)).save(png, "PNG")
    assert dp._scaled_jpeg(png.getvalue(), FAST) is None


def test_bad_images_keep_their_reasons_on_every_path() -> None:
    with pytest.raises(BadImage) as bomb:
        dp.decode_uint8(jpeg(300, 200), dp.DecodeSpec(CLIP, 224, 1000))
    assert bomb.value.reason == "decompression bomb"
    with pytest.raises(BadImage) as bad:
        dp.decode_uint8(jpeg(300, 200)[:300], FAST)
    assert bad.value.reason == "truncated or corrupt"
    with pytest.raises(ValueError, match="preprocessing config"):
        dp.decode_uint8(jpeg(30, 20), dp.DecodeSpec(None, 224, 10**9))


def test_worker_sizing() -> None:
    assert dp.max_workers(None, 16, "cuda") == 15  # one core left for the feeder
    assert dp.max_workers(None, 2, "cpu") == 2
    assert dp.max_workers(None, 1, "cuda") == 1
    assert dp.max_workers(3, 16, "cuda") == 3
    with pytest.raises(ValueError, match="at least 1"):
        dp.max_workers(0, 2, "cpu")
    assert dp.needed_workers(None, 0.01, 8) == 8  # nothing measured: all
    assert dp.needed_workers(0.004, 0.001, 8) == 5  # 4 decoders keep up, plus the margin
    assert dp.needed_workers(0.004, 0.0001, 8) == 8
    assert dp.needed_workers(0.0001, 0.01, 8) == 1
    assert not dp.use_processes("auto", 2) and dp.use_processes("auto", 8)
    assert dp.use_processes("processes", 1) and not dp.use_processes("threads", 64)
    with pytest.raises(ValueError, match="unknown decoder"):
        dp.use_processes("gpu", 2)


def test_the_limiter_bounds_concurrency_and_follows_a_new_limit() -> None:
    lim = dp.Limiter(2)
    peak, now = [0], [0]
    lock = threading.Lock()

    def work() -> None:
        with lim:
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            time.sleep(0.01)
            with lock:
                now[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2
    lim.set_limit(0)
    assert lim.limit == 1  # never below one, or nothing would decode


def _crash_on_small(data: bytes, spec: dp.DecodeSpec) -> dp.DecodedPixels:
    """A decode job whose process dies on one kind of input, as a crashing codec would."""
    if len(data) < 2000:
        os._exit(3)
    return dp.decode_uint8(data, spec)


def test_a_dead_decode_process_falls_back_to_threads_without_losing_an_image() -> None:
    said: list[str] = []
    pool = dp.DecodePool(2, FAST, said.append, job=_crash_on_small)
    try:
        first = pool.decode(jpeg(64, 48, seed=1))  # small: the process dies; decoded in the thread
        later = [pool.decode(jpeg(400, 300, seed=s)) for s in range(3)]
    finally:
        pool.close()
    assert first.pixels.shape == (224, 224, 3)
    assert all(d.pixels.shape == (224, 224, 3) for d in later)
    assert pool.broken is not None
    assert len(said) == 1 and "decode worker process died" in said[0]


def test_bad_images_come_back_from_processes_with_their_reason() -> None:
    pool = dp.DecodePool(1, FAST)
    try:
        ok = pool.decode(jpeg(300, 200))
        with pytest.raises(BadImage) as bad:
            pool.decode(b"\xff\xd8\xff\xe0 truncated")
    finally:
        pool.close()
    assert ok.pixels.shape == (224, 224, 3)
    assert bad.value.reason in ("truncated or corrupt", "not an image")
    assert pool.broken is None


def test_ingest_with_decode_processes_stores_what_threads_store(tmp_path: Path, encoder: Encoder) -> None:
    root = tmp_path / "photos"
    make_folder(root, 5)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    vectors = {}
    for decoder in ("threads", "processes"):
        with Collection(tmp_path / decoder) as col:
            cfg = IngestConfig(batch_size=2, workers=2, decoder=decoder, progress=False)
            s = ingest(root, col, encoder, cfg)
            assert (s.encoded, s.failed_now, s.accounts()) == (5, 1, True)
            assert s.failures == {"truncated or corrupt": 1} or s.failures == {"not an image": 1}
            recs = sorted(col.catalog.iter_images("indexed"), key=lambda r: r.path)
            got = col.catalog.get_embeddings(
                [r.content_hash for r in recs if r.content_hash], encoder.info.fingerprint
            )
            vectors[decoder] = np.stack([got[r.content_hash] for r in recs if r.content_hash])
    np.testing.assert_allclose(vectors["threads"], vectors["processes"], atol=1e-6)


def test_a_shut_gate_holds_decoders_until_the_forward_ends() -> None:
    gate = dp.Gate(active=True)
    passed = threading.Event()

    def decoder() -> None:
        gate.wait()
        passed.set()

    with gate.shut():
        t = threading.Thread(target=decoder)
        t.start()
        assert not passed.wait(0.2)  # held while the forward runs
    assert passed.wait(5)  # and let through once it ends
    t.join()


def test_an_inactive_gate_never_blocks_and_a_failed_forward_reopens_it() -> None:
    idle = dp.Gate(active=False)
    with idle.shut():
        idle.wait()  # would hang if it shut
    gate = dp.Gate(active=True)
    with pytest.raises(RuntimeError), gate.shut():
        raise RuntimeError("forward failed")
    gate.wait()  # open again after the exception


def test_the_gate_is_used_only_when_the_forward_covers_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    fake = types.SimpleNamespace(get_num_threads=lambda: 2)
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert dp.forward_fills_cores("cpu", 2)
    assert not dp.forward_fills_cores("cpu", 4)  # cores left over: decoding beside the forward is free
    assert not dp.forward_fills_cores("cuda:0", 2)  # a GPU forward leaves the cores to decoding
    monkeypatch.delitem(sys.modules, "torch")
    assert not dp.forward_fills_cores("cpu", 2)  # no torch: an encoder without torch threads


def test_ray_decode_batches_are_the_same_in_threads_and_in_turn(tmp_path: Path) -> None:
    """A GPU actor decodes its batch in threads; the rows, their order and failures equal a CPU actor's."""
    from concurrent.futures import ThreadPoolExecutor

    from retrieval.distributed.stages import decode_batch

    files = make_folder(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths = [*files, tmp_path / "imgs" / "bad.jpg"]
    items = {"image_id": np.arange(len(paths)), "path": np.asarray([str(p) for p in paths], dtype=object)}
    alone = decode_batch(items, FAST, 10**8)
    with ThreadPoolExecutor(3) as pool:
        threaded = decode_batch(items, FAST, 10**8, pool=pool)
    for key in ("image_id", "content_hash", "width", "height", "error", "dup"):
        assert list(alone[key]) == list(threaded[key]), key
    assert np.array_equal(alone["pixels"], threaded["pixels"])
    assert alone["error"][-1] and not any(alone["error"][:-1])  # the broken file has a reason, no other
    assert alone["pixels"][:-1].any(axis=(1, 2, 3)).all()
