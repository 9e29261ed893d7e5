"""`clearsight eval` and `retrieval.training.evaluate`: same numbers from the CLI and the API, a cache that is
really used, report files that are really written, and missing or broken images that are counted.

The tiny model here is random, so the numbers are near chance; what is checked is the plumbing.
Whether evaluation measures real retrieval is checked in test_finetune, where a trained model must
score far above chance through this very code.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from explainer.cli.app import app
from retrieval.demo.synthetic import SyntheticConfig, write_scenes
from retrieval.encoders import Encoder
from retrieval.training.datasets import LoadedDataset, load_dataset
from retrieval.training.evaluate import evaluate
from retrieval.training.types import EvalConfig

runner = CliRunner()
METRICS = (
    "recall@1",
    "recall@5",
    "recall@10",
    "mrr",
    "ndcg@10",
    "precision@1",
    "precision@5",
    "precision@10",
)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 test scenes, plus one listed image that does not exist and one that is an empty file."""
    root = tmp_path_factory.mktemp("eval-scenes")
    jsonl = write_scenes(SyntheticConfig(n_train=0, n_val=0, n_test=24, image_size=64, seed=3), root)
    (root / "images" / "test" / "empty.png").write_bytes(b"")
    with jsonl.open("a", encoding="utf-8") as fh:
        fh.write(
            json.dumps({"image": "images/test/gone.png", "captions": ["a red circle"], "split": "test"})
            + "\n"
        )
        fh.write(
            json.dumps({"image": "images/test/empty.png", "captions": ["a blue cross"], "split": "test"})
            + "\n"
        )
    return jsonl


@pytest.fixture(scope="module")
def dataset(scenes: Path) -> LoadedDataset:
    return load_dataset("jsonl", scenes, scenes.parent, "test")


def _cli_eval(scenes: Path, model: Path, *extra: str) -> dict:  # type: ignore[type-arg]
    argv = [
        "eval",
        "--format",
        "jsonl",
        "--annotations",
        str(scenes),
        "--images",
        str(scenes.parent),
        "--split",
        "test",
        "--model",
        str(model),
        "--batch-size",
        "8",
        "--json",
        "-q",
        *extra,
    ]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _numbers(report: dict) -> dict:  # type: ignore[type-arg]
    return {
        d: {k: report[d][k] for k in (*METRICS, "median_rank", "mean_rank")}
        for d in ("text_to_image", "image_to_text")
    }


def test_cli_and_api_agree_and_the_second_run_hits_the_cache(
    scenes: Path, dataset: LoadedDataset, encoder: Encoder, tiny_clip_dir: Path, tmp_path: Path
) -> None:
    api = evaluate(
        dataset, encoder, EvalConfig(batch_size=8, cache_dir=tmp_path / "api-cache", progress=False)
    )
    out = tmp_path / "out"
    first = _cli_eval(scenes, tiny_clip_dir, "--out", str(out), "--cache-dir", str(tmp_path / "cli-cache"))
    assert _numbers(first) == _numbers(json.loads(json.dumps(api.to_dict())))
    assert first["cache"]["image_hits"] == 0 and first["cache"]["images_encoded"] == 24

    second = _cli_eval(scenes, tiny_clip_dir, "--out", str(out), "--cache-dir", str(tmp_path / "cli-cache"))
    assert second["cache"]["image_hits"] == 24 and second["cache"]["images_encoded"] == 0
    assert second["cache"]["texts_encoded"] == 0 and second["cache"]["text_hits"] > 0
    assert _numbers(second) == _numbers(first)

    counts = {"images": 24, "captions": 96, "images_missing": 1, "images_unreadable": 1}
    assert first["counts"] == counts
    for direction in ("text_to_image", "image_to_text"):
        assert first[direction]["counts"] == counts
        assert all(0.0 <= first[direction][k] <= 1.0 for k in METRICS)
    assert first["text_to_image"]["n_queries"] == 96 and first["image_to_text"]["n_queries"] == 24
    assert first["rsum"] == pytest.approx(
        100 * sum(first[d][f"recall@{k}"] for d in ("text_to_image", "image_to_text") for k in (1, 5, 10))
    )
    assert first["index"] == {"requested": "flat", "factory": "Flat", "exact": True, "note": ""}
    assert first["dataset"] == {"format": "jsonl", "split": "test"}
    assert first["load_report"]["missing_images"]["count"] == 1


def test_report_files_are_written(scenes: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    report = _cli_eval(scenes, tiny_clip_dir, "--out", str(out), "--no-cache")
    for name in ("report.json", "report.md", "ranks_text_to_image.csv", "ranks_image_to_text.csv"):
        assert (out / name).stat().st_size > 0, name
    for name in ("recall_at_k.png", "rank_histogram.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, name
    assert json.loads((out / "report.json").read_text())["text_to_image"] == report["text_to_image"]
    assert "| R@1 |" in (out / "report.md").read_text()

    records = {
        json.loads(line)["image"]: json.loads(line)["captions"] for line in scenes.read_text().splitlines()
    }
    with (out / "ranks_text_to_image.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 96
    # each caption is listed against its own image, with a rank that agrees with R@1
    assert all(row["caption"] in records[row["image"]] for row in rows)
    r1 = sum(int(row["rank"]) == 1 for row in rows) / len(rows)
    assert r1 == pytest.approx(report["text_to_image"]["recall@1"])
    with (out / "ranks_image_to_text.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 24


def test_approximate_index_that_returns_everything_matches_exact(
    dataset: LoadedDataset, encoder: Encoder
) -> None:
    exact = evaluate(dataset, encoder, EvalConfig(progress=False))
    hnsw = evaluate(dataset, encoder, EvalConfig(index="hnsw", approx_k=1000, progress=False))
    assert hnsw.index.factory.startswith("HNSW") and not hnsw.index.exact
    assert hnsw.metrics.text_to_image.recall_at_5 == pytest.approx(exact.metrics.text_to_image.recall_at_5)
    assert hnsw.metrics.image_to_text.mrr == pytest.approx(exact.metrics.image_to_text.mrr)


def test_table_output_and_errors(scenes: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    argv = ["eval", "-f", "jsonl", "--annotations", str(scenes), "--images", str(scenes.parent)]
    r = runner.invoke(app, [*argv, "--model", str(tiny_clip_dir), "--no-cache", "-q"])
    assert r.exit_code == 0, r.output
    assert "| R@1 |" in r.stdout and "text→image" in r.stdout
    r = runner.invoke(
        app, [*argv[:4], str(tmp_path / "nope.jsonl"), *argv[5:], "--model", str(tiny_clip_dir)]
    )
    assert r.exit_code == 2 and "clearsight: error:" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, [*argv, "--split", "nope", "--model", str(tiny_clip_dir)])
    assert r.exit_code == 2 and "unknown split" in r.output
