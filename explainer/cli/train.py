"""`clearsight eval` and `finetune`: measure a model on a captioned dataset, improve it on captioned data.

Progress bars and notes go to stderr; with `--json`, stdout carries exactly one JSON object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from explainer.cli.options import (
    DataDir,
    Device,
    JsonOut,
    Model,
    Precision,
    Quiet,
    data_dir_or_default,
    note,
    precision_or_setting,
)
from explainer.errors import ConfigError
from retrieval.training.datasets import describe_formats

_FORMATS = ", ".join(describe_formats())

Format = Annotated[
    str,
    typer.Option("--format", "-f", help=f"Dataset layout: {_FORMATS}", show_default=False),
]
Annotations = Annotated[
    Path,
    typer.Option(
        "--annotations",
        help="Annotation file (for flickr8k the token file; its split files are found beside it)",
        show_default=False,
    ),
]
Images = Annotated[Path, typer.Option("--images", help="Folder holding the dataset's images")]


def eval_cmd(
    fmt: Format,
    annotations: Annotations,
    images: Images,
    split: Annotated[
        str | None, typer.Option("--split", help="train, val (dev), test, ... or all (default: all)")
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Encoder (registry name, hub id or directory); repeat it to compare models side by side",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write report.json, report.md, ranks, plots and failures.html here (one folder per model "
            "and a comparison when several are given)",
        ),
    ] = None,
    k: Annotated[
        str,
        typer.Option("--k", help="Cutoffs for recall, precision and nDCG, e.g. 1,5,10 (at most 1000)"),
    ] = "1,5,10",
    bootstrap: Annotated[
        int,
        typer.Option(
            "--bootstrap", min=0, max=100_000, help="Resamples for R@K confidence intervals (0: none)"
        ),
    ] = 1000,
    index: Annotated[
        str, typer.Option("--index", help="flat (exact), hnsw, ivfpq, or a FAISS factory string")
    ] = "flat",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=4096)] = 32,
    device: Device = "auto",
    precision: Precision = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir", help="Embedding cache (default: DATA_DIR/eval-cache)", show_default=False
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Embed everything again, store nothing")
    ] = False,
    data_dir: DataDir = None,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Retrieval metrics in both directions (R@K, P@K, nDCG@K, MRR...) of one or more models on a dataset."""
    from retrieval.encoders import EncoderConfig, create_encoder
    from retrieval.training.datasets import format_report, load_dataset
    from retrieval.training.evaluate import evaluate, markdown_table
    from retrieval.training.metrics import parse_ks
    from retrieval.training.report import comparison_table, write_comparison
    from retrieval.training.types import EvalConfig, EvalReport

    models = list(dict.fromkeys(model or [None]))  # type: ignore[list-item]
    ks = parse_ks(k)  # a typo in --k fails before any model loads
    dataset = load_dataset(fmt, annotations, images, split)
    note(format_report(dataset.report))
    cache = None if no_cache else (cache_dir or data_dir_or_default(data_dir) / "eval-cache")
    reports: list[EvalReport] = []
    for i, name in enumerate(models):
        target = out if out is None or len(models) == 1 else out / f"model-{i + 1}"
        config = EvalConfig(
            index=index,
            batch_size=batch_size,
            cache_dir=cache,
            out_dir=target,
            progress=not quiet,
            ks=ks,
            bootstrap=bootstrap,
        )
        encoder = create_encoder(
            EncoderConfig(model=name, device=device, precision=precision_or_setting(precision))
        )
        try:
            reports.append(evaluate(dataset, encoder, config))
        finally:
            encoder.close()
        if reports[-1].index.note:
            note(reports[-1].index.note)
    compared = write_comparison(reports, out) if out is not None and len(reports) > 1 else {}
    if json_out:
        payload: Any = (
            reports[0].to_dict() if len(reports) == 1 else {"models": [r.to_dict() for r in reports]}
        )
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    for report in reports:
        typer.echo(markdown_table(report))
        c = report.cache
        typer.echo(
            f"embeddings: {c.image_hits} images and {c.text_hits} captions from the cache, "
            f"{c.images_encoded} and {c.texts_encoded} encoded ({report.seconds['total']:.1f} s)"
        )
        if report.files:
            typer.echo(f"report written to {Path(report.files['json']).parent}\n")
    if len(reports) > 1:
        typer.echo(comparison_table(reports))
        if compared:
            typer.echo(f"comparison written to {compared['markdown'].parent}")


def finetune_cmd(
    fmt: Format,
    annotations: Annotations,
    images: Images,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for the fine-tuned model", show_default=False)
    ],
    model: Model = None,
    train_split: Annotated[str, typer.Option("--train-split")] = "train",
    val_split: Annotated[str, typer.Option("--val-split")] = "val",
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Held out for validation when the data has no splits")
    ] = 0.1,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 10,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate")] = 1e-5,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, max=65536)] = 64,
    freeze: Annotated[
        str, typer.Option("--freeze", help="none, vision, text, all-but-projections or last-n")
    ] = "none",
    last_n: Annotated[int, typer.Option("--last-n", min=1, help="Layers per tower trained with last-n")] = 2,
    warmup: Annotated[
        float, typer.Option("--warmup", help="Warmup: a fraction of all steps (<1) or a step count")
    ] = 0.1,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 0.1,
    patience: Annotated[int, typer.Option("--patience", min=1, help="Epochs without improvement")] = 3,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches per step (CUDA)")] = 1,
    amp: Annotated[
        str | None,
        typer.Option("--amp", help="Training autocast: auto, fp16, bf16 or off (same as --precision)"),
    ] = None,
    precision: Precision = None,
    force: Annotated[
        bool, typer.Option("--force", help="Write the model even if it is worse than the start")
    ] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="torch CPU threads (default: torch's choice)")
    ] = None,
    device: Device = "auto",
    data_dir: DataDir = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Do not cache the starting model's validation embeddings")
    ] = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Contrastive fine-tuning; refuses a model that collapsed or is worse on validation than the start.

    The starting model's validation embeddings are cached in DATA_DIR/eval-cache, shared with `eval`."""
    from retrieval.training.datasets import format_report
    from retrieval.training.finetune import finetune, load_training_data, side_by_side
    from retrieval.training.types import FinetuneConfig

    config = FinetuneConfig(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        warmup=warmup,
        freeze=freeze,
        last_n=last_n,
        patience=patience,
        grad_accum=grad_accum,
        amp=_training_amp(amp, precision),
        device=device,
        seed=seed,
        force=force,
        threads=threads,
        progress=not quiet,
        cache_dir=None if no_cache else str(data_dir_or_default(data_dir) / "eval-cache"),
    )
    train, val = load_training_data(fmt, annotations, images, train_split, val_split, val_fraction, seed)
    note(f"train: {format_report(train.report)}\nval: {format_report(val.report)}")
    result = finetune(model or _default_model(), train, val, out, config, log=note)
    for remark in result.notes:
        note(remark)
    if json_out:
        payload: dict[str, Any] = result.to_dict()
        payload.pop("step_losses", None)
        typer.echo(json.dumps(payload, indent=2))
        return
    typer.echo(side_by_side(result.start, result.best))
    typer.echo(f"best epoch {result.best_epoch}; model written to {result.out_dir}")


#: `--precision` in training terms: which autocast the training steps run under.
_AMP = {"auto": "auto", "fp32": "off", "bf16": "bf16", "fp16": "fp16"}


def _training_amp(amp: str | None, precision: str | None) -> str:
    """The autocast for training: --amp (the older spelling) or --precision, else the setting; not both."""
    if amp is not None and precision is not None and _AMP[precision_or_setting(precision)] != amp:
        raise ConfigError(f"--amp {amp} and --precision {precision} disagree; give one of them")
    return amp if amp is not None else _AMP[precision_or_setting(precision)]


def _default_model() -> str:
    from retrieval.registry import default_encoder

    return default_encoder().name
