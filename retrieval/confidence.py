"""Confidence calibrated per collection and model, so a query that matches nothing says so.

A raw cosine score means nothing on its own: its range depends on the model and the collection
("a purple elephant playing the piano" reaches 0.8 on a collection of shapes with a tiny model,
0.25 on photos with CLIP). So a hit's score is compared with what *unrelated* queries reach on the
same collection with the same model, its null distribution:

- text queries (and text+image): a bank of everyday sentences about other things (`NULL_QUERIES`)
  is searched against the collection (a deterministic sample of up to `sample_size` items); the best
  score each reaches forms the null;
- image queries over images: images of the collection searched for their nearest *other* image;
- image queries over captions: images of the collection scored against the unrelated sentences,
  i.e. the best an image reaches on captions that are not about it.

Scores are compared on a stretched scale, `-log(1 - cosine)`, where a step from 0.96 to 0.98 counts
as much as one from 0.92 to 0.96: near the cosine's ceiling of 1 a well-trained model packs its true
hits and the best unrelated hits close together, and on the raw scale a hit at 0.98 looked barely
above a null reaching 0.95. A normal is fitted to the *upper half* of the null only (centred on its
median, with the spread of the scores above it): what decides whether a hit is trusted is how far
unrelated queries reach upwards, and the sentences that match nothing at all (a long lower tail)
must not widen the fit and so drag real hits under the threshold. That gives
`confidence = Phi((stretch(score) - median) / upper spread)`: 0.5 for a hit scoring like the best
hit of a typical unrelated query, near 1 for one far above it, rounded to whole percent (what the
card shows, so a badge at the threshold's percent is always a confident match). A result has
`no_confident_match` when even its best hit stays below `threshold` (0.9).

Chosen by `bench/confidence_bench.py` on scene models of several seeds and training lengths (figures
and the rejected signals in docs/EVAL.md): the raw-score normal called only half the true caption
queries of a small model confident; an empirical (rank) null cannot rise above "beyond every
sentence" (ties at the top, no order among strong hits) and a Gumbel fit behaved like the normal;
per-query standings (the hit's z-score or its margin over the second hit,
relative to the query's own spread) and a null of the collection's own captions shuffled across
images separated worse. The calibration is fitted once per index version and cached by the searcher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from retrieval.catalog import Catalog
from retrieval.encoders import Encoder
from retrieval.errors import ConfigError
from retrieval.index.sync import embed_texts_cached
from retrieval.types import Float32Array, Int64Array

#: Unrelated sentences for the text null distribution: everyday scenes, objects and abstractions
#: across many topics, none aimed at a particular collection.
NULL_QUERIES: tuple[str, ...] = (
    "an old man reading a newspaper on a park bench",
    "a plate of spaghetti with tomato sauce",
    "a crowded train station at rush hour",
    "a dog catching a frisbee on the grass",
    "the engine of a sports car",
    "a child blowing out birthday candles",
    "a stack of books on a wooden desk",
    "a sailboat on a calm lake at sunset",
    "a cat sleeping on a windowsill",
    "a bicycle leaning against a brick wall",
    "a bowl of fresh fruit on a kitchen table",
    "a skier jumping over a snowy slope",
    "two people shaking hands in an office",
    "a laptop computer with a cup of coffee",
    "a herd of cows in a green field",
    "a city skyline at night",
    "a pair of running shoes",
    "a lighthouse on a rocky coast",
    "a pizza with mushrooms and olives",
    "a baby laughing in a high chair",
    "a bus driving down a busy street",
    "a vase of tulips on a table",
    "a tennis player serving the ball",
    "an airplane taking off from a runway",
    "a bathroom with a white sink and mirror",
    "a horse running along a beach",
    "a surfer riding a large wave",
    "a bookshelf full of old books",
    "a teddy bear sitting on a bed",
    "a traffic light at a crossing",
    "a group of friends having a picnic",
    "a clock tower in a town square",
    "the theory of relativity explained",
    "a spreadsheet of monthly expenses",
    "the sound of an orchestra tuning up",
    "an insurance policy document",
    "a thunderstorm over the desert",
    "a mechanic repairing a motorcycle",
    "a fisherman on a wooden pier",
    "a giraffe eating leaves from a tree",
    "a wedding cake with white frosting",
    "a chess board in the middle of a game",
    "an umbrella on a rainy sidewalk",
    "a microscope in a science laboratory",
    "a farmer driving a tractor",
    "a bridge over a river in autumn",
    "a kite flying in a blue sky",
    "a hamburger with french fries",
)

#: The best hit of a result must reach this confidence for the result to count as a match.
DEFAULT_THRESHOLD = 0.9
#: Smallest spread a null distribution is given (in cosine units, converted at the null's median).
MIN_NULL_STD = 0.02
#: Scores are clipped here before stretching, so an exact self-match (cosine 1.0) stays finite.
MAX_SCORE = 1.0 - 1e-6


@dataclass(frozen=True)
class ConfidenceConfig:
    """How confidence is calibrated; validated on construction."""

    #: Collection items every query is compared against (deterministic sample of larger collections).
    sample_size: int = 4096
    #: Collection images used as null image queries.
    null_images: int = 256
    #: A result whose best hit stays below this confidence has no confident match.
    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if not 16 <= self.sample_size <= 1_000_000:
            raise ConfigError(f"confidence sample_size must be in 16..1000000, got {self.sample_size}")
        if not 8 <= self.null_images <= 100_000:
            raise ConfigError(f"confidence null_images must be in 8..100000, got {self.null_images}")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"confidence threshold must be in (0, 1), got {self.threshold}")


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def stretch(scores: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """`-log(1 - cosine)`: distances from the ceiling of 1 on a log scale (monotone in the score)."""
    return np.asarray(-np.log1p(-np.minimum(np.asarray(scores, np.float64), MAX_SCORE)), np.float64)


@dataclass(frozen=True)
class NullModel:
    """A normal fitted to the upper half of the stretched best scores of queries known to be unrelated."""

    centre: float  # median of the stretched null scores
    spread: float  # root mean square of the stretched null scores above the median, floored
    count: int

    @classmethod
    def fit(cls, best_scores: Float32Array) -> NullModel:
        x = stretch(best_scores)
        if len(x) < 2:
            raise ConfigError("the null distribution needs at least two null queries")
        centre = float(np.median(x))
        above = x[x > centre] - centre
        spread = float(np.sqrt(np.mean(above**2))) if len(above) else 0.0
        # a floor keeps a degenerate collection (every null query alike) from making any hit certain;
        # MIN_NULL_STD cosine units at the median, through the stretch's slope 1 / (1 - cosine) there
        floor = MIN_NULL_STD / (1.0 - min(float(np.median(best_scores)), 1.0 - MIN_NULL_STD))
        return cls(centre, max(spread, floor), len(x))

    def confidence(self, score: float) -> float:
        """In [0, 1], rounded to whole percent: the number every surface shows (card, text, CLI, JSON)."""
        return round(_phi((float(stretch(score)) - self.centre) / self.spread), 2)


@dataclass(frozen=True)
class Calibration:
    """The null distributions of one target (images or captions) of one collection version."""

    text_null: NullModel
    image_null: NullModel | None  # None when the collection has too few images to form one
    threshold: float

    def confidences(self, scores: Sequence[float], kind: str) -> list[float]:
        """Confidence in [0, 1] of each hit score of a query of `kind` (text, image, text+image...)."""
        null = self.text_null if ("text" in kind or self.image_null is None) else self.image_null
        return [null.confidence(float(s)) for s in scores]

    def no_confident_match(self, confidences: Sequence[float]) -> bool:
        return not confidences or max(confidences) < self.threshold


def _sample_rows(n: int, size: int) -> Int64Array:
    """Evenly spread, deterministic rows: the same collection always gives the same calibration."""
    if n <= size:
        return np.arange(n, dtype=np.int64)
    return np.linspace(0, n - 1, size).round().astype(np.int64)


def _best(queries: Float32Array, items: Float32Array, exclude: np.ndarray | None = None) -> Float32Array:
    """Best score of each query over `items`; `exclude[i, j]` hides item j from query i."""
    scores = queries @ items.T
    if exclude is not None:
        scores = np.where(exclude, -np.inf, scores)
    return scores.max(axis=1).astype(np.float32)


def null_text_vectors(encoder: Encoder, cache: Catalog | None) -> Float32Array:
    """Embeddings of the null sentences, through the collection's text cache (encoded once per model)."""
    vecs, _ = embed_texts_cached(cache, encoder, list(NULL_QUERIES))
    return vecs


def calibrate(
    target: str,
    items: Float32Array,
    item_owner: Int64Array,
    images: Float32Array,
    image_ids: Int64Array,
    text_null: Float32Array,
    config: ConfidenceConfig | None = None,
) -> Calibration:
    """Fit the null distributions of one target ("images" or "captions").

    `items` are the searched vectors (image or caption embeddings) and `item_owner` the image each
    belongs to; `images`/`image_ids` are the collection's image embeddings, the null image queries.
    """
    if target not in ("images", "captions"):
        raise ConfigError(f"target must be 'images' or 'captions', got {target!r}")
    config = config or ConfidenceConfig()
    rows = _sample_rows(len(items), config.sample_size)
    sample = np.ascontiguousarray(items[rows], dtype=np.float32)
    owners = np.asarray(item_owner, np.int64)[rows]
    nulls = np.asarray(text_null, np.float32)
    text = NullModel.fit(_best(nulls, sample))
    image: NullModel | None = None
    q_rows = _sample_rows(len(images), config.null_images)
    queries = np.asarray(images, np.float32)[q_rows]
    if target == "captions" and len(queries) >= 2:
        image = NullModel.fit(_best(queries, nulls))  # what an image reaches on captions not about it
    elif target == "images" and len(queries) >= 3 and len(sample) >= 2:
        exclude = np.asarray(image_ids, np.int64)[q_rows][:, None] == owners[None, :]
        keep = ~exclude.all(axis=1)  # a query whose every item is its own has no "other" item
        if keep.sum() >= 2:
            image = NullModel.fit(_best(queries[keep], sample, exclude[keep]))
    return Calibration(text, image, config.threshold)
