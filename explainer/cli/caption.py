"""`clearsight caption`: precompute captions for a whole collection, then let them join image→text search.

BLIP writes a few captions per second at best on a CPU, so captions are computed ahead of queries,
in batches that each commit: a run killed midway is resumed by running the command again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from explainer.cli.options import DataDir, JsonOut, Quiet
from explainer.errors import ConfigError

CaptionModel = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Captioner: registry name, hub id or local directory "
        "(default: $CLEARSIGHT_CAPTION_MODEL, else the registry's default, blip-base)",
        show_default=False,
    ),
]


def caption_cmd(
    data_dir: DataDir = None,
    model: CaptionModel = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            max=1024,
            help="Images per forward pass (default: $CLEARSIGHT_CAPTION_BATCH_SIZE, else auto: 8 on a CPU, "
            "more on a GPU with the memory for it)",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device", help="auto, cpu, cuda, cuda:N or mps (default: $CLEARSIGHT_DEVICE, else auto)"
        ),
    ] = None,
    prefix: Annotated[
        str | None,
        typer.Option("--prefix", help='Start every caption with this text, e.g. "a photography of"'),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=0, help="Caption at most N more images now (cached ones do not count)"),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help="auto, fp32, bf16, fp16 or int8 (CPU only: BLIP's linear layers quantised) "
            "(default: $CLEARSIGHT_PRECISION, else auto: fp16 on CUDA, bf16 on a CPU with native bf16, "
            "fp32 otherwise)",
            show_default=False,
        ),
    ] = None,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Caption every indexed image (once per content) and add the captions to image→text search."""
    caption_now(data_dir, model, batch_size, device, prefix, limit, precision, quiet, json_out)


def caption_now(
    data_dir: Path | None,
    model: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    prefix: str | None = None,
    limit: int | None = None,
    precision: str | None = None,
    quiet: bool = False,
    json_out: bool = False,
    *,
    err: bool = False,
) -> None:
    """The command's work, for `clearsight index --caption` too (`err`: report on stderr, after JSON)."""
    from explainer.captions.captioner import (
        SOURCE_PREFIX,
        CaptionerConfig,
        CaptionService,
        create_captioner,
        source_label,
    )
    from explainer.settings import get_settings
    from retrieval import Collection, EncoderConfig, create_encoder
    from retrieval.index.sync import sync_indexes
    from retrieval.paths import demo_captioner

    settings = get_settings()
    precision = caption_precision_or_setting(precision)  # a typo fails before anything is read or loaded
    collection = Collection(data_dir or settings.data_dir)
    manifest = collection.store.read_manifest()  # no index, nothing to caption: say so before loading BLIP
    if model is None and not settings.caption_model:  # a demo collection captions with the demo's captioner
        model = demo_captioner(collection.data_dir)
    cfg = CaptionerConfig.from_settings(
        settings, model=model, device=device, batch_size=batch_size, precision=precision
    )
    with collection.writer_lock():
        # The index's own encoder embeds the new captions; loading it first fails fast, not after hours.
        encoder = create_encoder(EncoderConfig(model=manifest.model_id, device=cfg.device))
        captioner = create_captioner(cfg)
        try:
            service = CaptionService(
                collection,
                captioner,
                batch_size=cfg.resolved_batch_size(),
                prefix=prefix or settings.caption_prefix,
            )
            report = service.caption_collection(progress=not quiet, limit=limit)
        finally:
            captioner.close()
        sync = sync_indexes(collection, encoder, progress=not quiet)
        encoder.close()
    generated = sum(1 for c in collection.catalog.all_captions() if c.source.startswith(SOURCE_PREFIX))

    if json_out:
        out: dict[str, Any] = {
            "captioner": captioner.name,
            "source": source_label(captioner),
            "fingerprint": captioner.fingerprint,
            "prefix": service.prefix,
            **report.to_dict(),
            "index": {
                "images": sync.images,
                "captions": sync.captions,
                "generated_captions": generated,
                "saved_version": sync.saved_version,
            },
        }
        typer.echo(json.dumps(out, indent=2, ensure_ascii=False), err=err)
        return
    r = report
    line = f"captioned {r.captioned} images now"
    if r.captioned:
        line += f" ({r.rate:.2f} img/s)"
    line += f", {r.cached} from cache, {r.failed} failed"
    if r.remaining:
        line += f"; {r.remaining} left by --limit (run again to continue)"
    typer.echo(line, err=err)
    for reason, n in sorted(r.failures.items()):
        typer.echo(f"  failed: {n} x {reason}", err=err)
    typer.echo(
        f"captions index: {sync.captions} captions, {generated} generated "
        f"({source_label(captioner)}) in {collection.data_dir}",
        err=err,
    )


def caption_precision_or_setting(precision: str | None) -> str:
    """`--precision` (or $CLEARSIGHT_PRECISION) for a captioner, int8 included; checked before any loading."""
    from explainer.captions.captioner import CAPTION_PRECISIONS
    from explainer.settings import get_settings

    value = (precision or get_settings().precision or "auto").strip().lower()
    if value not in CAPTION_PRECISIONS:
        raise ConfigError(f"unknown precision {value!r}: use {', '.join(CAPTION_PRECISIONS)}")
    return value
