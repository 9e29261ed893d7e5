"""Synthetic scenes: determinism, boxes that match the pixels, and captions that tell the truth.

Positions and relations are recomputed here from the boxes with the test's own rules, so a bug
shared by the generator's captioning and its geometry helpers cannot hide itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.demo.synthetic import (
    BACKGROUND,
    PALETTE,
    SHAPES,
    Scene,
    SyntheticConfig,
    caption_holds,
    generate_scenes,
    query_for,
    read_scene_boxes,
    relations_between,
    render_scene,
    write_scenes,
)
from retrieval.errors import ConfigError

SMALL = SyntheticConfig(
    n_train=40, n_val=10, n_test=10, image_size=64, max_objects=3, composition_fraction=0.5, seed=7
)
COLOURS = "|".join(PALETTE)
OBJECT_RE = re.compile(rf"\ban? ({COLOURS}) ({'|'.join(SHAPES)})\b")
RELATION_RE = re.compile(
    rf"^(?:there is |a picture of )?an? ({COLOURS}) (\w+) "
    rf"(to the left of|left of|to the right of|right of|above|below) an? ({COLOURS}) (\w+)$"
)
#: Share of its box each shape covers; distinct enough that a wrong shape would show.
FILL = {"square": (1.0, 1.0), "circle": (0.70, 0.86), "triangle": (0.42, 0.62), "cross": (0.45, 0.66)}


def _cell(box: tuple[int, int, int, int], size: int) -> tuple[int, int]:
    """(row, col) of the box centre on a 3×3 grid, computed independently of the generator."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(2, int(cy * 3 // size)), min(2, int(cx * 3 // size))


def _check_position_words(text: str, row: int, col: int) -> None:
    words = set(re.findall(r"[a-z]+", text))
    assert ("top" in words) == (row == 0), text
    assert ("bottom" in words) == (row == 2), text
    assert ("left" in words) == (col == 0), text
    assert ("right" in words) == (col == 2), text
    if row == 1 or col == 1:
        assert words & {"centre", "middle"}, text


def _relation_holds(rel: str, a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    if "left" in rel:
        return a[2] <= b[0]
    if "right" in rel:
        return b[2] <= a[0]
    if rel == "above":
        return a[3] <= b[1]
    return b[3] <= a[1]  # below


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return generate_scenes(SMALL)


def test_same_seed_gives_byte_identical_dataset(tmp_path: Path) -> None:
    config = SyntheticConfig(n_train=6, n_val=2, n_test=2, image_size=64, background_noise=5.0, seed=3)
    first = write_scenes(config, tmp_path / "a")
    second = write_scenes(config, tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    pngs = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(pngs) == 10
    for rel in pngs:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    other = write_scenes(SyntheticConfig(n_train=6, n_val=2, n_test=2, image_size=64, seed=4), tmp_path / "c")
    assert other.read_bytes() != first.read_bytes()
    assert generate_scenes(config) == generate_scenes(config)


def test_growing_train_leaves_val_and_test_unchanged() -> None:
    small = generate_scenes(SyntheticConfig(n_train=3, n_val=4, n_test=4, seed=1))
    large = generate_scenes(SyntheticConfig(n_train=9, n_val=4, n_test=4, seed=1))
    assert [s for s in small if s.split != "train"] == [s for s in large if s.split != "train"]
    assert small[:3] == large[:3]


def test_split_counts_and_paths(tmp_path: Path) -> None:
    config = SyntheticConfig(n_train=7, n_val=3, n_test=2, image_size=48)
    scenes = generate_scenes(config)
    assert [s.split for s in scenes] == ["train"] * 7 + ["val"] * 3 + ["test"] * 2
    assert len({s.image_id for s in scenes}) == 12
    assert scenes[7].path == "images/val/scene_00001.png"
    jsonl = write_scenes(config, tmp_path, progress=False)
    for split, count in (("train", 7), ("val", 3), ("test", 2)):
        files = sorted((tmp_path / "images" / split).glob("*.png"))
        assert len(files) == count
        with Image.open(files[0]) as im:
            assert im.size == (48, 48) and im.mode == "RGB"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["split"] for r in records] == [s.split for s in scenes]
    assert set(records[0]) == {"image", "captions", "split", "objects"}
    assert all((tmp_path / r["image"]).is_file() for r in records)


def test_empty_splits_are_allowed() -> None:
    scenes = generate_scenes(SyntheticConfig(n_train=0, n_val=0, n_test=2))
    assert [s.split for s in scenes] == ["test", "test"]


@pytest.mark.parametrize("noise", [0.0, 4.0])
def test_boxes_match_drawn_pixels(scenes: list[Scene], noise: float) -> None:
    checked_shapes: set[str] = set()
    for scene in scenes[:30]:
        scene = Scene(**{**scene.__dict__, "noise": noise})
        pixels = np.asarray(render_scene(scene), dtype=np.int16)
        outside = np.ones(pixels.shape[:2], dtype=bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert all(isinstance(v, int) for v in obj.box)
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert x1 - x0 == y1 - y0 and 0.19 * 64 <= x1 - x0 <= 0.46 * 64
            colour = np.asarray(PALETTE[obj.colour])
            assert (pixels[(y0 + y1) // 2, (x0 + x1) // 2] == colour).all(), obj
            mask = (pixels[y0:y1, x0:x1] == colour).all(axis=2)
            ys, xs = np.nonzero(mask)
            # The shape touches all four sides of its box: the box is tight.
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x1 - x0, y1 - y0), obj
            lo, hi = FILL[obj.shape]
            assert lo <= mask.mean() <= hi, (obj, mask.mean())
            outside[y0:y1, x0:x1] = False
            checked_shapes.add(obj.shape)
        deviation = np.abs(pixels[outside] - np.asarray(BACKGROUND)).max()
        assert deviation <= 6 * noise, (scene.image_id, deviation)
        if noise:
            assert deviation > 0
    assert checked_shapes == set(SHAPES)


def test_objects_do_not_overlap_and_positions_match_boxes(scenes: list[Scene]) -> None:
    names = {(0, 0): "top left", (0, 1): "top centre", (0, 2): "top right"}
    names |= {(1, 0): "centre left", (1, 1): "centre", (1, 2): "centre right"}
    names |= {(2, 0): "bottom left", (2, 1): "bottom centre", (2, 2): "bottom right"}
    for scene in scenes:
        for obj in scene.objects:
            assert obj.position == names[_cell(obj.box, scene.size)]
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, (a, b)
                assert (a.colour, a.shape) != (b.colour, b.shape)


def test_captions_state_true_positions_and_relations(scenes: list[Scene]) -> None:
    relation_captions = 0
    for scene in scenes:
        by_name = {(o.colour, o.shape): o for o in scene.objects}
        assert len(scene.captions) == SMALL.captions_per_image == len(set(scene.captions))
        assert query_for(scene) == scene.captions[0]
        if len(scene.objects) > 1:
            assert RELATION_RE.match(scene.captions[0]), scene.captions[0]
        for caption in scene.captions:
            match = RELATION_RE.match(caption)
            if match:
                a = by_name[(match[1], match[2])]
                b = by_name[(match[4], match[5])]
                assert _relation_holds(match[3], a.box, b.box), (caption, a.box, b.box)
                relation_captions += 1
                continue
            # A positional caption: every object it names is followed by that object's position.
            segments = re.split(r", | and ", caption)
            named = 0
            for segment in segments:
                mentions = OBJECT_RE.findall(segment)
                assert len(mentions) == 1, caption
                obj = by_name[mentions[0]]
                _check_position_words(segment, *_cell(obj.box, scene.size))
                named += 1
            assert named == len(scene.objects), caption
    assert relation_captions > 20


def test_composition_fraction_is_respected() -> None:
    scenes = generate_scenes(SyntheticConfig(n_train=300, n_val=0, n_test=0, composition_fraction=0.3))
    share = sum(len(s.objects) == 2 for s in scenes) / len(scenes)
    assert 0.2 < share < 0.4
    assert {len(s.objects) for s in generate_scenes(SyntheticConfig(n_train=50, max_objects=1))} == {1}
    crowded = generate_scenes(SyntheticConfig(n_train=50, n_val=0, n_test=0, min_objects=3, max_objects=4))
    assert {len(s.objects) for s in crowded} == {3, 4}


def test_jsonl_round_trip(tmp_path: Path, scenes: list[Scene]) -> None:
    jsonl = write_scenes(SMALL, tmp_path, progress=False)
    boxes = read_scene_boxes(jsonl)
    assert list(boxes) == [s.path for s in scenes]
    for scene in scenes:
        assert boxes[scene.path] == list(scene.objects)
        assert isinstance(boxes[scene.path][0].box, tuple)
    captions = [json.loads(line)["captions"] for line in jsonl.read_text().splitlines()]
    assert captions == [list(s.captions) for s in scenes]


def test_read_scene_boxes_rejects_malformed_lines(tmp_path: Path) -> None:
    bad = tmp_path / "captions.jsonl"
    bad.write_text('{"image": "a.png", "objects": [{"colour": "red", "shape": "circle", "box": [1, 2]}]}\n')
    with pytest.raises(ConfigError, match=r"captions\.jsonl:1"):
        read_scene_boxes(bad)
    bad.write_text("\nnot json\n")
    with pytest.raises(ConfigError, match=r"captions\.jsonl:2"):
        read_scene_boxes(bad)


def test_progress_bar_only_for_large_runs_and_can_be_disabled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = SyntheticConfig(n_train=501, n_val=0, n_test=0, image_size=32, max_objects=1)
    write_scenes(config, tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""
    write_scenes(config, tmp_path / "loud")
    assert "synthetic scenes" in capsys.readouterr().err
    assert len(list((tmp_path / "loud" / "images" / "train").glob("*.png"))) == 501


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"n_train": -1}, "n_train"),
        ({"n_test": 2.5}, "n_test"),
        ({"seed": -3}, "seed"),
        ({"image_size": 31}, "image_size"),
        ({"min_objects": 0}, "min_objects"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"max_objects": 5}, "max_objects"),
        ({"composition_fraction": 1.5}, "composition_fraction"),
        ({"max_object_frac": 0.6}, "max_object_frac"),
        ({"captions_per_image": 0}, "captions_per_image"),
        ({"background_noise": -1.0}, "background_noise"),
        ({"colours": ("red", "teal")}, "teal"),
        ({"colours": ("red",), "shapes": ("circle",), "max_objects": 2}, "distinct"),
    ],
)
def test_invalid_configs_raise_config_error(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SyntheticConfig(**changes)  # type: ignore[arg-type]


def test_unambiguous_eval_splits_give_every_caption_one_right_image() -> None:
    from retrieval.demo.synthetic import caption_claims, scene_facts

    plain = SyntheticConfig(n_train=20, n_val=60, n_test=150, max_objects=2, seed=0)
    strict = replace(plain, unambiguous_eval=True)
    scenes = generate_scenes(strict)
    # the training split is drawn exactly as without the option
    assert [s for s in scenes if s.split == "train"] == [
        s for s in generate_scenes(plain) if s.split == "train"
    ]
    for split, n in (("val", 60), ("test", 150)):
        kept = [s for s in scenes if s.split == split]
        assert [s.image_id for s in kept] == [f"{split}/scene_{k:05d}" for k in range(1, n + 1)]
        facts = [scene_facts(s) for s in kept]
        for scene in kept:
            for claim in caption_claims(scene):
                assert sum(claim <= f for f in facts) == 1, (scene.image_id, claim)
    # without the option, some test caption fits two scenes: the reason the option exists
    loose = [s for s in generate_scenes(plain) if s.split == "test"]
    loose_facts = [scene_facts(s) for s in loose]
    assert any(sum(c <= f for f in loose_facts) > 1 for s in loose for c in caption_claims(s))


def test_unambiguous_eval_refuses_an_impossible_request() -> None:
    cfg = SyntheticConfig(
        n_train=0,
        n_val=0,
        n_test=40,
        max_objects=1,
        colours=("red",),
        shapes=("circle",),
        unambiguous_eval=True,
    )
    with pytest.raises(ConfigError, match="mutually unambiguous"):
        generate_scenes(cfg)


def test_caption_holds_scores_canonical_captions_against_the_scene() -> None:
    scenes = generate_scenes(SyntheticConfig(n_train=200, n_val=0, n_test=0, seed=3))
    singles = [s for s in scenes if len(s.objects) == 1]
    pairs = [s for s in scenes if len(s.objects) == 2]
    assert singles and pairs
    for scene in scenes:
        assert caption_holds(scene.captions[0], scene), scene.captions[0]
    one = singles[0]
    obj = one.objects[0]
    other_colour = next(c for c in PALETTE if c != obj.colour)
    assert not caption_holds(one.captions[0].replace(obj.colour, other_colour), one)
    assert not caption_holds(f"a {obj.colour} {obj.shape} in the nowhere", one)
    assert not caption_holds("some words", one)
    pair = pairs[0]
    a, b = pair.objects
    relation = relations_between(a.box, b.box)[0]
    inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
    assert caption_holds(f"{b.phrase} {inverse} {a.phrase}", pair)  # said the other way round
    assert not caption_holds(f"{a.phrase} {inverse} {b.phrase}", pair)
    assert not caption_holds(f"{a.phrase} in the {a.position}", pair)  # true of one object, not the scene
    centre = next((s for s in singles if s.objects[0].position == "centre"), None)
    if centre is not None:
        assert caption_holds(f"{centre.objects[0].phrase} in the middle", centre)
