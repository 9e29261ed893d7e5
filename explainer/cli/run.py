"""`clearsight run`: the README's main job, index a folder then serve it (or the demo without weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from explainer.cli.demo import report_demo
from explainer.cli.index import Exclude, index_folder, print_summary
from explainer.cli.options import DataDir, Device, Host, Model, Port, data_dir_or_default, note
from explainer.cli.serve import run_server
from explainer.demo import DemoConfig, build_demo
from explainer.errors import ModelUnavailable


def run_cmd(
    path: Annotated[
        Path | None,
        typer.Argument(help="Folder of images to index and serve; without it, the offline demo"),
    ] = None,
    model: Model = None,
    data_dir: DataDir = None,
    host: Host = None,
    port: Port = None,
    device: Device = "auto",
    exclude: Exclude = None,
    no_serve: Annotated[bool, typer.Option("--no-serve", help="Index (or build the demo) and exit")] = False,
    no_captions: Annotated[
        bool,
        typer.Option(
            "--no-captions",
            help="Serve without generating captions (by default the server captions each page's hits, "
            "then the rest of the collection while idle)",
        ),
    ] = False,
) -> None:
    """The main job: index PATH, then serve it. Falls back to the offline demo without default weights."""
    serve_dir = data_dir
    captions: bool | None = False if no_captions else None  # None: the settings decide (the demo's case)
    if path is not None:
        try:
            excluding = exclude or None  # None: the globs saved for this folder, if any
            summary, report, ddir = index_folder(path, data_dir, model, device=device, exclude=excluding)
            print_summary(summary, report, ddir, json_out=False)
            captions = not no_captions  # a user's folder has no captions until BLIP writes them
        except ModelUnavailable as exc:
            if model is not None:
                raise  # the user named this model: falling back would hide their mistake
            note(f"clearsight: {exc}")
            note(
                "clearsight: the default encoder's weights are not on this machine, so this runs the "
                "offline DEMO instead (synthetic scenes and a tiny model trained on them, not your photos)"
            )
            path = None
    if path is None:
        demo_dir = data_dir_or_default(data_dir) / "demo"
        result = build_demo(demo_dir, DemoConfig(device=device))
        report_demo(result, demo_dir, json_out=False)
        serve_dir = demo_dir
    if not no_serve:
        run_server(serve_dir, host, port, captions=captions)
