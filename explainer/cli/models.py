"""`clearsight models`: the encoders the registry knows."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer

from explainer.cli.options import JsonOut
from retrieval.registry import list_encoders


def models_cmd(json_out: JsonOut = False) -> None:
    """List the encoders the registry knows."""
    specs = [asdict(s) for s in list_encoders()]
    if json_out:
        typer.echo(json.dumps({"encoders": specs}, indent=2))
        return
    for s in specs:
        star = "*" if s["default"] else " "
        typer.echo(f"{star} {s['name']:<26} {s['hub_id']:<36} dim {s['dim']:<4} {s['licence']}")
