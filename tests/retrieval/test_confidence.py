"""Calibrated confidence on synthetic scenes with a tiny CLIP trained on them (about 45 s on 2 cores).

The model is the demo's recipe on 1,000 training scenes for 8 epochs, 64 indexed test scenes.
One run printed: caption queries confident 0.55, unrelated queries 0.00 (the bars leave margin).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.collection import Collection
from retrieval.confidence import ConfidenceConfig, NullModel, calibrate
from retrieval.encoders import EncoderConfig, create_encoder
from retrieval.errors import ConfigError
from retrieval.ingest import IngestConfig, ingest
from retrieval.search import Query, Searcher
from retrieval.testing.recipes import DEMO_SCENES, DEMO_TRAINING, ClipRecipe, train_scene_clip
from retrieval.testing.synthetic import Scene, generate_scenes, query_for, write_scenes

pytestmark = pytest.mark.slow

#: Unrelated to coloured shapes; written for this test (not the null bank's sentences).
UNRELATED = [
    "a purple elephant playing the piano",
    "an accountant filing tax forms",
    "the smell of coffee in the morning",
    "a jazz band on a stage",
    "a sandwich cut in half",
    "a cathedral with stained glass windows",
    "a penguin on an iceberg",
    "an email about a missed meeting",
    "a rusty anchor on the sand",
    "the rules of cricket",
]


@pytest.fixture(scope="module")
def searcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Searcher, list[Scene], Path]]:
    root = tmp_path_factory.mktemp("confidence")
    # the demo's recipe (retrieval.testing.recipes), on fewer scenes and epochs to stay quick
    cfg = replace(DEMO_SCENES, n_train=1000, n_val=50, n_test=64)
    jsonl = write_scenes(cfg, root / "scenes", progress=False)
    train_scene_clip(jsonl, root / "model", ClipRecipe(training=replace(DEMO_TRAINING, epochs=8)))
    scenes = [s for s in generate_scenes(cfg) if s.split == "test"]
    test_dir = jsonl.parent / "images" / "test"
    with (test_dir / "captions.jsonl").open("w") as fh:
        for s in scenes:
            fh.write(json.dumps({"image": Path(s.path).name, "captions": list(s.captions)}) + "\n")
    encoder = create_encoder(EncoderConfig(model=str(root / "model"), device="cpu", precision="fp32"))
    collection = Collection(root / "data")
    ingest(test_dir, collection, encoder, IngestConfig(progress=False))
    collection.close()
    s = Searcher.open(root / "data", encoder=encoder)
    yield s, scenes, test_dir
    s.close()


def test_caption_queries_confident_unrelated_not(searcher: tuple[Searcher, list[Scene], Path]) -> None:
    s, scenes, _ = searcher
    captions = [s.search(Query(text=query_for(x), top_k=3)) for x in scenes]
    unrelated = [s.search(Query(text=t, top_k=3)) for t in UNRELATED]
    for r in captions + unrelated:
        assert r.no_confident_match is not None
        assert all(h.confidence is not None and 0.0 <= h.confidence <= 1.0 for h in r.results)
    confident = np.mean([not r.no_confident_match for r in captions])
    fooled = np.mean([not r.no_confident_match for r in unrelated])
    print(f"caption queries confident {confident:.2f}, unrelated confident {fooled:.2f}")
    assert confident >= 0.4
    assert fooled <= 0.2
    assert confident - fooled >= 0.3
    best = [r.results[0].confidence or 0.0 for r in captions]
    worst = [r.results[0].confidence or 0.0 for r in unrelated]
    assert float(np.mean(best)) > float(np.mean(worst)) + 0.1


def test_image_queries_and_captions_target(searcher: tuple[Searcher, list[Scene], Path]) -> None:
    """An image of the collection ranks itself first with the highest confidence; image→text is calibrated.

    The image null is each collection image's nearest *other* image; the synthetic scenes hold many
    near-duplicates (0.9998 cosine), so a self-match stands only a little above it (README).
    """
    s, scenes, test_dir = searcher
    for x in scenes[:10]:
        with Image.open(test_dir / Path(x.path).name) as im:
            img = im.convert("RGB")
        r = s.search(Query(image=img, top_k=3))
        assert r.query_kind == "image" and isinstance(r.no_confident_match, bool)
        confs = [h.confidence or 0.0 for h in r.results]
        assert confs == sorted(confs, reverse=True) and 0.5 <= confs[0] <= 1.0
        caps = s.search_captions(Query(image=img, top_k=3))
        assert caps.target == "captions" and isinstance(caps.no_confident_match, bool)
        assert all(h.confidence is not None and 0.0 <= h.confidence <= 1.0 for h in caps.results)


def test_null_model_and_config_validation() -> None:
    null = NullModel.fit(np.asarray([0.5, 0.6, 0.7], np.float32))
    assert null.confidence(0.6) == pytest.approx(0.5, abs=1e-3)
    assert null.confidence(2.0) > 0.99 and null.confidence(-1.0) < 0.01
    with pytest.raises(ConfigError):
        NullModel.fit(np.asarray([0.5], np.float32))
    # identical null scores: the std floor keeps a hit a hair above them from being certain
    assert NullModel.fit(np.full(5, 0.5, np.float32)).confidence(0.505) < 0.7
    for bad in ({"threshold": 1.0}, {"sample_size": 1}, {"null_images": 0}):
        with pytest.raises(ConfigError):
            ConfidenceConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        v = np.eye(4, dtype=np.float32)
        calibrate("people", v, np.arange(4), v, np.arange(4), v)
