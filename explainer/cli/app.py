"""The `clearsight` command line. It translates typed errors into one-line messages and exit codes."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from retrieval.errors import ClearsightError, ConfigError

app = typer.Typer(
    name="clearsight",
    help="Explainable image search: index a folder of images, search it by text and image, see why.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where the catalog and index live "
        "(default: $CLEARSIGHT_DATA_DIR, else ~/.local/share/clearsight)",
        show_default=False,
    ),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="Encoder: registry name, hub id or local directory (see `clearsight models`)"
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table")]


def _err(msg: str) -> None:
    typer.echo(f"clearsight: error: {msg}", err=True)


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars")]
Host = Annotated[str | None, typer.Option("--host", help="Interface to listen on (default: 127.0.0.1)")]
Port = Annotated[int | None, typer.Option("--port", "-p", min=0, max=65535, help="Port (default: 8000)")]


def boundary(fn: F) -> F:
    """Errors become one line on stderr and an exit code; never a stack trace for expected failures."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClearsightError as exc:
            _err(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _err("interrupted; work committed so far is kept, run the command again to finish")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _settings_data_dir(data_dir: Path | None) -> Path:
    from explainer.settings import get_settings

    return data_dir or get_settings().data_dir


def _progress_enabled(quiet: bool) -> bool:
    return not quiet


@app.command("index")
@boundary
def index_cmd(
    path: Annotated[Path, typer.Argument(help="Folder of images (searched recursively)")],
    model: Model = None,
    data_dir: DataDir = None,
    index: Annotated[
        str | None,
        typer.Option("--index", help="flat (exact, default), hnsw, ivfpq, or a FAISS factory string"),
    ] = None,
    captions: Annotated[
        Path | None,
        typer.Option("--captions", help="JSONL of {image, captions} (default: PATH/captions.jsonl)"),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=4096)] = 32,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="Decode threads")] = 2,
    device: Device = "auto",
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Replace an index built with another model")
    ] = False,
    patches: Annotated[
        bool,
        typer.Option(
            "--patches",
            help="Also store compact patch features (CLIP; about 25 KB per image for ViT-B/32), "
            "so evidence needs no model pass at search time (--evidence-method stored)",
        ),
    ] = False,
    quiet: Quiet = False,
    json_out: JsonOut = False,
) -> None:
    """Index (or update the index of) every image under PATH."""
    from retrieval import Collection, EncoderConfig, IngestConfig, create_encoder
    from retrieval.ingest import ingest

    if not path.is_dir():  # before loading any model: a typo should fail in a second, not after a load
        what = "is not a folder" if path.exists() else "does not exist"
        raise ConfigError(f"{path} {what}: give the folder of images to index")
    ddir = _settings_data_dir(data_dir)
    collection = Collection(ddir)
    if model is None and collection.store.exists() and not rebuild:
        model = collection.store.read_manifest().model_id  # keep indexing with the index's own model
    encoder = create_encoder(EncoderConfig(model=model, device=device))
    if patches:
        from retrieval.evidence import can_give_patches

        if not can_give_patches(encoder):
            raise ConfigError(
                f"--patches needs a CLIP model; {encoder.info.family} has no per-patch projection"
            )
    cfg = IngestConfig(
        batch_size=batch_size,
        workers=workers,
        factory=index,
        captions_file=captions,
        rebuild=rebuild,
        progress=_progress_enabled(quiet),
    )
    summary = ingest(path, collection, encoder, cfg, log=lambda m: typer.echo(m, err=True))
    stored: dict[str, Any] | None = None
    if patches:
        from retrieval.evidence import store_collection_patches

        _, report = store_collection_patches(collection, encoder, progress=_progress_enabled(quiet))
        stored = {
            "written": report.written,
            "already_stored": report.skipped,
            "failed": report.failed,
            "bytes_per_image": round(report.bytes_per_image),
        }
    if json_out:
        typer.echo(json.dumps({**summary.to_dict(), "patches": stored}, indent=2))
        return
    s = summary
    typer.echo(
        f"scanned {s.scanned} files: {s.new} new, {s.changed} changed, {s.unchanged} unchanged, "
        f"{s.deleted} removed; encoded {s.encoded} ({s.rate:.1f} img/s), {s.reused} identical reused, "
        f"{s.failed} failed"
    )
    for reason, n in sorted(s.failures.items()):
        typer.echo(f"  failed: {n} x {reason}")
    if s.index:
        typer.echo(
            f"index: {s.index.images} images, {s.index.captions} captions ({s.index.built_factory}) in {ddir}"
        )
    if stored is not None:
        typer.echo(
            f"patch features: {stored['written']} stored ({stored['bytes_per_image']} bytes/image), "
            f"{stored['already_stored']} already stored, {stored['failed']} failed"
        )


@app.command("search")
@boundary
def search_cmd(
    text: Annotated[str | None, typer.Argument(help="Text query")] = None,
    image: Annotated[
        Path | None, typer.Option("--image", "-i", help="Image query (alone or with text)")
    ] = None,
    weight: Annotated[
        float, typer.Option("--weight", "-w", help="Text's share in a text+image query, 0..1")
    ] = 0.5,
    negative: Annotated[str | None, typer.Option("--negative", help="Text to steer away from")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Results per page")] = 10,
    offset: Annotated[int, typer.Option("--offset", help="Skip this many results (paging)")] = 0,
    min_score: Annotated[
        float | None, typer.Option("--min-score", help="Drop results scoring below this")
    ] = None,
    captions: Annotated[
        bool, typer.Option("--captions", help="Return captions (image→text) instead of images")
    ] = False,
    model: Model = None,
    data_dir: DataDir = None,
    device: Device = "auto",
    nprobe: Annotated[
        int | None,
        typer.Option("--nprobe", min=1, help="IVF lists to visit (ivfpq; default: what the index records)"),
    ] = None,
    ef_search: Annotated[
        int | None,
        typer.Option("--ef-search", min=1, help="HNSW search breadth (default: what the index records)"),
    ] = None,
    json_out: JsonOut = False,
    evidence: Annotated[
        Path | None,
        typer.Option("--evidence", help="Write one annotated PNG per hit into DIR; --json gets the boxes"),
    ] = None,
    evidence_method: Annotated[
        str | None,
        typer.Option(
            "--evidence-method",
            help="grid, dense or stored (dense from saved patch features) "
            "(default: dense for CLIP, else grid)",
        ),
    ] = None,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="Add each image's caption and an explanation of why it matches "
            "(Groq with GROQ_API_KEY, else the offline explainer)",
        ),
    ] = False,
    caption: Annotated[
        bool,
        typer.Option(
            "--caption",
            help="Add each image's caption, generating missing ones with BLIP (cached in the catalog)",
        ),
    ] = False,
    explain_backend: Annotated[
        str | None,
        typer.Option(
            "--explain-backend",
            help="Explainer for --explain (implies it): auto, offline, groq, local or fake "
            "(default: $CLEARSIGHT_EXPLAIN_BACKEND, else auto)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Search the collection by text, image, or both."""
    from retrieval import Query, Searcher, load_query_image
    from retrieval.errors import BadQuery

    explain = explain or explain_backend is not None
    if (explain or caption) and captions:
        raise BadQuery("--explain and --caption describe image results; they cannot be used with --captions")
    searcher = Searcher.open(_settings_data_dir(data_dir), model=model, device=device)
    knobs = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
    if knobs:  # this search only; the index keeps the knobs it records
        from dataclasses import replace

        searcher.params = replace(searcher.index.images.params.search, **knobs)
    qimage, qkey = load_query_image(image) if image else (None, None)
    q = Query(
        text=text,
        image=qimage,
        weight=weight,
        negative=negative,
        top_k=top_k,
        offset=offset,
        min_score=min_score,
        image_key=qkey,
    )
    vec = None if captions else searcher.embed_query(q)
    result = searcher.search_captions(q) if vec is None else searcher.search_vector(vec, q, kind=q.kind)
    payload = result.to_dict()
    pngs: list[Path | None] = []
    if evidence is not None or evidence_method is not None:
        from retrieval.evidence import EvidenceConfig, annotate_results

        config = EvidenceConfig(method=evidence_method or "auto")
        pngs = annotate_results(searcher, q, result, payload, config, evidence, query_vec=vec)
    if explain or caption:
        from explainer.cards.describe import describe_results
        from explainer.settings import get_settings

        describe_results(
            searcher,
            q,
            result,
            payload,
            get_settings(),
            explain=explain,
            caption=caption,
            backend=explain_backend,
            device=device,
            query_vec=vec,
            warn=lambda m: typer.echo(f"clearsight: {m}", err=True),
        )
    if json_out:
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    _print_table(payload)
    if evidence is not None:
        typer.echo(f"evidence: {sum(p is not None for p in pngs)} annotated PNGs in {evidence}")
    from retrieval.paths import is_demo_model

    if is_demo_model(result.model):
        typer.echo(
            "clearsight: note: a DEMO model (synthetic coloured shapes only), not a real encoder", err=True
        )


def _print_table(result: dict[str, Any]) -> None:
    rows = result["results"]
    target = result["target"]
    typer.echo(
        f"{len(rows)} {target} for a {result['query_kind']} query "
        f"({result['total']} indexed, model {result['model']}, {result['index_factory']})"
    )
    if not rows:
        return
    width = max(
        40, min(100, os.get_terminal_size(sys.stdout.fileno()).columns - 20) if sys.stdout.isatty() else 100
    )
    typer.echo(f"{'rank':>4}  {'score':>7}  {'id':>6}  {'caption' if target == 'captions' else 'path'}")
    for r in rows:
        label = f"{r['text']}  [{Path(r['path']).name}]" if target == "captions" else r["path"]
        if len(label) > width:
            label = "…" + label[-(width - 1) :]
        typer.echo(f"{r['rank']:>4}  {r['score']:>7.4f}  {r['id']:>6}  {label}")
        if r.get("caption") or r.get("explanation"):
            from explainer.cards.describe import detail_lines

            for line in detail_lines(r, width + 20):
                typer.echo(line)


@app.command("models")
@boundary
def models_cmd(json_out: JsonOut = False) -> None:
    """List the encoders the registry knows."""
    from dataclasses import asdict

    from retrieval.registry import list_encoders

    specs = [asdict(s) for s in list_encoders()]
    if json_out:
        typer.echo(json.dumps({"encoders": specs}, indent=2))
        return
    for s in specs:
        star = "*" if s["default"] else " "
        typer.echo(f"{star} {s['name']:<26} {s['hub_id']:<36} dim {s['dim']:<4} {s['licence']}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


# The other commands live in their own modules and register themselves on `app` when imported.
import explainer.cli.caption  # noqa: E402
import explainer.cli.serve  # noqa: E402
import explainer.cli.train  # noqa: E402,F401

if __name__ == "__main__":
    main()
