"""Eval reports a researcher can use: metrics at the cutoffs asked for, chance level, bootstrap intervals,
provenance, a failure gallery with file paths, and several models side by side."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.demo.synthetic import SyntheticConfig, write_scenes
from retrieval.encoders import Encoder
from retrieval.errors import ConfigError
from retrieval.training.datasets import LoadedDataset, load_dataset
from retrieval.training.evaluate import evaluate
from retrieval.training.metrics import (
    bootstrap_recall_ci,
    chance_at_k,
    image_to_text_metrics,
    parse_ks,
    text_to_image_metrics,
)
from retrieval.training.report import comparison_table, write_comparison
from retrieval.training.types import EvalConfig


# -- metrics at any K ---------------------------------------------------------------------------------
def test_parse_ks_accepts_a_list_and_refuses_nonsense() -> None:
    assert parse_ks("10, 1,5,5") == (1, 5, 10)
    assert parse_ks([20, 3]) == (3, 20)
    for bad in ("", "a", "0", "1,-2", "100000"):
        with pytest.raises(ConfigError):
            parse_ks(bad)


def test_ndcg_precision_recall_at_5_by_hand() -> None:
    # one image query, 3 relevant captions (0, 1, 2) among 8; ranking puts them at positions 2, 4 and 7
    scores = np.array([[0.9, 0.7, 0.2, 1.0, 0.8, 0.5, 0.4, 0.3]], dtype=np.float32)
    order = [3, 0, 4, 1, 5, 6, 2, 7]  # by score
    assert [order.index(i) + 1 for i in (0, 1, 2)] == [2, 4, 7]
    mapping = np.array([0, 0, 0, 1, 2, 3, 4, 5], dtype=np.int64)
    sim = np.vstack([scores, np.random.default_rng(0).random((5, 8), dtype=np.float32)])
    m = image_to_text_metrics(sim, mapping, ks=(5, 3))
    d = m.to_dict()
    # the first query alone: DCG@5 = 1/log2(3) + 1/log2(5); ideal = 1 + 1/log2(3) + 1/log2(4)
    dcg = 1 / np.log2(3) + 1 / np.log2(5)
    ideal = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    per_query = []
    for q in range(sim.shape[0]):
        rel = np.flatnonzero(mapping == q)
        ranked = np.argsort(-sim[q], kind="stable")
        gains = [1 / np.log2(pos + 2) for pos, i in enumerate(ranked[:5]) if i in rel]
        ideal_q = sum(1 / np.log2(p + 2) for p in range(min(5, len(rel))))
        per_query.append(sum(gains) / ideal_q)
    assert per_query[0] == pytest.approx(dcg / ideal)
    assert d["ndcg@5"] == pytest.approx(float(np.mean(per_query)))
    assert d["precision@5"] == pytest.approx(m.precision_at_5)
    assert "ndcg@3" in d and "recall@3" in d and "precision@3" in d


def test_chance_matches_enumerating_every_ranking() -> None:
    n, c, k = 6, 2, 3  # 2 relevant of 6; all 720 orders
    hits = [any(x < c for x in perm[:k]) for perm in itertools.permutations(range(n))]
    prec = [sum(x < c for x in perm[:k]) / k for perm in itertools.permutations(range(n))]
    got = chance_at_k(np.array([c]), n, [k])
    assert got[f"recall@{k}"] == pytest.approx(float(np.mean(hits)))
    assert got[f"precision@{k}"] == pytest.approx(float(np.mean(prec)))


def test_random_scores_land_near_chance() -> None:
    rng = np.random.default_rng(1)
    sim = rng.random((4000, 50), dtype=np.float32)
    m = text_to_image_metrics(sim, rng.integers(0, 50, 4000), ks=(1, 10))
    assert m.chance["recall@10"] == pytest.approx(0.2)
    assert abs(m.at_k["recall@10"] - 0.2) < 0.03


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_data() -> None:
    rng = np.random.default_rng(2)
    small = rng.integers(1, 20, 100)
    large = rng.integers(1, 20, 10_000)
    ci_small = bootstrap_recall_ci(small, (5,), samples=400)["recall@5"]
    ci_large = bootstrap_recall_ci(large, (5,), samples=400)["recall@5"]
    assert ci_small[0] <= float(np.mean(small <= 5)) <= ci_small[1]
    assert ci_large[1] - ci_large[0] < (ci_small[1] - ci_small[0]) / 3
    assert bootstrap_recall_ci(small, (5,), samples=50) == bootstrap_recall_ci(small, (5,), samples=50)
    with pytest.raises(ConfigError):
        bootstrap_recall_ci(small, (5,), samples=0)


# -- the report files ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report-scenes")
    jsonl = write_scenes(SyntheticConfig(n_train=0, n_val=0, n_test=16, image_size=64, seed=5), root)
    # a caption that holds markup: the gallery must show it as text
    with jsonl.open("a", encoding="utf-8") as fh:
        img = next((root / "images" / "test").iterdir())
        rel = img.relative_to(root).as_posix()
        fh.write(
            json.dumps({"image": rel, "captions": ["<script>alert(1)</script>"], "split": "test"}) + "\n"
        )
    return jsonl


@pytest.fixture(scope="module")
def dataset(scenes: Path) -> LoadedDataset:
    return load_dataset("jsonl", scenes, scenes.parent, "test")


def test_report_records_provenance_intervals_cutoffs_and_a_gallery(
    dataset: LoadedDataset, scenes: Path, encoder: Encoder, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = evaluate(
        dataset,
        encoder,
        EvalConfig(out_dir=out, progress=False, ks=(1, 5, 10, 20), bootstrap=200, gallery=4),
    )
    data = json.loads((out / "report.json").read_text())
    assert data["clearsight_version"] and data["created_at"].endswith("+00:00")
    assert data["annotations"]["sha256"] == hashlib.sha256(scenes.read_bytes()).hexdigest()
    assert data["model"]["revision"].startswith("local:") and "precision" in data["model"]
    for direction in ("text_to_image", "image_to_text"):
        d = data[direction]
        for key in ("ndcg@5", "ndcg@20", "recall@20", "precision@20"):
            assert 0.0 <= d[key] <= 1.0
        assert set(d["chance"]) >= {"recall@1", "recall@20", "precision@5"}
        for k in ("recall@1", "recall@20"):
            lo, hi = data["confidence_intervals"][direction][k]
            assert lo <= d[k] <= hi
    # chance of text→image recall@K is K / number of images
    assert data["text_to_image"]["chance"]["recall@5"] == pytest.approx(5 / report.counts["images"])
    md = (out / "report.md").read_text()
    assert "| R@20 |" in md and "| nDCG@5 |" in md and "at chance" in md and "bootstrap" in md

    gallery = (out / "failures.html").read_text()
    assert len(report.worst) == 4
    worst = report.worst[0]
    assert worst.rank == int(report.metrics.text_to_image.ranks.max())
    assert report.image_paths[worst.image] in gallery  # the right image, by path
    assert all(report.image_paths[i] in gallery for i, _ in worst.top)
    assert "<script>alert" not in gallery  # dataset text is escaped
    with (out / "ranks_text_to_image.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(Path(r["path"]).is_file() for r in rows)
    for name in ("recall_curve", "rank_histogram", "gallery"):
        assert Path(report.files[name]).stat().st_size > 0


def test_two_models_side_by_side(
    dataset: LoadedDataset, encoder: Encoder, other_clip_dir: Path, tmp_path: Path
) -> None:
    from retrieval.encoders import EncoderConfig, create_encoder

    other = create_encoder(EncoderConfig(model=str(other_clip_dir), device="cpu", precision="fp32"))
    cfg = EvalConfig(progress=False, bootstrap=0, ks=(1, 5))
    a, b = evaluate(dataset, encoder, cfg), evaluate(dataset, other, cfg)
    table = comparison_table([a, b])
    header = table.splitlines()[0]
    assert header.count("text→image") == 2 and header.count("image→text") == 2
    assert f"{100 * a.metrics.text_to_image.recall_at_5:.1f}" in table.splitlines()[3]
    paths = write_comparison([a, b], tmp_path / "cmp")
    payload = json.loads(paths["json"].read_text())
    assert [m["model"]["fingerprint"] for m in payload["models"]] == [
        encoder.info.fingerprint,
        other.info.fingerprint,
    ]
    assert paths["plot"].stat().st_size > 0
    with pytest.raises(ConfigError):
        comparison_table([])


def test_eval_config_bounds() -> None:
    with pytest.raises(ConfigError):
        EvalConfig(bootstrap=-1)
    with pytest.raises(ConfigError):
        EvalConfig(gallery=10**6)
    with pytest.raises(ConfigError):
        EvalConfig(ks=(0,))


# -- a wrong --format is answered with the right one -------------------------------------------------
def test_a_wrong_format_names_the_format_the_file_looks_like(tmp_path: Path) -> None:
    from retrieval.training.datasets import load_dataset as load
    from retrieval.training.sniff import guess_formats

    (tmp_path / "imgs").mkdir()
    kaggle = tmp_path / "captions.txt"
    kaggle.write_text("image,caption\na.jpg,a dog\n")
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("a.jpg#0\ta dog runs\n")
    karpathy = tmp_path / "dataset.json"
    karpathy.write_text(json.dumps({"images": [{"filename": "a.jpg", "sentences": [{"raw": "a dog"}]}]}))
    lines = tmp_path / "x.jsonl"
    lines.write_text(json.dumps({"image": "a.jpg", "captions": ["a dog"]}) + "\n")
    assert guess_formats(kaggle) == ["kaggle"] and guess_formats(token) == ["flickr8k"]
    assert guess_formats(karpathy) == ["karpathy", "rsicd"] and guess_formats(lines) == ["jsonl"]
    assert guess_formats(tmp_path) == [] and guess_formats(tmp_path / "missing") == []
    with pytest.raises(ConfigError, match="looks like the 'kaggle' format"):
        load("flickr8k", kaggle, tmp_path / "imgs")
    with pytest.raises(ConfigError, match="did you mean 'karpathy'"):
        load("karpaty", karpathy, tmp_path / "imgs")
