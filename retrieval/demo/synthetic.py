"""Synthetic captioned scenes: coloured shapes at known places, drawn with Pillow.

No model hub is reachable here, so real training, evaluation and region evidence cannot lean on
downloaded weights or photos with boxes. These scenes stand in: a tiny CLIP trained on them for a
minute on the CPU retrieves far above chance, and because every object's box is known, evidence
regions can be scored against ground truth. Everything is derived from `(seed, scene index)`, so a
seed reproduces byte-identical PNGs and JSONL, and each split is seeded on its own, so growing the
training set leaves the validation and test scenes unchanged (runs stay comparable).

Boxes are half-open pixel rectangles `[x0, y0, x1, y1]` (the object covers columns `x0 .. x1-1`),
so `x1 - x0` is the width, as with NumPy slicing; each shape touches all four sides of its box.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from retrieval.errors import ConfigError

__all__ = [
    "BACKGROUND",
    "PALETTE",
    "POSITIONS",
    "SHAPES",
    "SPLITS",
    "Box",
    "Scene",
    "SceneObject",
    "SyntheticConfig",
    "caption_claims",
    "caption_holds",
    "generate_scenes",
    "position_of",
    "query_for",
    "read_scene_boxes",
    "relations_between",
    "render_scene",
    "scene_facts",
    "write_scenes",
]

Box = tuple[int, int, int, int]

#: Saturated, mutually distant colours: a tiny encoder must tell them apart after resizing.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 215, 20),
    "purple": (140, 40, 180),
    "orange": (250, 135, 10),
}
#: Shapes whose silhouettes stay distinct at 64 px and which all cover their box centre.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: Light grey: far from every palette colour, so object pixels are unambiguous.
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: The 3×3 grid, row-major; the name of a box is the cell its centre falls in.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top centre",
    "top right",
    "centre left",
    "centre",
    "centre right",
    "bottom left",
    "bottom centre",
    "bottom right",
)
_MAX_OBJECTS = 4
_MAX_CAPTIONS = 5
_GAP = 2  # pixels of background kept between two objects, so their boxes never touch
_PLACEMENT_ATTEMPTS = 60
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape; `position` names the grid cell of its box centre."""

    colour: str
    shape: str
    box: Box
    position: str

    @property
    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Everything needed to redraw a scene exactly and to score evidence against its boxes."""

    #: Unique across splits ("val/scene_00003"); the image lives at `images/{image_id}.png`.
    image_id: str
    split: str
    size: int
    objects: tuple[SceneObject, ...]
    captions: tuple[str, ...]
    noise: float = 0.0
    noise_seed: int = 0

    @property
    def path(self) -> str:
        """Image path relative to the dataset directory, as written to `captions.jsonl`."""
        return f"images/{self.image_id}.png"


@dataclass(frozen=True)
class SyntheticConfig:
    """How many scenes of what kind; validated on construction so a bad config fails before any work."""

    n_train: int = 1000
    n_val: int = 200
    n_test: int = 200
    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 2
    #: Share of scenes with two or more objects and a relation caption (when max_objects allows it).
    composition_fraction: float = 0.4
    #: Object side as a fraction of the image side: big enough to be seen at 64 px.
    min_object_frac: float = 0.2
    max_object_frac: float = 0.45
    captions_per_image: int = 4
    #: Standard deviation (0–255 levels) of Gaussian noise on the background; objects stay flat.
    background_noise: float = 0.0
    colours: tuple[str, ...] = tuple(PALETTE)
    shapes: tuple[str, ...] = SHAPES
    seed: int = 0
    #: Keep validation and test scenes whose captions are true of no other scene of their split, so
    #: every caption query has one right image and R@1 can reach 1 (with random scenes, two images
    #: often fit "a red circle in the top left" and R@1 is capped near 0.7 for 200 test scenes).
    #: Training scenes stay as drawn: ambiguity there is harmless and their number unbounded.
    unambiguous_eval: bool = False

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(self.image_size, int) or self.image_size < 32:
            raise ConfigError(f"image_size must be at least 32 pixels, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= _MAX_OBJECTS:
            raise ConfigError(
                f"need 1 <= min_objects <= max_objects <= {_MAX_OBJECTS}, "
                f"got {self.min_objects} and {self.max_objects}"
            )
        if not 0.0 <= self.composition_fraction <= 1.0:
            raise ConfigError(f"composition_fraction must be in [0, 1], got {self.composition_fraction}")
        if not 0.1 <= self.min_object_frac <= self.max_object_frac <= 0.45:
            raise ConfigError(
                "need 0.1 <= min_object_frac <= max_object_frac <= 0.45 (larger objects cannot keep "
                f"their centre in an edge third), got {self.min_object_frac} and {self.max_object_frac}"
            )
        if not 1 <= self.captions_per_image <= _MAX_CAPTIONS:
            raise ConfigError(f"captions_per_image must be 1..{_MAX_CAPTIONS}, got {self.captions_per_image}")
        if not 0.0 <= self.background_noise <= 64.0:
            raise ConfigError(f"background_noise must be in [0, 64], got {self.background_noise}")
        unknown = sorted(set(self.colours) - set(PALETTE)) + sorted(set(self.shapes) - set(SHAPES))
        if unknown:
            raise ConfigError(
                f"unknown colours/shapes {unknown}; known: {sorted(PALETTE)} and {list(SHAPES)}"
            )
        if len(set(self.colours)) != len(self.colours) or len(set(self.shapes)) != len(self.shapes):
            raise ConfigError("colours and shapes must not repeat")
        if not self.colours or not self.shapes:
            raise ConfigError("need at least one colour and one shape")
        if len(self.colours) * len(self.shapes) < self.max_objects:
            raise ConfigError(
                f"{self.max_objects} objects per scene need as many distinct colour/shape pairs, "
                f"but only {len(self.colours) * len(self.shapes)} exist"
            )

    @property
    def split_sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}


def position_of(box: Box, size: int) -> str:
    """Name the 3×3 grid cell holding the box centre (the rule captions are written by)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col, row = min(2, int(3 * cx / size)), min(2, int(3 * cy / size))
    return POSITIONS[3 * row + col]


def relations_between(a: Box, b: Box) -> list[str]:
    """Relations of `a` to `b` that hold strictly (boxes separated on that axis), strongest first.

    Strict separation keeps every relation caption true; ordering by centre offset makes the
    primary caption the one a person would say.
    """
    found: list[tuple[float, str]] = []
    dx = (a[0] + a[2] - b[0] - b[2]) / 2
    dy = (a[1] + a[3] - b[1] - b[3]) / 2
    if a[2] <= b[0]:
        found.append((abs(dx), "left of"))
    if b[2] <= a[0]:
        found.append((abs(dx), "right of"))
    if a[3] <= b[1]:
        found.append((abs(dy), "above"))
    if b[3] <= a[1]:
        found.append((abs(dy), "below"))
    return [name for _, name in sorted(found, key=lambda t: -t[0])]


def query_for(scene: Scene) -> str:
    """The canonical caption: a stable text query per scene for retrieval evaluation."""
    return scene.captions[0]


def _axis_starts(cell: int, side: int, size: int) -> list[int]:
    """Start coordinates keeping the object inside the image with its centre inside third `cell`.

    Centres are kept a little away from the inner grid lines so that the position a caption names
    is visibly right, not a coin toss at the border.
    """
    lo, hi = cell * size / 3, (cell + 1) * size / 3
    margin = 0.04 * size
    inner_lo = lo + (margin if cell > 0 else 0.0)
    inner_hi = hi - (margin if cell < 2 else 0.0)
    starts = [s for s in range(size - side + 1) if inner_lo <= s + side / 2 < inner_hi]
    return starts or [s for s in range(size - side + 1) if lo <= s + side / 2 < hi]


def _apart(a: Box, b: Box) -> bool:
    return a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1] or b[3] + _GAP <= a[1]


def _place(n: int, cfg: SyntheticConfig, rng: np.random.Generator) -> list[Box]:
    """Non-overlapping boxes in distinct cells; retries are bounded and the fallback always fits."""
    size = cfg.image_size
    smin = max(4, round(cfg.min_object_frac * size))
    smax = max(smin, round(cfg.max_object_frac * size))
    for attempt in range(_PLACEMENT_ATTEMPTS):
        cells = rng.choice(9, size=n, replace=False)
        # Later attempts use the smallest objects: crowded scenes then fit almost always.
        boxes: list[Box] = []
        for cell in cells:
            side = smin if attempt >= _PLACEMENT_ATTEMPTS // 2 else int(rng.integers(smin, smax + 1))
            xs, ys = _axis_starts(int(cell) % 3, side, size), _axis_starts(int(cell) // 3, side, size)
            x0, y0 = xs[int(rng.integers(len(xs)))], ys[int(rng.integers(len(ys)))]
            boxes.append((x0, y0, x0 + side, y0 + side))
        if all(_apart(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
            return boxes
    far = size - smin
    corners: list[Box] = [
        (0, 0, smin, smin),
        (far, far, size, size),
        (far, 0, size, smin),
        (0, far, smin, size),
    ]
    return corners[:n]


def _where(position: str, rng: np.random.Generator, canonical: bool = False) -> str:
    variants = [f"in the {position}"]
    if position == "centre":
        variants.append("in the middle")
    elif " " in position and "centre" not in position:
        variants.append(f"in the {position} corner")
    return variants[0] if canonical else variants[int(rng.integers(len(variants)))]


def _single_captions(obj: SceneObject, rng: np.random.Generator) -> list[str]:
    o, pos = obj.phrase, obj.position
    return [
        f"{o} {_where(pos, rng, canonical=True)}",
        f"there is {o} {_where(pos, rng)}",
        f"a picture of {o} {_where(pos, rng)}",
        f"{o} {_where(pos, rng)} of the image",
        f"the {pos} of the image shows {o}",
        f"a plain background with {o} {_where(pos, rng)}",
    ]


def _composition_captions(objects: Sequence[SceneObject], rng: np.random.Generator) -> list[str]:
    a, b = objects[0], objects[1]
    rels = relations_between(a.box, b.box)  # never empty: placed boxes are apart on some axis
    rel = rels[0]
    other = rels[int(rng.integers(len(rels)))]
    wordy = {"left of": "to the left of", "right of": "to the right of"}
    inverse = _INVERSE[other]
    listing = [f"{obj.phrase} {_where(obj.position, rng)}" for obj in objects]
    listed = listing[0] if len(listing) == 1 else ", ".join(listing[:-1]) + " and " + listing[-1]
    return [
        f"{a.phrase} {rel} {b.phrase}",
        f"{a.phrase} {wordy.get(other, other)} {b.phrase}",
        f"{b.phrase} {inverse} {a.phrase}",
        f"there is {b.phrase} {wordy.get(inverse, inverse)} {a.phrase}",
        listed,
        f"a picture of {a.phrase} {rel} {b.phrase}",
    ]


def _pick_captions(candidates: list[str], k: int, rng: np.random.Generator) -> tuple[str, ...]:
    """Keep the canonical first caption and add distinct random paraphrases."""
    rest = list(dict.fromkeys(c for c in candidates[1:] if c != candidates[0]))
    order = rng.permutation(len(rest))
    return (candidates[0], *(rest[int(i)] for i in order[: k - 1]))


def _object_count(cfg: SyntheticConfig, rng: np.random.Generator) -> int:
    lo_multi = max(2, cfg.min_objects)
    can_single = cfg.min_objects == 1
    can_multi = cfg.max_objects >= 2
    multi = can_multi and (not can_single or rng.random() < cfg.composition_fraction)
    return int(rng.integers(lo_multi, cfg.max_objects + 1)) if multi else 1


def _make_scene(cfg: SyntheticConfig, split: str, number: int, width: int) -> Scene:
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLITS.index(split), number]))
    n = _object_count(cfg, rng)
    boxes = _place(n, cfg, rng)
    pairs = [(c, s) for c in cfg.colours for s in cfg.shapes]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    objects = tuple(
        SceneObject(pairs[int(j)][0], pairs[int(j)][1], box, position_of(box, cfg.image_size))
        for j, box in zip(chosen, boxes, strict=True)
    )
    candidates = _single_captions(objects[0], rng) if n == 1 else _composition_captions(objects, rng)
    return Scene(
        image_id=f"{split}/scene_{number:0{width}d}",
        split=split,
        size=cfg.image_size,
        objects=objects,
        captions=_pick_captions(candidates, cfg.captions_per_image, rng),
        noise=cfg.background_noise,
        noise_seed=int(rng.integers(2**32)),
    )


Fact = tuple[str, ...]


def _relation_fact(a: SceneObject, relation: str, b: SceneObject) -> Fact:
    """One spelling per relation: "b right of a" and "a left of b" are the same fact."""
    if relation in ("right of", "below"):
        a, b, relation = b, a, _INVERSE[relation]
    return ("rel", a.colour, a.shape, relation, b.colour, b.shape)


def _object_fact(obj: SceneObject) -> Fact:
    return ("obj", obj.colour, obj.shape, obj.position)


def scene_facts(scene: Scene) -> frozenset[Fact]:
    """Everything true of a scene that a caption can say: each object at its place, every strict relation."""
    facts = {_object_fact(o) for o in scene.objects}
    for a in scene.objects:
        for b in scene.objects:
            if a is not b:
                facts.update(_relation_fact(a, r, b) for r in relations_between(a.box, b.box))
    return frozenset(facts)


def caption_claims(scene: Scene) -> list[frozenset[Fact]]:
    """What the scene's captions can assert, one fact set per caption kind (paraphrases share one)."""
    objects = scene.objects
    if len(objects) == 1:
        return [frozenset({_object_fact(objects[0])})]
    a, b = objects[0], objects[1]
    claims = [frozenset({_relation_fact(a, r, b)}) for r in relations_between(a.box, b.box)]
    claims.append(frozenset(_object_fact(o) for o in objects))  # the listing names every object
    return claims


_OBJECT = r"an? (\w+) (\w+)"
_SAYS_PLACE = re.compile(rf"^{_OBJECT} in the (.+?)(?: corner)?$")
_SAYS_RELATION = re.compile(rf"^{_OBJECT} (left of|right of|above|below) {_OBJECT}$")


def caption_holds(text: str, scene: Scene) -> bool:
    """Whether a caption in the canonical forms ("a red circle in the top left", "a red circle left of a
    blue square") is true of the scene: for scoring a captioner. A single-object caption must also name
    the scene's only object; any other wording counts as not true."""
    text = " ".join(text.lower().split())
    placed = _SAYS_PLACE.match(text)
    if placed:
        colour, shape, where = placed.groups()
        where = "centre" if where == "middle" else where
        return len(scene.objects) == 1 and _object_fact(scene.objects[0]) == ("obj", colour, shape, where)
    related = _SAYS_RELATION.match(text)
    if not related:
        return False
    c1, s1, relation, c2, s2 = related.groups()
    by_kind = {(o.colour, o.shape): o for o in scene.objects}
    a, b = by_kind.get((c1, s1)), by_kind.get((c2, s2))
    return a is not None and b is not None and a is not b and relation in relations_between(a.box, b.box)


def _ambiguous(claims: list[frozenset[Fact]], facts: frozenset[Fact]) -> bool:
    return any(claim <= facts for claim in claims)


def _unambiguous_split(config: SyntheticConfig, split: str, size: int, width: int) -> list[Scene]:
    """The first `size` candidate scenes (in seed order) that no caption confuses with one kept before."""
    kept: list[Scene] = []
    kept_claims: list[list[frozenset[Fact]]] = []
    kept_facts: list[frozenset[Fact]] = []
    number = 0
    limit = 50 * size + 1000
    while len(kept) < size:
        number += 1
        if number > limit:
            raise ConfigError(
                f"could not find {size} mutually unambiguous {split} scenes in {limit} draws: "
                "use fewer scenes, or more colours, shapes or objects per scene"
            )
        scene = _make_scene(config, split, number, width)
        claims, facts = caption_claims(scene), scene_facts(scene)
        if any(
            _ambiguous(claims, other_facts) or _ambiguous(other_claims, facts)
            for other_claims, other_facts in zip(kept_claims, kept_facts, strict=True)
        ):
            continue
        kept.append(replace(scene, image_id=f"{split}/scene_{len(kept) + 1:0{width}d}"))
        kept_claims.append(claims)
        kept_facts.append(facts)
    return kept


def generate_scenes(config: SyntheticConfig) -> list[Scene]:
    """All scenes of all splits (train, then val, then test), numbered from 1 within each split."""
    sizes = config.split_sizes
    width = max(5, len(str(max(sizes.values()))))
    out: list[Scene] = []
    for split in SPLITS:
        if config.unambiguous_eval and split != "train":
            out.extend(_unambiguous_split(config, split, sizes[split], width))
        else:
            out.extend(_make_scene(config, split, k, width) for k in range(1, sizes[split] + 1))
    return out


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene; shapes are drawn over the noise so their pixels are exactly the palette colour."""
    size = scene.size
    if scene.noise > 0:
        rng = np.random.default_rng(scene.noise_seed)
        noise = rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(scene.noise)
        noisy = np.asarray(BACKGROUND, dtype=np.float32) + noise
        image = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")
    else:
        image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        colour = PALETTE[obj.colour]
        x0, y0, x1, y1 = obj.box
        last_x, last_y = x1 - 1, y1 - 1  # Pillow's coordinates are inclusive
        if obj.shape == "circle":
            draw.ellipse((x0, y0, last_x, last_y), fill=colour)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, last_x, last_y), fill=colour)
        elif obj.shape == "triangle":
            draw.polygon([(x0, last_y), (last_x, last_y), ((x0 + last_x) / 2, y0)], fill=colour)
        elif obj.shape == "cross":
            side = x1 - x0
            bar = max(2, round(side / 3))
            off = (side - bar) // 2
            draw.rectangle((x0, y0 + off, last_x, y0 + off + bar - 1), fill=colour)
            draw.rectangle((x0 + off, y0, x0 + off + bar - 1, last_y), fill=colour)
        else:  # pragma: no cover - SceneObject shapes come from SHAPES
            raise ConfigError(f"unknown shape {obj.shape!r}")
    return image


def _record(scene: Scene) -> dict[str, Any]:
    return {
        "image": scene.path,
        "captions": list(scene.captions),
        "split": scene.split,
        "objects": [
            {"colour": o.colour, "shape": o.shape, "box": list(o.box), "position": o.position}
            for o in scene.objects
        ],
    }


def write_scenes(config: SyntheticConfig, out_dir: Path, *, progress: bool = True) -> Path:
    """Write PNGs under `out_dir/images/{split}/` and `out_dir/captions.jsonl`; return the JSONL path.

    The JSONL is the generic captioned-dataset layout (paths relative to `out_dir`), so the same
    loaders, trainers and evaluators read synthetic and real data alike.
    """
    scenes = generate_scenes(config)
    out_dir = Path(out_dir)
    for split in SPLITS:
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "captions.jsonl"
    bar = tqdm(scenes, desc="synthetic scenes", unit="img", disable=not progress or len(scenes) <= 500)
    with jsonl.open("w", encoding="utf-8") as fh:
        for scene in bar:
            render_scene(scene).save(out_dir / scene.path, format="PNG")
            fh.write(json.dumps(_record(scene), ensure_ascii=False) + "\n")
    return jsonl


def _parse_object(raw: Any, where: str) -> SceneObject:
    try:
        box = tuple(int(v) for v in raw["box"])
        if len(box) != 4:
            raise ValueError("box needs four numbers")
        return SceneObject(
            str(raw["colour"]), str(raw["shape"]), (box[0], box[1], box[2], box[3]), str(raw["position"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: malformed object {raw!r} ({exc}); regenerate the dataset") from exc


def read_scene_boxes(jsonl_path: Path) -> dict[str, list[SceneObject]]:
    """Ground-truth boxes keyed by image path relative to the dataset directory, for evidence scoring."""
    jsonl_path = Path(jsonl_path)
    boxes: dict[str, list[SceneObject]] = {}
    with jsonl_path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{jsonl_path}:{number}"
            try:
                record = json.loads(line)
                image, objects = record["image"], record.get("objects", [])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(f"{where}: not a scene record ({exc})") from exc
            if not isinstance(objects, list):
                raise ConfigError(f"{where}: 'objects' must be a list")
            boxes[str(image)] = [_parse_object(o, where) for o in objects]
    return boxes
