"""`clearsight models`: the encoders the registry knows, and whether their weights are on this machine."""

from __future__ import annotations

import json
from dataclasses import asdict

from rich.text import Text

from explainer.cli.options import JsonOut
from explainer.cli.tables import console, table
from retrieval.hub import in_cache
from retrieval.registry import list_encoders


def models_cmd(json_out: JsonOut = False) -> None:
    """List the encoders the registry knows; "cached" means the weights are in the local HF cache."""
    specs = [{**asdict(s), "cached": in_cache(s.hub_id, s.revision)} for s in list_encoders()]
    if json_out:
        print(json.dumps({"encoders": specs}, indent=2))
        return
    t = table(
        ("name", {"no_wrap": True}),
        ("hub id", {"no_wrap": True}),
        ("dim", {"justify": "right"}),
        ("weights", {"no_wrap": True}),
        ("licence", {"overflow": "fold"}),
    )
    for s in specs:
        weights = "cached" if s["cached"] else "not here"
        name = s["name"] + ("*" if s["default"] else "")
        t.add_row(*(Text(str(v)) for v in (name, s["hub_id"], s["dim"], weights, s["licence"])))
    out = console()
    out.print(t)
    out.print(
        "* the default. Weights not here: `hf download HUB_ID` on a connected machine, then copy "
        "~/.cache/huggingface here (or pass a local directory with --model)."
    )
