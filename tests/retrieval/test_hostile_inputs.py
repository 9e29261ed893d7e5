"""The library's defences against hostile or unlucky inputs (issue 11): each test fails without its fix.

Special files in a folder, files that never end, unreadable directories, images that decode to far
more memory than their file size, ids that outlive their files, and a writer killed between
renaming an index version into place and switching CURRENT to it.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval import Collection, IngestConfig, Query, Searcher, imageio
from retrieval.errors import BadImage
from retrieval.index.faiss_index import VectorIndex
from retrieval.index.store import IndexStore, Manifest
from retrieval.ingest import UNREADABLE_DIR, ingest, walk
from tests.helpers import make_folder

QUIET = IngestConfig(batch_size=4, workers=2, progress=False)


class FifoRescue:
    """Opens a FIFO's write end after a delay, so a reader stuck on it fails a test instead of hanging it."""

    def __init__(self, fifo: Path, after_s: float = 30.0) -> None:
        self.fifo, self.after_s, self.rescued = fifo, after_s, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self._stop.wait(self.after_s):
            return
        while not self._stop.is_set():
            try:  # succeeds only while someone has the FIFO open for reading
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.1)
                continue
            self.rescued = True
            os.close(fd)
            return

    def __enter__(self) -> FifoRescue:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _special_zoo(root: Path) -> dict[str, str]:
    """A FIFO, a socket, a link to a device and a too-large file, each with the reason it must get."""
    make_folder(root, 3)
    os.mkfifo(root / "pipe.jpg")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(root / "sock.png"))
    sock.close()  # the socket file stays behind
    (root / "zero.jpg").symlink_to("/dev/zero")
    (root / "huge.png").write_bytes(b"\x89PNG" + bytes(8000))
    return {
        "pipe.jpg": imageio.NOT_REGULAR,
        "sock.png": imageio.NOT_REGULAR,
        "zero.jpg": imageio.NOT_REGULAR,
        "huge.png": imageio.TOO_LARGE,
    }


def test_special_files_are_recorded_never_read(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    expected = _special_zoo(root)
    col = Collection(tmp_path / "data")
    config = IngestConfig(batch_size=4, workers=2, progress=False, max_file_bytes=4000)
    started = time.monotonic()
    with FifoRescue(root / "pipe.jpg") as rescue:
        summary = ingest(root, col, encoder, config)
    assert not rescue.rescued, "ingest opened the FIFO for reading and blocked on it"
    assert time.monotonic() - started < 30
    failures = {Path(p).name: r for p, r in col.catalog.failures()}
    assert failures == expected
    assert summary.failures == {imageio.NOT_REGULAR: 3, imageio.TOO_LARGE: 1}
    assert summary.encoded == 3


def test_unreadable_directory_is_recorded_and_counted(
    tmp_path: Path, encoder, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    make_folder(root, 2)
    locked = root / "locked"
    make_folder(locked, 2)
    if os.geteuid() == 0:  # root lists any directory, so the permission loss is simulated
        real_scandir = os.scandir

        def scandir(path: object = ".") -> object:
            if str(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "scandir", scandir)
    else:
        locked.chmod(0)
    try:
        col = Collection(tmp_path / "data")
        summary = ingest(root, col, encoder, QUIET)
    finally:
        locked.chmod(0o755)
    assert summary.unreadable_dirs == 1
    assert summary.failures == {UNREADABLE_DIR: 1}
    assert dict(col.catalog.failures()) == {str(locked): UNREADABLE_DIR}
    assert summary.encoded == 2


def test_walk_marks_special_files_without_opening_them(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "a.jpg")
    (tmp_path / "b.png").symlink_to("/dev/null")
    with FifoRescue(tmp_path / "a.jpg", after_s=10) as rescue:
        found = {Path(f.path).name: f.error for f in walk(tmp_path)}
    assert found == {"a.jpg": imageio.NOT_REGULAR, "b.png": imageio.NOT_REGULAR}
    assert not rescue.rescued


def test_read_bytes_refuses_special_files_and_enforces_the_cap_while_reading(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "p.jpg")
    with FifoRescue(tmp_path / "p.jpg", after_s=10) as rescue, pytest.raises(BadImage) as err:
        imageio.read_bytes(tmp_path / "p.jpg")
    assert err.value.reason == imageio.NOT_REGULAR and not rescue.rescued
    with pytest.raises(BadImage) as err:
        imageio.read_bytes(Path("/dev/zero"))
    assert err.value.reason == imageio.NOT_REGULAR
    # /proc files are regular but report size 0: only the count while reading can stop them
    assert os.stat("/proc/self/maps").st_size == 0
    with pytest.raises(BadImage) as err:
        imageio.read_bytes(Path("/proc/self/maps"), max_bytes=16)
    assert err.value.reason == imageio.TOO_LARGE
    (tmp_path / "ok.bin").write_bytes(b"x" * 16)
    assert imageio.read_bytes(tmp_path / "ok.bin", max_bytes=16) == b"x" * 16


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 200 if mode in ("L", "P") else (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "P", "L"])
def test_non_jpeg_images_are_reduced_early(mode: str) -> None:
    data = _png((2400, 1800), mode)
    dec = imageio.decode(data, draft_size=224)
    assert (dec.width, dec.height) == (2400, 1800)  # the full size is still reported
    assert dec.image.mode == "RGB"
    assert 224 <= min(dec.image.size) < 2 * 224  # reduced, never below the size asked for
    assert dec.image.getpixel((5, 5)) == imageio.decode(data).image.getpixel((5, 5))  # same colours


def test_concurrent_decodes_stay_within_the_budget() -> None:
    data = _png((2000, 2000))
    one = imageio.decode_cost((2000, 2000), "RGB", reduced=True)
    budget = imageio.DecodeBudget(2 * one)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            imageio.decode(data, draft_size=224, budget=budget)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert budget.peak <= 2 * one
    assert budget.peak >= one and budget.in_use == 0


def test_a_decode_larger_than_the_budget_runs_alone() -> None:
    budget = imageio.DecodeBudget(1000)
    entered = threading.Event()
    order: list[str] = []
    with budget.hold(400):

        def big() -> None:
            entered.set()
            with budget.hold(10**9):
                order.append("big")

        t = threading.Thread(target=big)
        t.start()
        entered.wait(5)
        time.sleep(0.2)
        order.append("small done")
    t.join(timeout=5)
    assert order == ["small done", "big"]
    assert budget.in_use == 0


def test_pixel_limit_is_checked_from_the_header_for_every_format() -> None:
    for fmt in ("PNG", "WEBP", "BMP", "GIF", "TIFF"):
        buf = io.BytesIO()
        Image.new("RGB", (1000, 1000)).save(buf, fmt)
        budget = imageio.DecodeBudget(1 << 30)
        with pytest.raises(BadImage) as err:
            imageio.decode(buf.getvalue(), max_pixels=999_999, budget=budget)
        assert err.value.reason == imageio.BOMB, fmt
        assert budget.peak == 0, f"{fmt} was decoded before its pixel count was checked"


def test_error_messages_do_not_name_in_memory_files() -> None:
    with pytest.raises(BadImage) as err:
        imageio.decode(b"this is not an image at all")
    assert "BytesIO" not in str(err.value) and "0x" not in str(err.value)


def test_search_fills_the_page_however_many_ids_went_stale(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "photos"
    make_folder(root, 40)
    col = Collection(tmp_path / "data")
    ingest(root, col, encoder, QUIET)
    s = Searcher.open(tmp_path / "data", encoder=encoder)
    ranked = [h.id for h in s.search(Query(text="a red circle", top_k=40)).results]
    assert len(ranked) == 40
    # the 30 best are deleted from the catalog while the live index still holds them (before a sync)
    col.catalog.delete_images(ranked[:30])
    page = s.search(Query(text="a red circle", top_k=10)).results
    assert [h.id for h in page] == ranked[30:]
    assert [h.rank for h in page] == list(range(1, 11))
    assert s.search(Query(text="a red circle", top_k=5, offset=5)).results[0].id == ranked[35]
    s.collection.close()


def _save(store: IndexStore, n: int) -> str:
    v = np.eye(16, dtype=np.float32)[:n]
    m = Manifest("m", "/m", "fp", 16, "flat", "Flat", n)
    return store.save(
        m, VectorIndex.build(np.arange(n), v, "Flat", 16), VectorIndex.build(np.arange(0), v[:0], "Flat", 16)
    )


def test_cleanup_keeps_the_live_version_after_a_crash_before_the_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = IndexStore(tmp_path / "index")
    _save(store, 2)
    live = _save(store, 3)
    real_replace = os.replace

    def killed(src: object, dst: object) -> None:
        if Path(str(dst)).name == "CURRENT":
            raise KeyboardInterrupt("killed between the version's rename and the CURRENT switch")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(store, 4)
    monkeypatch.setattr(os, "replace", real_replace)
    orphan = max(p.name for p in store.root.glob("v[0-9]*"))
    assert orphan > live and store.current_version() == live
    assert store.load().manifest.count == 3  # the live version still loads after the crash
    newest = _save(store, 5)
    left = sorted(p.name for p in store.root.glob("v[0-9]*"))
    assert left == sorted({live, newest}), "cleanup must keep CURRENT's old version, not the orphan"
    assert store.load().manifest.count == 5


def test_png_orientation_is_read_inside_the_budget() -> None:
    """PNG's getexif() decodes the whole image (to find an eXIf chunk after the pixels): it must not run
    before the decode has reserved its memory, or concurrent uploads add up outside the budget."""
    budget = imageio.DecodeBudget(1 << 30)
    loads_outside: list[bool] = []
    real_getexif = Image.Image.getexif

    def spy(self: Image.Image) -> Image.Exif:
        loads_outside.append(budget.in_use == 0)
        return real_getexif(self)

    try:
        Image.Image.getexif = spy  # type: ignore[method-assign]
        imageio.decode(_png((600, 400)), draft_size=64, budget=budget)
    finally:
        Image.Image.getexif = real_getexif  # type: ignore[method-assign]
    assert loads_outside and not any(loads_outside)
