"""Demo recipe variants: scenes, CLIP training time and held-out R@1 for one variant of the demo's recipe.

The demo must reach a useful R@1 within a couple of minutes on a 2-core CPU, and what gets there is an
empirical question (image size, patch size, batch, positions, scene difficulty). This bench trains one
variant given as JSON overrides of `retrieval.demo.recipes` and prints one line of figures, so the
table in docs/EVAL.md can be reproduced. Run it under `flock /work/cpu.lock` on a shared machine.

    .venv/bin/python bench/recipe_bench.py '{}'                                   # the demo recipe
    .venv/bin/python bench/recipe_bench.py '{"arch": {"image_size": 48}, "train": {"batch_size": 64}}'
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main(argv: list[str]) -> int:
    from retrieval.demo.recipes import DEMO_ARCH, DEMO_SCENES, DEMO_TRAINING, ClipRecipe, train_scene_clip
    from retrieval.demo.synthetic import write_scenes
    from retrieval.encoders import EncoderConfig, create_encoder
    from retrieval.training.datasets import load_dataset
    from retrieval.training.evaluate import evaluate
    from retrieval.training.types import EvalConfig

    overrides = json.loads(argv[0]) if argv else {}
    if not isinstance(overrides, dict) or set(overrides) - {"scenes", "arch", "train"}:
        print("give one JSON object with any of the keys scenes, arch, train")
        return 2
    scenes = replace(DEMO_SCENES, **overrides.get("scenes", {}))
    recipe = ClipRecipe(
        arch=replace(DEMO_ARCH, **overrides.get("arch", {})),
        training=replace(DEMO_TRAINING, **overrides.get("train", {})),
    )
    with tempfile.TemporaryDirectory(prefix="clearsight-recipe-") as tmp:
        began = time.perf_counter()
        cpu0 = time.process_time()
        jsonl = write_scenes(scenes, Path(tmp) / "scenes", progress=False)
        scenes_s = time.perf_counter() - began
        began = time.perf_counter()
        result = train_scene_clip(jsonl, Path(tmp) / "model", recipe, device="cpu")
        train_s = time.perf_counter() - began
        encoder = create_encoder(EncoderConfig(model=str(Path(tmp) / "model"), device="cpu"))
        test = load_dataset("jsonl", jsonl, jsonl.parent, "test")
        metrics = evaluate(test, encoder, EvalConfig(progress=False)).metrics
        encoder.close()
        cpu = time.process_time() - cpu0
    t2i = metrics.text_to_image
    print(
        f"{json.dumps(overrides)}: scenes {scenes_s:.1f} s, training {train_s:.1f} s "
        f"({len(result.step_losses)} steps; {cpu:.0f} s CPU in all), "
        f"best val R@1 {result.best['t2i_r1']:.3f}, "
        f"test text→image R@1 {t2i.recall_at_1:.3f} R@5 {t2i.recall_at_5:.3f}, "
        f"image→text R@1 {metrics.image_to_text.recall_at_1:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
