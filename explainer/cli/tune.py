"""`clearsight tune-index`: measure index kinds on this collection, recommend one, optionally apply it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from explainer.cli.options import DataDir, Device, JsonOut, data_dir_or_default, note
from retrieval import Collection, EncoderConfig, create_encoder
from retrieval.index.tuning import (
    DEFAULT_MEMORY_BUDGET,
    DEFAULT_QUERIES,
    DEFAULT_TARGET_RECALL,
    apply_recommendation,
    save_plot,
    tune_collection,
)


def tune_cmd(
    data_dir: DataDir = None,
    json_out: JsonOut = False,
    apply: Annotated[
        bool, typer.Option("--apply", help="Rebuild the collection's index with the recommendation")
    ] = False,
    queries: Annotated[
        int, typer.Option("--queries", min=1, max=100_000, help="Queries drawn from the collection")
    ] = DEFAULT_QUERIES,
    memory_mib: Annotated[
        int,
        typer.Option(
            "--memory-mib", min=1, max=1 << 22, help="Skip candidates whose index would exceed this"
        ),
    ] = DEFAULT_MEMORY_BUDGET // (1 << 20),
    target_recall: Annotated[
        float,
        typer.Option(
            "--target-recall",
            min=0.01,
            max=1.0,
            help="Recall@10 the recommendation must reach (fastest wins)",
        ),
    ] = DEFAULT_TARGET_RECALL,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="Where to write the latency-vs-recall PNG (default: DATA_DIR/tune-index.png)"
        ),
    ] = None,
    device: Device = "auto",
) -> None:
    """Measure flat, HNSW and IVF indexes on this collection (recall@10 vs exact, latency, size)."""
    ddir = data_dir_or_default(data_dir)
    with Collection(ddir) as collection:
        report = tune_collection(
            collection, max_queries=queries, memory_budget=memory_mib << 20, target_recall=target_recall
        )
        png = save_plot(report, plot or ddir / "tune-index.png")
        applied = None
        if apply:
            model = collection.store.read_manifest().model_id
            encoder = create_encoder(EncoderConfig(model=model, device=device))
            try:
                applied = apply_recommendation(collection, encoder, report.recommended)
            finally:
                encoder.close()
    if json_out:
        payload = {**report.to_dict(), "plot": str(png)}
        if applied is not None:
            payload["applied"] = {"version": applied.saved_version, "built_factory": applied.built_factory}
        typer.echo(json.dumps(payload, indent=2))
        return
    typer.echo(
        f"{report.vectors} vectors, {report.queries} queries from the collection's {report.query_source}; "
        f"recall@10 against exact search, latency one query at a time"
    )
    typer.echo(report.table())
    for reason in report.skipped:
        note(f"clearsight: not measured: {reason}")
    r = report.recommended
    params = ", ".join(f"{k}={v}" for k, v in r.params.items()) or "no knobs"
    typer.echo(
        f"recommended: {r.kind} ({params}): recall@10 {r.recall_at_10:.3f}, p50 {r.p50_ms:.3f} ms"
        + ("" if r.recall_at_10 >= report.target_recall else f" (nothing reached {report.target_recall})")
    )
    typer.echo(f"plot: {png}")
    if applied is not None:
        typer.echo(f"applied: index rebuilt as {applied.built_factory} (version {applied.saved_version})")
    else:
        typer.echo("apply it with: clearsight tune-index --apply")
