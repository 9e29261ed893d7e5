"""Calibrated confidence: the floors on held-out scene models, one number per card, and a real search.

The floors are checked on stored embeddings (tests/data/confidence_B.npz and _C.npz, written by
`bench/confidence_bench.py export`) of two scene models the calibration was never tuned on, so they
run in a second on any CPU: numpy in float64 over fp32 vectors, nothing precision-dependent.
The slow tests train a small scene CLIP (the demo's recipe on 1,000 training scenes for 8 epochs,
64 indexed test scenes; 12 to 45 s on 2 cores, by load) and search it through the product's `Searcher`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from jinja2 import Environment, FileSystemLoader
from PIL import Image
from typer.testing import CliRunner

from explainer.cards.model import Card, ExplanationOut
from explainer.cli.app import app
from explainer.explain.backends.offline import OfflineExplainer
from explainer.explain.types import ExplainContext
from explainer.server import create_app
from explainer.settings import get_settings
from retrieval.assets import asset_dir
from retrieval.collection import Collection
from retrieval.confidence import NULL_QUERIES, ConfidenceConfig, NullModel, calibrate
from retrieval.demo.recipes import DEMO_SCENES, DEMO_TRAINING, ClipRecipe, train_scene_clip
from retrieval.demo.synthetic import Scene, generate_scenes, query_for, write_scenes
from retrieval.encoders import EncoderConfig, create_encoder
from retrieval.errors import ConfigError
from retrieval.ingest import IngestConfig, ingest
from retrieval.search import Query, Searcher
from tests.helpers import ROOT, make_folder
from tests.server_kit import server_settings

DATA = ROOT / "tests" / "data"

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


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """The chance that a true query's top confidence beats a nonsense one's (ties count half)."""
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


@pytest.mark.parametrize("model", ["B", "C"])
def test_floors_on_held_out_models(model: str) -> None:
    """Issue 23's floors, on models of other seeds and lengths than the ones the fit was chosen on:
    at least 9 of the first 10 true caption queries confident, at least 7 of 10 nonsense queries
    "no confident match"; and over 100 of each, the separation docs/EVAL.md reports."""
    with np.load(DATA / f"confidence_{model}.npz") as z:
        d = {k: z[k] for k in z.files}
    assert tuple(d["null_sentences"]) == NULL_QUERIES, "NULL_QUERIES changed: rerun the bench's export"
    images = d["images"].astype(np.float32)
    ids = np.arange(len(images), dtype=np.int64)
    cal = calibrate("images", images, ids, images, ids, d["null"].astype(np.float32))

    def top(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = queries.astype(np.float32) @ images.T
        best = [cal.confidences([float(s)], "text")[0] for s in scores.max(1)]
        return np.asarray(best), scores.argmax(1)

    true, found = top(d["true"])
    nonsense, _ = top(d["nonsense"])
    flags_true = [cal.no_confident_match([c]) for c in true]
    flags_nonsense = [cal.no_confident_match([c]) for c in nonsense]
    print(
        f"{model}: true confident {np.mean(np.logical_not(flags_true)):.2f}, nonsense flagged "
        f"{np.mean(flags_nonsense):.2f}, AUC {_auc(true, nonsense):.3f}, top-1 right "
        f"{np.mean(found == d['true_image']):.2f}"
    )
    assert sum(not f for f in flags_true[:10]) >= 9
    assert sum(flags_nonsense[:10]) >= 7
    assert len(true) >= 100 and len(nonsense) >= 100
    assert np.mean(np.logical_not(flags_true)) >= 0.85 and np.mean(flags_nonsense) >= 0.75
    assert _auc(true, nonsense) >= 0.9
    assert all(0.0 <= c <= 1.0 for c in [*true, *nonsense])


@pytest.fixture(scope="module")
def searcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Searcher, list[Scene], Path]]:
    root = tmp_path_factory.mktemp("confidence")
    # the demo's recipe (retrieval.demo.recipes), on fewer scenes and epochs to stay quick
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


@pytest.mark.slow
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
    # one run: 0.97 and 0.30 ("coffee", "sandwich", "anchor"); the raw-score normal gave 0.55 and 0.00.
    # The floors proper are checked on stored embeddings above; a model trained here differs a little
    # between CPUs, so these bars leave room.
    assert confident >= 0.8
    assert fooled <= 0.4
    assert confident - fooled >= 0.4
    best = [r.results[0].confidence or 0.0 for r in captions]
    worst = [r.results[0].confidence or 0.0 for r in unrelated]
    assert float(np.mean(best)) > float(np.mean(worst)) + 0.1


@pytest.mark.slow
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


@pytest.fixture()
def indexed(tmp_path: Path, tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    images, data = tmp_path / "images", tmp_path / "data"
    make_folder(images, 8)
    monkeypatch.setenv("CLEARSIGHT_EXPLAIN_BACKEND", "offline")
    monkeypatch.delenv("GROQ_API_KEY", raising=False)
    get_settings.cache_clear()
    argv = [
        "index",
        str(images),
        "-m",
        str(tiny_clip_dir),
        "--data-dir",
        str(data),
        "-q",
        "--precision",
        "fp32",
    ]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    yield data
    get_settings.cache_clear()


def test_a_card_shows_one_confidence(indexed: Path, tmp_path: Path) -> None:
    """The badge, the explanation's confidence and the number its text quotes are one value, also
    when the explanation (or a detail view's card) is built later from the stored embeddings."""
    query = {"text": "a red shape", "top_k": 4}
    with TestClient(create_app(server_settings(indexed, tmp_path, precision="fp32"))) as client:
        cards = client.post("/api/search", json=query).json()["results"]
    assert cards and all(c["confidence"] is not None for c in cards)
    env = Environment(loader=FileSystemLoader(asset_dir("templates")), autoescape=True)
    for c in cards:
        shown = f"{round(c['confidence'] * 100)}%"
        assert c["explanation"]["confidence"] == c["confidence"]
        assert f"Confidence {shown}" in c["explanation"]["text"]
        html = env.get_template("_card.html").render(card=Card.model_validate(c))
        badge = re.search(r'<span class="match [a-z]+"[^>]*>(\d+%)</span>', html)
        label = re.search(r'<span class="conf-label">confidence (\d+%)</span>', html)
        assert badge is not None and label is not None and badge.group(1) == label.group(1) == shown
    # a fresh server remembers no page: the explanation is rebuilt from stored embeddings (the detail
    # view's path), and must carry the card's number, not a fixed score range's
    ask = {"text": query["text"], "ids": [c["id"] for c in cards], "ranks": [c["rank"] for c in cards]}
    with TestClient(create_app(server_settings(indexed, tmp_path, precision="fp32"))) as client:
        later = client.post("/api/explain", json=ask).json()["explanations"]
    assert {e["id"]: e["explanation"]["confidence"] for e in later} == {
        c["id"]: c["confidence"] for c in cards
    }


def test_explanation_confidence_is_the_calibrated_one() -> None:
    """Whoever writes the text, the explanation carries the hit's calibrated confidence unchanged."""
    ctx = ExplainContext(
        query_text="a red circle", caption="a red circle", image_size=(10, 10), score=0.97, rank=1,
        image_key="h", match_confidence=0.83,
    )  # fmt: skip
    out = OfflineExplainer().explain(ctx)
    assert out.confidence == 0.83 and "Confidence 83%, a moderate match" in out.text
    assert ExplanationOut.from_explanation(out).confidence == 0.83
