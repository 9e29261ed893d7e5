"""`clearsight demo --no-serve` end to end, then `clearsight search` on what it built.

The demo is shrunk (1,000 training scenes, 6 epochs: about the fewest steps after which the loss leaves
ln(batch), which the fine-tuning guard reads as collapse) to keep the test short; the full-size demo is the
same code with bigger numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from explainer.cli.app import app

runner = CliRunner()
SMALL = [
    "--train-scenes",
    "1000",
    "--test-scenes",
    "30",
    "--epochs",
    "6",
    "--captioner-steps",
    "30",
    "--device",
    "cpu",
    "-q",
]


@pytest.mark.slow
def test_demo_builds_a_searchable_collection_and_reuses_its_model(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    built = runner.invoke(app, ["demo", "--no-serve", "--data-dir", str(data), *SMALL, "--json"])
    assert built.exit_code == 0, built.output
    result = json.loads(built.stdout)
    model_dir = Path(result["model_dir"])
    assert result["trained"] and "demo" in model_dir.name
    assert "DEMO MODEL" in (model_dir / "DEMO.md").read_text()
    assert result["indexed"]["images"] == 30 and result["chance_r1"] == pytest.approx(1 / 30)
    assert result["indexed"]["patches_stored"] == 30  # boxes from stored features from the first page
    assert result["val_r1"] > result["start_val_r1"]  # the guard compared it with the random start

    found = runner.invoke(app, ["search", result["sample_query"], "--data-dir", str(data), "--json"])
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)["results"]
    assert len(hits) == 10
    assert all(Path(h["path"]).resolve().parent == Path(result["images_dir"]).resolve() for h in hits)
    assert all(h["dataset_captions"] for h in hits)  # the dataset captions were attached by ingest

    # the demo's captioner captioned every scene, labelled as the demo's
    assert result["captioned"]["captioned"] == 30 and "demo-blip" in result["captioner_dir"]
    cards = runner.invoke(
        app,
        ["search", result["sample_query"], "--caption", "--top-k", "3", "--data-dir", str(data), "--json"],
    )
    assert cards.exit_code == 0, cards.output
    sources = [h["caption_source"] for h in json.loads(cards.stdout)["results"]]
    assert sources and all(s.startswith("generated:clearsight-demo-blip-") for s in sources), sources
    truth = result["captioned"]["true_of_scene"]
    assert truth is not None and 0.0 <= truth <= 1.0  # scored against each scene's own facts
    secs = result["seconds"]
    assert secs["total"] > 0 and "train_captioner" in secs
    captioner_s = secs["train_captioner"] + secs["caption"]
    assert secs["searchable"] == pytest.approx(secs["total"] - captioner_s, abs=0.2)

    again = runner.invoke(app, ["demo", "--no-serve", "--data-dir", str(data), *SMALL])
    assert again.exit_code == 0, again.output
    assert "DEMO model (reused)" in again.stdout and "sample query" in again.stdout
    assert "clearsight search" in again.output  # it says how to search
