"""`clearsight demo`: a collection and a model that work with no downloaded weights at all.

Real CLIP weights cannot be fetched on many machines, yet a user should see every feature work before
hunting for them. So the demo draws synthetic scenes, trains a tiny CLIP on them from scratch with the
product's own fine-tuning code (from a random start, which the "refuse if worse" guard compares
against and the trained model beats by far), evaluates it on held-out scenes, and indexes the test
scenes with their captions through the normal ingest. Everything is keyed by the configuration, so a
second run reuses the scenes and the model and only re-checks the index.

The model is labelled as a demo everywhere it could be mistaken for a real one: its directory name
holds "demo" and it carries a DEMO.md saying what it can and cannot do.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated

import typer

from explainer.cli.options import Device, Host, JsonOut, Port, Quiet, data_dir_or_default, note
from explainer.cli.serve import run_server
from retrieval.collection import Collection
from retrieval.encoders import EncoderConfig, create_encoder
from retrieval.ingest import IngestConfig, ingest
from retrieval.paths import DEMO_MODEL_PREFIX
from retrieval.search import Query, Searcher
from retrieval.testing.synthetic import SyntheticConfig, generate_scenes, query_for, write_scenes
from retrieval.testing.tiny import DEFAULT_WORDS, make_clip
from retrieval.training.datasets import LoadedDataset, load_dataset
from retrieval.training.evaluate import EvalConfig, evaluate
from retrieval.training.finetune import FinetuneConfig, finetune

SCENES_DIR = "demo-scenes"
MODELS_DIR = "models"
MARKER = "demo-config.json"

DEFAULT_SCENES = SyntheticConfig(n_train=2000, n_val=100, n_test=200, image_size=128, max_objects=2, seed=0)
#: Measured to reach test text→image R@1 of about 0.35 (chance 1/200) in about a minute on two CPU cores.
#: One torch thread: on a shared two-core machine two threads preempting each other are several times slower.
DEFAULT_TRAINING = FinetuneConfig(
    epochs=20, lr=2e-3, batch_size=64, warmup=0.05, patience=20, weight_decay=0.1, threads=1, seed=0
)


@dataclass(frozen=True)
class DemoConfig:
    scenes: SyntheticConfig = DEFAULT_SCENES
    training: FinetuneConfig = DEFAULT_TRAINING
    arch: str = "tiny"
    device: str | None = None
    retrain: bool = False  # train again even when a model for this configuration exists
    progress: bool = True

    def key(self) -> str:
        """What determines the trained weights; progress, device and threads do not."""
        training = {
            k: v for k, v in asdict(self.training).items() if k not in ("progress", "device", "threads")
        }
        blob = json.dumps(
            {"scenes": asdict(self.scenes), "training": training, "arch": self.arch}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass
class DemoResult:
    data_dir: str
    model_dir: str
    scenes_dir: str
    images_dir: str
    trained: bool  # False when an earlier run's model was reused
    start_val_r1: float | None
    val_r1: float | None
    test: dict[str, float]
    chance_r1: float
    indexed: dict[str, object]
    sample_query: str
    sample_target: str
    sample_rank: int | None  # rank of the scene the query describes among the top 10, None if absent
    sample_hits: list[dict[str, object]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _scenes(root: Path, config: DemoConfig) -> Path:
    """Write the scenes unless this configuration's scenes are already there."""
    scenes_dir = root / SCENES_DIR
    marker = scenes_dir / MARKER
    wanted = json.dumps(asdict(config.scenes), sort_keys=True)
    if marker.exists() and marker.read_text(encoding="utf-8") == wanted:
        return scenes_dir / "captions.jsonl"
    shutil.rmtree(scenes_dir, ignore_errors=True)
    jsonl = write_scenes(config.scenes, scenes_dir, progress=config.progress)
    # ingest reads captions.jsonl in the folder it indexes, with paths relative to that folder
    test_dir = scenes_dir / "images" / "test"
    with (test_dir / "captions.jsonl").open("w", encoding="utf-8") as fh:
        for scene in generate_scenes(config.scenes):
            if scene.split == "test":
                record = {"image": Path(scene.path).name, "captions": list(scene.captions)}
                fh.write(json.dumps(record) + "\n")
    marker.write_text(wanted, encoding="utf-8")
    return jsonl


def _demo_readme(config: DemoConfig, val_r1: float, test: dict[str, float], chance: float) -> str:
    s = config.scenes
    return f"""# DEMO MODEL: not for real images

A tiny CLIP ({config.arch} architecture: 64-pixel images, two layers per tower) trained from scratch by
`clearsight demo` on {s.n_train} synthetic scenes of coloured shapes (colours: {", ".join(s.colours)};
shapes: {", ".join(s.shapes)}; 3x3 grid positions). It understands only captions such as
"a red circle in the top left" or "a blue square left of a green triangle". On photographs it is no
better than chance. It exists so that every feature of Clearsight can be seen working offline; for real
search use pretrained weights (see the README).

- validation text→image R@1: {100 * val_r1:.1f}%
- test text→image R@1: {100 * test["t2i_r1"]:.1f}% (chance: {100 * chance:.2f}%)
- test text→image R@5: {100 * test["t2i_r5"]:.1f}%
- configuration key: {config.key()}

The fine-tuning history and curves are in finetune_history.json and finetune_curves.png.
"""


def _train(root: Path, config: DemoConfig, jsonl: Path, model_dir: Path) -> tuple[float, float]:
    """Train from a random start; returns (start, best) validation R@1."""
    scenes_dir = jsonl.parent
    train = load_dataset("jsonl", jsonl, scenes_dir, "train")
    val = load_dataset("jsonl", jsonl, scenes_dir, "val")
    start_dir = root / MODELS_DIR / f".start-{config.key()}"
    shutil.rmtree(start_dir, ignore_errors=True)
    if not config.progress:  # save_pretrained draws its own bar otherwise
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    make_clip(start_dir, config.arch, words=DEFAULT_WORDS, seed=config.training.seed)
    training = replace(config.training, progress=config.progress, device=config.device)
    try:
        result = finetune(str(start_dir), train, val, model_dir, training)
    finally:
        shutil.rmtree(start_dir, ignore_errors=True)
    return result.start["t2i_r1"], result.best["t2i_r1"]


def build_demo(data_root: Path | str, config: DemoConfig | None = None) -> DemoResult:
    """Build (or reuse) the demo scenes and model, index the test scenes into `data_root`, try a query."""
    config = config or DemoConfig()
    root = Path(data_root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    jsonl = _scenes(root, config)
    model_dir = root / MODELS_DIR / f"{DEMO_MODEL_PREFIX}{config.arch}-{config.key()}"
    ready = (model_dir / "DEMO.md").exists() and (model_dir / "config.json").exists()
    start_r1 = val_r1 = None
    trained = config.retrain or not ready
    if trained:
        (model_dir / "DEMO.md").unlink(missing_ok=True)
        start_r1, val_r1 = _train(root, config, jsonl, model_dir)

    encoder = create_encoder(EncoderConfig(model=str(model_dir), device=config.device))
    try:
        test_set: LoadedDataset = load_dataset("jsonl", jsonl, jsonl.parent, "test")
        report = evaluate(test_set, encoder, EvalConfig(progress=False))
        t2i = report.metrics.text_to_image
        test = {
            "t2i_r1": t2i.recall_at_1,
            "t2i_r5": t2i.recall_at_5,
            "i2t_r1": report.metrics.image_to_text.recall_at_1,
        }
        chance = 1.0 / max(1, len(report.image_ids))
        if val_r1 is None:
            history = json.loads((model_dir / "finetune_history.json").read_text(encoding="utf-8"))
            start_r1, val_r1 = history["start"]["t2i_r1"], history["best"]["t2i_r1"]
        (model_dir / "DEMO.md").write_text(
            _demo_readme(config, val_r1 or 0.0, test, chance), encoding="utf-8"
        )

        images_dir = jsonl.parent / "images" / "test"
        with Collection(root) as collection:
            rebuild = (
                collection.store.exists()
                and collection.store.read_manifest().fingerprint != encoder.info.fingerprint
            )
            summary = ingest(
                images_dir, collection, encoder, IngestConfig(progress=config.progress, rebuild=rebuild)
            )
            searcher = Searcher(
                collection, encoder, collection.store.load(expect_fingerprint=encoder.info.fingerprint)
            )
            scene = next(s for s in generate_scenes(config.scenes) if s.split == "test")
            query = query_for(scene)
            target = str((images_dir / Path(scene.path).name).resolve())
            hits = searcher.search(Query(text=query, top_k=10)).results
            rank = next((h.rank for h in hits if str(Path(h.path).resolve()) == target), None)
    finally:
        encoder.close()
    return DemoResult(
        data_dir=str(root),
        model_dir=str(model_dir),
        scenes_dir=str(jsonl.parent),
        images_dir=str(images_dir),
        trained=trained,
        start_val_r1=start_r1,
        val_r1=val_r1,
        test=test,
        chance_r1=chance,
        indexed={"images": summary.index.images if summary.index else 0, "encoded": summary.encoded},
        sample_query=query,
        sample_target=target,
        sample_rank=rank,
        sample_hits=[{"rank": h.rank, "score": h.score, "path": h.path} for h in hits[:5]],
    )


def demo_cmd(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Where the demo collection, scenes and model go (default: DATA_DIR/demo)",
            show_default=False,
        ),
    ] = None,
    no_serve: Annotated[bool, typer.Option("--no-serve", help="Build the demo and exit")] = False,
    host: Host = None,
    port: Port = None,
    train_scenes: Annotated[int, typer.Option("--train-scenes", min=8, help="Training scenes")] = 2000,
    test_scenes: Annotated[int, typer.Option("--test-scenes", min=2, help="Scenes indexed for search")] = 200,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 20,
    retrain: Annotated[
        bool, typer.Option("--retrain", help="Train again even if a demo model exists")
    ] = False,
    device: Device = "auto",
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Build an offline demo: synthetic scenes, a tiny CLIP trained on them, and an index to search."""
    root = data_dir or data_dir_or_default(None) / "demo"
    config = DemoConfig(
        scenes=replace(DEFAULT_SCENES, n_train=train_scenes, n_test=test_scenes),
        training=replace(DEFAULT_TRAINING, epochs=epochs, patience=epochs),
        device=device,
        retrain=retrain,
        progress=not quiet,
    )
    result = build_demo(root, config)
    report_demo(result, root, json_out)
    if not no_serve:
        run_server(root, host, port)


def report_demo(result: DemoResult, root: Path, json_out: bool) -> None:
    """What was built and how good it is; the next commands to try go to stderr."""
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        how = "trained now" if result.trained else "reused"
        typer.echo(f"DEMO model ({how}): {result.model_dir}")
        typer.echo(
            f"  test text→image R@1 {100 * result.test['t2i_r1']:.1f}% "
            f"(chance {100 * result.chance_r1:.2f}%), "
            f"R@5 {100 * result.test['t2i_r5']:.1f}%; it knows coloured shapes only, not photos"
        )
        typer.echo(f"indexed {result.indexed['images']} test scenes from {result.images_dir} into {root}")
        rank = f"rank {result.sample_rank}" if result.sample_rank else "not in the top 10"
        typer.echo(f'sample query "{result.sample_query}": the scene it describes is at {rank}')
    note(
        "try the demo with:\n"
        f'  clearsight search "{result.sample_query}" --data-dir {root}\n'
        f"  clearsight serve --data-dir {root}"
    )
