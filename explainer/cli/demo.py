"""`clearsight demo`: build the offline demo (`explainer.demo`), report how good it is, and serve it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from explainer.cli.options import Device, Host, JsonOut, Port, Quiet, data_dir_or_default, note
from explainer.cli.serve import run_server
from explainer.demo import DemoConfig, DemoResult, build_demo
from retrieval.demo.recipes import DEMO_CAPTIONER, DEMO_SCENES, ClipRecipe


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
    train_scenes: Annotated[
        int, typer.Option("--train-scenes", min=8, max=100_000, help="Training scenes")
    ] = DEMO_SCENES.n_train,
    test_scenes: Annotated[
        int, typer.Option("--test-scenes", min=2, max=2_000, help="Scenes indexed for search")
    ] = DEMO_SCENES.n_test,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, max=1_000, help="CLIP epochs")] = None,
    captioner_steps: Annotated[
        int,
        typer.Option("--captioner-steps", min=1, max=100_000, help="Training steps of the demo captioner"),
    ] = DEMO_CAPTIONER.steps,
    retrain: Annotated[
        bool, typer.Option("--retrain", help="Train again even if a demo model exists")
    ] = False,
    device: Device = "auto",
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Build an offline demo: synthetic scenes, a tiny CLIP trained on them, and an index to search."""
    root = data_dir or data_dir_or_default(None) / "demo"
    recipe = ClipRecipe()
    if epochs is not None:
        recipe = replace(recipe, training=replace(recipe.training, epochs=epochs, patience=epochs))
    config = DemoConfig(
        scenes=replace(DEMO_SCENES, n_train=train_scenes, n_test=test_scenes),
        clip=recipe,
        captioner=replace(
            DEMO_CAPTIONER, steps=captioner_steps, warmup=min(DEMO_CAPTIONER.warmup, captioner_steps)
        ),
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
        truth = result.captioned.get("true_of_scene")
        said = (
            f"; {100 * truth:.0f}% of its captions are true of their scene"
            if isinstance(truth, float)
            else ""
        )
        typer.echo(
            f"captioned {result.captioned['captioned']} scenes with the demo captioner "
            f"({result.captioned['cached']} from cache): {result.captioner_dir}{said}"
        )
        secs = result.seconds
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in secs.items() if k not in ("total", "searchable"))
        typer.echo(
            f"demo built in {secs.get('total', 0):.0f} s ({stages}); searchable after "
            f"{secs.get('searchable', 0):.0f} s, the captioner's training and captions being the rest"
        )
        rank = f"rank {result.sample_rank}" if result.sample_rank else "not in the top 10"
        typer.echo(f'sample query "{result.sample_query}": the scene it describes is at {rank}')
    note(
        "try the demo with:\n"
        f'  clearsight search "{result.sample_query}" --data-dir {root}\n'
        f"  clearsight serve --data-dir {root}"
    )
