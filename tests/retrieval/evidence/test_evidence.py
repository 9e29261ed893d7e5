"""Region evidence: coordinates, batching, selection, bad input, storage, rendering and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps
from typer.testing import CliRunner

from explainer.cli.app import app
from retrieval import Query, Searcher
from retrieval.encoders import Encoder
from retrieval.encoders.preprocess import PreprocessConfig, preprocess_one
from retrieval.errors import ConfigError
from retrieval.evidence import (
    EvidenceConfig,
    EvidenceTarget,
    PatchStore,
    dense_evidence,
    evidence_for_hits,
    grid_boxes,
    grid_evidence,
    grid_evidence_per_hit,
    render_evidence,
    select_regions,
    store_patch_features,
    stored_evidence,
    view_geometry,
)
from retrieval.evidence.dense import component_stats, label_components, mask_runs
from retrieval.evidence.grid import crop_for_encoder, select_regions_counted
from retrieval.evidence.render import colour_map
from tests.helpers import make_folder

runner = CliRunner()


def _scene(size: tuple[int, int], blob: tuple[int, int, int, int]) -> Image.Image:
    im = Image.new("RGB", size, (235, 235, 235))
    ImageDraw.Draw(im).ellipse(blob, fill=(220, 30, 30))
    return im


def _inside(box: tuple[int, int, int, int], size: tuple[int, int]) -> bool:
    x0, y0, x1, y1 = box
    return 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]


# -- coordinates ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(300, 120), (90, 250), (64, 64), (65, 63)])
@pytest.mark.parametrize(
    "pre",
    [
        PreprocessConfig(64, None, (64, 64), 2, 1 / 255, (0, 0, 0), (1, 1, 1)),  # CLIP: shortest edge + crop
        PreprocessConfig(None, (48, 80), None, 2, 1 / 255, (0, 0, 0), (1, 1, 1)),  # SigLIP: squash
        PreprocessConfig(40, None, (64, 32), 2, 1 / 255, (0, 0, 0), (1, 1, 1)),  # crop larger: padding
    ],
)
def test_view_geometry_matches_real_preprocessing(size: tuple[int, int], pre: PreprocessConfig) -> None:
    """Encode each pixel's own coordinates, preprocess, and read back where each model pixel came from."""
    w, h = size
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    coded = np.stack([xs * 255 // max(1, w - 1), ys * 255 // max(1, h - 1), np.full_like(xs, 255)], -1)
    arr = preprocess_one(Image.fromarray(coded.astype(np.uint8), "RGB"), pre)
    g = view_geometry(w, h, pre)
    ch, cw = arr.shape[1:]
    assert (g.crop_w, g.crop_h) == (cw, ch)
    seen = arr[2] > 0.5  # padding is black: only real pixels are compared
    u, v = np.meshgrid(np.arange(cw) + 0.5, np.arange(ch) + 0.5)
    want_x = (g.ox + u * g.sx) / max(1, w - 1) * 255
    want_y = (g.oy + v * g.sy) / max(1, h - 1) * 255
    # one source pixel of slack for resampling
    assert np.abs(arr[0] * 255 - want_x)[seen].max() <= 255 / max(1, w - 1) * 1.5 + 2
    assert np.abs(arr[1] * 255 - want_y)[seen].max() <= 255 / max(1, h - 1) * 1.5 + 2


def test_grid_boxes_cover_non_square_images_in_original_pixels() -> None:
    cells = grid_boxes(300, 120, (3,))
    assert [b for b, _ in cells][:3] == [(0, 0, 100, 40), (100, 0, 200, 40), (200, 0, 300, 40)]
    area = sum((x1 - x0) * (y1 - y0) for (x0, y0, x1, y1), _ in cells)
    assert area == 300 * 120
    overlapping = grid_boxes(300, 120, (2, 3), overlap=0.25)
    assert all(_inside(b, (300, 120)) for b, _ in overlapping)
    assert max(b[2] for b, _ in overlapping) == 300 and max(b[3] for b, _ in overlapping) == 120


def test_grid_and_dense_boxes_land_on_a_non_square_image(encoder: Encoder) -> None:
    """Queried by what the encoder sees of the bottom-right cell, that cell must come first, with score 1."""
    im = _scene((400, 160), (300, 90, 360, 150))
    cell = (267, 107, 400, 160)
    query = encoder.encode_images([crop_for_encoder(im, 400, 160, cell, encoder.pre)])[0]  # type: ignore[attr-defined]
    ev = grid_evidence(encoder, query, [EvidenceTarget.from_image(7, im)], EvidenceConfig(grids=(3,)))[0]
    assert ev.hit_id == 7 and ev.image_size == (400, 160)
    assert ev.regions[0].box == cell and ev.regions[0].score == pytest.approx(1.0, abs=1e-5)
    assert all(_inside(r.box, (400, 160)) for r in ev.regions)
    dense = dense_evidence(encoder, query, [EvidenceTarget.from_image(7, im)], EvidenceConfig())[0]
    assert dense.heatmap_box == (120, 0, 280, 160)  # the model's centre crop, in original pixels
    assert all(_inside(r.box, (400, 160)) and r.box[0] >= 120 and r.box[2] <= 280 for r in dense.regions)


def test_exif_rotated_images_get_boxes_in_displayed_orientation(encoder: Encoder, tmp_path: Path) -> None:
    shown = _scene((90, 180), (10, 120, 60, 170))  # as displayed: portrait, blob bottom left
    stored = shown.rotate(90, expand=True)  # stored sideways; orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    assert ImageOps.exif_transpose(Image.open(path)).size == (90, 180)
    query = encoder.encode_texts(["a red circle"])
    cfg = EvidenceConfig(grids=(2, 3))
    from_file = grid_evidence(encoder, query, [EvidenceTarget.from_path(1, path)], cfg)[0]
    assert from_file.image_size == (90, 180)
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    in_memory = grid_evidence(encoder, query, [EvidenceTarget.from_image(1, upright)], cfg)[0]
    assert [r.box for r in from_file.regions] == [r.box for r in in_memory.regions]
    assert all(_inside(r.box, (90, 180)) for r in from_file.regions)
    dense = dense_evidence(encoder, query, [EvidenceTarget.from_path(1, path)], EvidenceConfig())[0]
    assert dense.image_size == (90, 180) and all(_inside(r.box, (90, 180)) for r in dense.regions)
    assert render_evidence(upright, dense).size == (90, 180)


# -- batching and selection -------------------------------------------------------------------


def test_batched_grid_equals_per_hit_grid(encoder: Encoder) -> None:
    images = [
        _scene((120 + 20 * i, 100), (10 * i, 20, 10 * i + 40, 60)).rotate(5 * i, fillcolor="white")
        for i in range(5)
    ]
    targets = [EvidenceTarget.from_image(i, im) for i, im in enumerate(images)]
    query = encoder.encode_texts(["a red circle in the top left"])
    for cfg in (EvidenceConfig(batch_size=7), EvidenceConfig(grids=(3,), overlap=0.3, batch_size=32)):
        batched = grid_evidence(encoder, query, targets, cfg)
        looped = grid_evidence_per_hit(encoder, query, targets, cfg)
        for a, b in zip(batched, looped, strict=True):
            assert a.hit_id == b.hit_id and len(a.regions) == len(b.regions)
            np.testing.assert_allclose([r.score for r in a.regions], [r.score for r in b.regions], atol=1e-5)
            np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-4)  # type: ignore[arg-type]
            # blank cells score alike to the last bit; they may swap places, nothing else may
            same = {r.box: r.score for r in b.regions}
            assert all(abs(same[r.box] - r.score) < 1e-5 for r in a.regions if r.box in same)
            assert a.regions[0].box == b.regions[0].box


def test_adaptive_selection_rule() -> None:
    scores = np.array([0.9, 0.89, 0.5, 0.4, 0.3, 0.86, 0.1], np.float32)
    boxes = [(i, 0, i + 1, 1) for i in range(len(scores))]
    labels = [str(i) for i in range(len(scores))]

    def pick(**kw: float) -> list[str]:
        return [r.label for r in select_regions(boxes, labels, scores, EvidenceConfig(**kw))]  # type: ignore[arg-type]

    assert pick(top_n=2, ratio=0.95) == ["0", "1", "5"]  # within 0.95 of the best adds "5"
    assert pick(top_n=4, ratio=0.95) == ["0", "1", "5", "2"]  # always the top four
    assert pick(top_n=1, ratio=0.5) == ["0", "1", "5", "2"]  # everything above 0.45
    assert pick(top_n=1, ratio=0.1, max_regions=3) == ["0", "1", "5"]  # capped when asked
    # the reference rule with the defaults: top 4 plus all within 95 % of the best, never capped
    flat = np.array([0.9] * 12 + [0.1], np.float32)
    many = select_regions_counted(
        [(i, 0, i + 1, 1) for i in range(13)], [str(i) for i in range(13)], flat, EvidenceConfig()
    )
    assert len(many[0]) == 12 and many[1] == 0
    capped = select_regions_counted(
        [(i, 0, i + 1, 1) for i in range(13)],
        [str(i) for i in range(13)],
        flat,
        EvidenceConfig(max_regions=5),
    )
    assert len(capped[0]) == 5 and capped[1] == 7  # the cap says what it dropped
    regions = select_regions(boxes, labels, scores, EvidenceConfig())
    assert [r.rank for r in regions] == list(range(1, len(regions) + 1))
    negative = np.array([-0.1, -0.104, -0.5], np.float32)
    picked = select_regions(boxes[:3], labels[:3], negative, EvidenceConfig(top_n=1, ratio=0.95))
    assert [r.label for r in picked] == ["0", "1"]  # within 5% of |best| also for negative scores
    with pytest.raises(ConfigError):
        EvidenceConfig(top_n=9, max_regions=8)
    with pytest.raises(ConfigError):
        EvidenceConfig(method="magic")


def test_connected_components() -> None:
    mask = np.array([[1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 0, 1], [1, 1, 0, 1]], bool)
    labels, n = label_components(mask)
    assert n == 3
    assert len({labels[0, 0], labels[0, 1], labels[1, 1]}) == 1  # 4-connected
    assert labels[2, 0] != labels[1, 1]  # diagonal only: separate
    assert (labels == 0).sum() == (~mask).sum()


def _flood_labels(mask: np.ndarray) -> np.ndarray:
    """The reference: breadth-first flood fill from each unlabelled cell in raster order."""
    rows, cols = mask.shape
    out = np.zeros(mask.shape, np.int32)
    n = 0
    for y in range(rows):
        for x in range(cols):
            if not mask[y, x] or out[y, x]:
                continue
            n += 1
            out[y, x] = n
            todo = [(y, x)]
            while todo:
                cy, cx = todo.pop()
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < rows and 0 <= nx < cols and mask[ny, nx] and not out[ny, nx]:
                        out[ny, nx] = n
                        todo.append((ny, nx))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_connected_components_match_a_flood_fill(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    mask = rng.random((rows, cols)) < rng.uniform(0.1, 0.9)
    if seed == 0:  # a spiral: the shape a label would need the longest walk to cross
        mask = np.zeros((15, 15), bool)
        mask[0, :] = mask[:, 14] = mask[14, :] = mask[2:, 0] = mask[2, :13] = mask[2:13, 12] = True
    values = rng.random(mask.shape).astype(np.float32)
    want = _flood_labels(mask)
    labels, n = label_components(mask)
    assert n == want.max()
    assert np.array_equal(labels, want)  # numbered by first cell in raster order, as the flood fill
    stats = component_stats(mask_runs(mask), values)
    assert len(stats) == n
    for k, (best, x0, y0, x1, y1, cells) in enumerate(stats, start=1):
        ys, xs = np.nonzero(want == k)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert cells == len(xs)
        assert best == pytest.approx(float(values[ys, xs].max()))


def test_connected_components_of_empty_and_full_masks() -> None:
    labels, n = label_components(np.zeros((4, 5), bool))
    assert n == 0 and not labels.any()
    labels, n = label_components(np.ones((4, 5), bool))
    assert n == 1 and (labels == 1).all()


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (1, 1), "red"),
        _scene((10000, 50), (5000, 5, 5040, 45)),
        _scene((50, 3000), (5, 1500, 45, 1540)),
        Image.new("RGBA", (64, 48), (0, 0, 0, 0)),  # fully transparent
        Image.new("RGB", (10, 10), "blue"),  # with 16x16 grids: finer than the image
    ],
    ids=["1x1", "10000x50", "50x3000", "transparent", "grid-finer-than-image"],
)
def test_degenerate_images_get_sensible_evidence(encoder: Encoder, image: Image.Image) -> None:
    query = encoder.encode_texts(["a red circle"])
    target = EvidenceTarget.from_image(0, image)
    for cfg in (EvidenceConfig(), EvidenceConfig(grids=(16,), min_region_px=4)):
        for fn in (grid_evidence, dense_evidence):
            ev = fn(encoder, query, [target], cfg)[0]
            assert ev.regions and ev.image_size == image.size
            assert all(_inside(r.box, image.size) for r in ev.regions)
            assert all(np.isfinite(r.score) for r in ev.regions)
            assert render_evidence(image, ev).size == image.size


def test_unreadable_hits_get_a_note_not_a_crash(encoder: Encoder, tmp_path: Path) -> None:
    bad = tmp_path / "gone.jpg"
    good = _scene((64, 64), (10, 10, 30, 30))
    targets = [EvidenceTarget(0, 64, 64, path=str(bad)), EvidenceTarget.from_image(1, good)]
    query = encoder.encode_texts(["a red circle"])
    for fn in (grid_evidence, dense_evidence):
        first, second = fn(encoder, query, targets, EvidenceConfig())
        assert first.regions == () and first.note and "unreadable" in first.note
        assert second.regions


def test_top_k_larger_than_the_collection(tiny_clip_dir: Path, tmp_path: Path) -> None:
    images, data = tmp_path / "images", tmp_path / "data"
    make_folder(images, 3)
    r = runner.invoke(
        app, ["index", str(images), "--model", str(tiny_clip_dir), "--data-dir", str(data), "-q"]
    )
    assert r.exit_code == 0, r.output
    searcher = Searcher.open(data)
    q = Query(text="a red square", top_k=50)
    hits = searcher.search(q).results
    assert len(hits) == 3
    for method in ("grid", "dense", "stored"):
        evidence = evidence_for_hits(searcher, q, hits, EvidenceConfig(method=method))  # type: ignore[arg-type]
        assert [e.hit_id for e in evidence] == [h.id for h in hits]
        assert all(e.regions for e in evidence)
    assert evidence_for_hits(searcher, q, [], EvidenceConfig()) == []
    searcher.close()


# -- stored patch features ---------------------------------------------------------------------


class _NoForward:
    """An encoder stand-in that refuses to run: stored evidence must not need the model."""

    def __init__(self, real: Encoder) -> None:
        self.info = real.info
        self.pre = real.pre  # type: ignore[attr-defined]

    def patch_embeddings(self, pixels: np.ndarray, surgery: bool = True) -> np.ndarray:
        raise AssertionError("stored evidence ran the encoder")


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_stored_patch_features_match_dense(encoder: Encoder, tmp_path: Path, dtype: str) -> None:
    images = [_scene((80 + 30 * i, 64), (5 + 20 * i, 10, 35 + 20 * i, 40)) for i in range(3)]
    targets = [EvidenceTarget.from_image(i, im, key=f"{i:02d}cafe") for i, im in enumerate(images)]
    store = PatchStore(tmp_path, encoder.info, dtype=dtype)
    report = store_patch_features(encoder, store, targets)
    patches = 8 * 8 * encoder.info.dim
    assert report.written == 3 and report.bytes_per_image == 128 + patches * (1 if dtype == "int8" else 2)
    assert store_patch_features(encoder, store, targets).skipped == 3
    query = encoder.encode_texts(["a red circle"])
    cfg = EvidenceConfig()
    without_pixels = [EvidenceTarget(t.id, t.width, t.height, key=t.key) for t in targets]
    stored = stored_evidence(_NoForward(encoder), query, without_pixels, cfg, store)  # type: ignore[arg-type]
    dense = dense_evidence(encoder, query, targets, cfg)
    for s, d in zip(stored, dense, strict=True):
        assert s.method == "stored" and s.regions[0].box == d.regions[0].box
        assert abs(s.regions[0].score - d.regions[0].score) < 0.02
        np.testing.assert_allclose(s.heatmap, d.heatmap, atol=0.05)  # type: ignore[arg-type]


# -- rendering and the CLI --------------------------------------------------------------------


def test_colour_map_and_heatmap_overlay(encoder: Encoder) -> None:
    ramp = colour_map(np.linspace(0, 1, 5, dtype=np.float32))
    assert ramp.shape == (5, 3) and ramp.dtype == np.uint8
    assert ramp[0].sum() < ramp[-1].sum()  # dark to bright
    im = _scene((160, 90), (10, 10, 50, 50))
    ev = dense_evidence(
        encoder, encoder.encode_texts(["red"]), [EvidenceTarget.from_image(0, im)], EvidenceConfig()
    )[0]
    for style in ("boxes", "heatmap", "both"):
        out = render_evidence(im, ev, style)
        assert out.size == im.size and out.mode == "RGB"
        assert np.asarray(out).astype(int).sum() != np.asarray(im).astype(int).sum()
    with pytest.raises(ConfigError):
        render_evidence(im, ev, "sparkles")


@pytest.mark.slow
def test_cli_writes_annotated_pngs_and_boxes(tiny_clip_dir: Path, tmp_path: Path) -> None:
    images, data, out = tmp_path / "images", tmp_path / "data", tmp_path / "evidence"
    files = make_folder(images, 6)
    wide = images / "wide.png"
    _scene((400, 100), (300, 10, 380, 90)).save(wide)
    r = runner.invoke(
        app, ["index", str(images), "--model", str(tiny_clip_dir), "--data-dir", str(data), "-q"]
    )
    assert r.exit_code == 0, r.output
    for method in ("dense", "grid"):
        argv = ["search", "a red circle", "-k", "7", "--data-dir", str(data), "--json"]
        r = runner.invoke(app, [*argv, "--evidence", str(out / method), "--evidence-method", method])
        assert r.exit_code == 0, r.output
        results = json.loads(r.stdout)["results"]
        assert len(results) == 7
        for row in results:
            size = Image.open(row["path"]).size
            assert row["evidence"] and row["evidence_method"] == method
            assert all(_inside(tuple(e["box"]), size) for e in row["evidence"])  # type: ignore[arg-type]
            assert [e["rank"] for e in row["evidence"]] == list(range(1, len(row["evidence"]) + 1))
            assert Image.open(row["evidence_png"]).size == size
        assert len(list((out / method).glob("*.png"))) == 7
    assert len(files) == 6
    r = runner.invoke(app, ["search", "red", "--data-dir", str(data), "--evidence", str(out / "t")])
    assert r.exit_code == 0 and "annotated PNGs" in r.stdout
    r = runner.invoke(
        app, ["search", "red", "--captions", "--data-dir", str(data), "--evidence-method", "grid"]
    )
    assert r.exit_code == 2 and "captions" in r.stderr
    r = runner.invoke(app, ["search", "red", "--data-dir", str(data), "--evidence-method", "magic"])
    assert r.exit_code == 2 and "unknown evidence method" in r.stderr


def test_index_with_patches_makes_stored_evidence_match_dense(tiny_clip_dir: Path, tmp_path: Path) -> None:
    images, data = tmp_path / "images", tmp_path / "data"
    make_folder(images, 5)
    argv = ["index", str(images), "--model", str(tiny_clip_dir), "--data-dir", str(data), "-q", "--json"]
    r = runner.invoke(app, [*argv, "--patches"])
    assert r.exit_code == 0, r.output
    stored = json.loads(r.stdout)["patches"]
    assert stored["written"] == 5 and stored["failed"] == 0 and stored["bytes_per_image"] > 0
    store_files = [p for p in data.rglob("*.npy")]
    assert len(store_files) == 5
    again = runner.invoke(app, [*argv, "--patches"])  # incremental: nothing new to store
    assert json.loads(again.stdout)["patches"] == {
        **stored,
        "written": 0,
        "already_stored": 5,
        "bytes_per_image": 0,
    }
    boxes = {}
    for method in ("stored", "dense"):
        q = [
            "search",
            "a red circle",
            "-k",
            "3",
            "--data-dir",
            str(data),
            "--json",
            "--evidence-method",
            method,
        ]
        r = runner.invoke(app, q)
        assert r.exit_code == 0, r.output
        boxes[method] = [[e["box"] for e in row["evidence"]] for row in json.loads(r.stdout)["results"]]
    assert all(boxes["stored"]) and len(boxes["stored"]) == 3
    # int8 storage may move a box by a cell at most: the top box of each hit overlaps dense's top box
    for s_rows, d_rows in zip(boxes["stored"], boxes["dense"], strict=True):
        (sx0, sy0, sx1, sy1), (dx0, dy0, dx1, dy1) = s_rows[0], d_rows[0]
        assert min(sx1, dx1) > max(sx0, dx0) and min(sy1, dy1) > max(sy0, dy0), (s_rows[0], d_rows[0])


def test_auto_uses_stored_features_once_they_exist(tiny_clip_dir: Path, tmp_path: Path) -> None:
    images, data = tmp_path / "images", tmp_path / "data"
    make_folder(images, 3)
    base = ["index", str(images), "--model", str(tiny_clip_dir), "--data-dir", str(data), "-q"]
    search = [
        "search",
        "a red circle",
        "-k",
        "2",
        "--data-dir",
        str(data),
        "--json",
        "--evidence-method",
        "auto",
    ]
    off = runner.invoke(app, base, env={"CLEARSIGHT_PATCH_FEATURES": "off"})  # no features stored
    assert off.exit_code == 0, off.output
    first = json.loads(runner.invoke(app, search).stdout)["results"]
    assert {row["evidence_method"] for row in first} == {"dense"}
    assert runner.invoke(app, [*base, "--patches"]).exit_code == 0
    second = json.loads(runner.invoke(app, search).stdout)["results"]
    assert {row["evidence_method"] for row in second} == {"stored"}
