"""The offline demo: a collection and models that work with no downloaded weights at all.

Real CLIP and BLIP weights cannot be fetched on many machines, yet a user should see every feature work
before hunting for them. So the demo draws synthetic scenes, trains a tiny CLIP and a tiny BLIP on
them from scratch with the library's recipes (`retrieval.demo.recipes`: the same ones the tests
use), evaluates the CLIP on held-out scenes, indexes the test scenes with their captions through the
normal ingest, and captions them with the BLIP through the normal caption cache, so cards show
generated captions. Everything is keyed by the configuration, so a second run reuses the scenes and
models and only re-checks the index.

The models are labelled as demo models everywhere they could be mistaken for real ones: their
directory names start with "clearsight-demo-" (so captions read "generated:clearsight-demo-blip-...")
and the CLIP carries a DEMO.md saying what it can and cannot do.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from explainer.captions.captioner import CaptionerConfig, CaptionService, GenerationSettings, create_captioner
from explainer.settings import get_settings
from retrieval.collection import Collection
from retrieval.demo.blip import BlipRecipe
from retrieval.demo.recipes import (
    DEMO_CAPTIONER,
    DEMO_SCENES,
    ClipRecipe,
    train_scene_captioner,
    train_scene_clip,
)
from retrieval.demo.synthetic import (
    Scene,
    SyntheticConfig,
    caption_holds,
    generate_scenes,
    query_for,
    write_scenes,
)
from retrieval.encoders import EncoderConfig, create_encoder
from retrieval.index.sync import sync_indexes
from retrieval.ingest import IngestConfig, ingest
from retrieval.paths import DEMO_MODEL_PREFIX, DEMO_RECORD
from retrieval.search import Query, Searcher
from retrieval.training.datasets import LoadedDataset, load_dataset
from retrieval.training.evaluate import evaluate
from retrieval.training.types import EvalConfig

SCENES_DIR = "demo-scenes"
MODELS_DIR = "models"
MARKER = "demo-config.json"
#: The default decoding (greedy, 5 to 30 tokens), so `search --caption` finds these captions in the cache.
DEMO_GENERATION = GenerationSettings()


@dataclass(frozen=True)
class DemoConfig:
    scenes: SyntheticConfig = DEMO_SCENES
    clip: ClipRecipe = field(default_factory=ClipRecipe)
    captioner: BlipRecipe = DEMO_CAPTIONER
    device: str | None = None
    retrain: bool = False  # train again even when models for this configuration exist
    progress: bool = True

    def key(self) -> str:
        """What determines the trained weights; progress, device and threads do not."""
        clip = asdict(self.clip)
        clip["training"] = {
            k: v for k, v in clip["training"].items() if k not in ("progress", "device", "threads")
        }
        captioner = {k: v for k, v in asdict(self.captioner).items() if k not in ("threads", "time_budget_s")}
        blob = json.dumps(
            {"scenes": asdict(self.scenes), "clip": clip, "captioner": captioner}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass
class DemoResult:
    data_dir: str
    model_dir: str
    captioner_dir: str
    scenes_dir: str
    images_dir: str
    trained: bool  # False when an earlier run's models were reused
    start_val_r1: float | None
    val_r1: float | None
    test: dict[str, float]
    chance_r1: float
    indexed: dict[str, object]
    captioned: dict[str, object]
    sample_query: str
    sample_target: str
    sample_rank: int | None  # rank of the scene the query describes among the top 10, None if absent
    sample_hits: list[dict[str, object]] = field(default_factory=list)
    #: wall time per stage, "total", and "searchable" (the total less the captioner's training and captions)
    seconds: dict[str, float] = field(default_factory=dict)

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
    s, a = config.scenes, config.clip.arch
    return f"""# DEMO MODEL: not for real images

A tiny CLIP ({a.image_size}-pixel images in {a.patch_size}-pixel patches, {a.vision_layers} layers per
tower, {a.vision_width} wide) trained from scratch by `clearsight demo` on {s.n_train} synthetic scenes of
coloured shapes (colours: {", ".join(s.colours)}; shapes: {", ".join(s.shapes)}; 3x3 grid positions). It
understands only captions such as "a red circle in the top left" or "a blue square left of a green
triangle". On photographs it is no better than chance. It exists so that every feature of Clearsight
can be seen working offline; for real search use pretrained weights (see the README).

- validation text→image R@1: {100 * val_r1:.1f}%
- test text→image R@1: {100 * test["t2i_r1"]:.1f}% (chance: {100 * chance:.2f}%; every test caption fits
  exactly one test scene)
- test text→image R@5: {100 * test["t2i_r5"]:.1f}%
- configuration key: {config.key()}

The fine-tuning history and curves are in finetune_history.json and finetune_curves.png.
"""


def _quiet_saving() -> None:
    """save_pretrained draws its own progress bar; the demo has its own output."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _models(root: Path, config: DemoConfig, jsonl: Path) -> tuple[Path, Path, dict[str, Any]]:
    """Train (or reuse) the CLIP and the captioner; returns their folders and what training reported."""
    key = config.key()
    model_dir = root / MODELS_DIR / f"{DEMO_MODEL_PREFIX}clip-{key}"
    blip_dir = root / MODELS_DIR / f"{DEMO_MODEL_PREFIX}blip-{key}"
    done: dict[str, Any] = {"trained": False, "seconds": {}}
    if not config.progress:
        _quiet_saving()
    clip_ready = (model_dir / "DEMO.md").exists() and (model_dir / "config.json").exists()
    if config.retrain or not clip_ready:
        (model_dir / "DEMO.md").unlink(missing_ok=True)
        began = time.perf_counter()
        result = train_scene_clip(
            jsonl, model_dir, config.clip, progress=config.progress, device=config.device
        )
        done["seconds"]["train_clip"] = time.perf_counter() - began
        done.update(trained=True, start_r1=result.start["t2i_r1"], val_r1=result.best["t2i_r1"])
    blip_ready = (blip_dir / "DEMO.md").exists()
    if config.retrain or not blip_ready:
        shutil.rmtree(blip_dir, ignore_errors=True)
        began = time.perf_counter()
        blip = train_scene_captioner(jsonl, blip_dir, config.captioner)
        done["seconds"]["train_captioner"] = time.perf_counter() - began
        (blip_dir / "DEMO.md").write_text(
            "# DEMO CAPTIONER: not for real images\n\nA tiny BLIP trained by `clearsight demo` for "
            f"{blip.steps} steps on the synthetic scenes' first captions (loss {blip.first_loss:.2f} -> "
            f"{blip.last_loss:.2f}). It describes coloured shapes only.\n",
            encoding="utf-8",
        )
        done["trained"] = True
    return model_dir, blip_dir, done


def _caption(collection: Collection, blip_dir: Path, config: DemoConfig) -> dict[str, object]:
    """Caption the indexed scenes with the demo's BLIP through the normal cache (cards then show them)."""
    captioner = create_captioner(
        CaptionerConfig(model=str(blip_dir), device=config.device, batch_size=32, generation=DEMO_GENERATION)
    )
    try:
        report = CaptionService(collection, captioner, batch_size=32).caption_collection(progress=False)
    finally:
        captioner.close()
    return {"captioned": report.captioned, "cached": report.cached, "failed": report.failed}


def _caption_truth(collection: Collection, scenes: list[Scene]) -> float | None:
    """The share of captioned test scenes whose generated caption is true of the scene (None: none)."""
    by_name = {Path(s.path).name: s for s in scenes}
    records = {r.id: r for r in collection.catalog.iter_images("indexed") if Path(r.path).name in by_name}
    said = {
        image_id: next((c.text for c in captions if c.source.startswith("generated")), None)
        for image_id, captions in collection.catalog.captions_for(list(records)).items()
    }
    verdicts = [
        caption_holds(text, by_name[Path(records[i].path).name])
        for i, text in said.items()
        if text is not None
    ]
    return sum(verdicts) / len(verdicts) if verdicts else None


def build_demo(data_root: Path | str, config: DemoConfig | None = None) -> DemoResult:
    """Build (or reuse) the demo scenes and models, index and caption the test scenes, try a query."""
    config = config or DemoConfig()
    began = time.perf_counter()
    root = Path(data_root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    jsonl = _scenes(root, config)
    seconds = {"scenes": time.perf_counter() - began}
    model_dir, blip_dir, done = _models(root, config, jsonl)
    seconds.update(done["seconds"])
    start_r1, val_r1 = done.get("start_r1"), done.get("val_r1")

    stage = time.perf_counter()
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
        seconds["evaluate"] = time.perf_counter() - stage

        stage = time.perf_counter()
        images_dir = jsonl.parent / "images" / "test"
        with Collection(root) as collection:
            rebuild = (
                collection.store.exists()
                and collection.store.read_manifest().fingerprint != encoder.info.fingerprint
            )
            # patch features stored from the pass that embeds each scene, as `clearsight index` does, so
            # the served page draws its boxes from them at once
            ingest_config = IngestConfig(
                progress=config.progress,
                rebuild=rebuild,
                patch_features=get_settings().patch_features != "off",
            )
            summary = ingest(images_dir, collection, encoder, ingest_config)
            seconds["index"] = time.perf_counter() - stage
            stage = time.perf_counter()
            captioned = _caption(collection, blip_dir, config)
            test_scenes = [s for s in generate_scenes(config.scenes) if s.split == "test"]
            captioned["true_of_scene"] = _caption_truth(collection, test_scenes)
            sync_indexes(collection, encoder)  # generated captions join image→text search
            seconds["caption"] = time.perf_counter() - stage
            searcher = Searcher(
                collection, encoder, collection.store.load(expect_fingerprint=encoder.info.fingerprint)
            )
            scene = test_scenes[0]
            query = query_for(scene)
            target = str((images_dir / Path(scene.path).name).resolve())
            hits = searcher.search(Query(text=query, top_k=10)).results
            rank = next((h.rank for h in hits if str(Path(h.path).resolve()) == target), None)
    finally:
        encoder.close()
    (root / DEMO_RECORD).write_text(
        json.dumps({"encoder": str(model_dir), "captioner": str(blip_dir), "key": config.key()}, indent=2),
        encoding="utf-8",
    )
    seconds["total"] = time.perf_counter() - began
    # what the CLIP needs before the first search (scenes, training, evaluation, indexing): the captioner
    # is the "extra minute", and search works without its captions
    captioner_s = seconds.get("train_captioner", 0.0) + seconds.get("caption", 0.0)
    seconds["searchable"] = seconds["total"] - captioner_s
    return DemoResult(
        data_dir=str(root),
        model_dir=str(model_dir),
        captioner_dir=str(blip_dir),
        scenes_dir=str(jsonl.parent),
        images_dir=str(images_dir),
        trained=bool(done["trained"]),
        start_val_r1=start_r1,
        val_r1=val_r1,
        test=test,
        chance_r1=chance,
        indexed={
            "images": summary.index.images if summary.index else 0,
            "encoded": summary.encoded,
            "patches_stored": summary.patches_stored,
        },
        captioned=captioned,
        sample_query=query,
        sample_target=target,
        sample_rank=rank,
        sample_hits=[{"rank": h.rank, "score": h.score, "path": h.path} for h in hits[:5]],
        seconds={k: round(v, 1) for k, v in seconds.items()},
    )
