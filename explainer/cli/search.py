"""`clearsight search`: the same cards as the page and the JSON API, printed as a table or JSON.

The command builds a `CardPipeline` as the server does (evidence, captions, explanations from the
same settings and caches) and asks it for the page; only the choice of stages differs: evidence
and explanations run when asked, and `--caption` may run BLIP for hits that lack a caption.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import typing
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from explainer.cards.captions import CaptionProvider, CatalogCaptions, GeneratingCaptions
from explainer.cards.context import query_echo
from explainer.cards.evidence import EvidenceProvider, NoEvidence, make_evidence_provider
from explainer.cards.pipeline import CardPipeline, ResultPage
from explainer.cli.options import (
    DataDir,
    JsonOut,
    Model,
    Precision,
    data_dir_or_default,
    note,
    precision_or_setting,
)
from explainer.cli.render import page_payload, print_table
from explainer.errors import BadQuery, ModelUnavailable
from explainer.settings import Settings, get_settings
from retrieval import Query, Searcher, load_query_image
from retrieval.modality import detect_query
from retrieval.paths import is_demo_model
from retrieval.query import DOC, QuerySpec

if TYPE_CHECKING:
    from explainer.explain.chain import Explainer  # LangChain: imported only with --explain


def _search_cmd(
    text: Annotated[
        str | None,
        typer.Argument(
            help="What to search for: an image file or an http(s) image URL is searched as an image, "
            "anything else as text (--text forces text)"
        ),
    ] = None,
    image: Annotated[
        Path | None, typer.Option("--image", "-i", help="Image query (alone or with text)")
    ] = None,
    force_text: Annotated[
        bool, typer.Option("--text", help="Search the argument as text even if it names a file or URL")
    ] = False,
    weight: Annotated[
        float, typer.Option("--weight", "-w", help="Text's share in a text+image query, 0..1")
    ] = 0.5,
    negative: Annotated[str | None, typer.Option("--negative", help="Text to steer away from")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Results per page")] = 10,
    offset: Annotated[int, typer.Option("--offset", help="Skip this many results (paging)")] = 0,
    captions: Annotated[
        bool, typer.Option("--captions", help="Return captions (image→text) instead of images")
    ] = False,
    model: Model = None,
    data_dir: DataDir = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device", help="auto, cpu, cuda, cuda:N or mps (default: $CLEARSIGHT_DEVICE, else auto)"
        ),
    ] = None,
    precision: Precision = None,
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
    paths: Annotated[
        bool,
        typer.Option("--paths", help="Print only the hits' file paths, one a line (for `| xargs open`)"),
    ] = False,
    filters: dict[str, Any] | None = None,
) -> None:
    """Search the collection by text, image, or both."""
    explain = explain or explain_backend is not None
    want_evidence = evidence is not None or evidence_method is not None
    if paths and (json_out or captions or explain or caption or want_evidence):
        raise BadQuery(
            "--paths prints paths only: leave out --json, --captions, --explain, --caption and --evidence"
        )
    if (explain or caption or want_evidence) and captions:
        raise BadQuery(
            "--explain, --caption and --evidence describe image results; they cannot be used with --captions"
        )
    settings = get_settings()
    device = device or settings.device
    with ExitStack() as stack:
        searcher = Searcher.open(
            data_dir_or_default(data_dir),
            model=model,
            device=device,
            precision=precision_or_setting(precision),
        )
        stack.callback(searcher.close)
        searcher.collapse = settings.collapse_duplicates  # a query's --show-all shows every copy
        if (mixed := searcher.precision_note()) is not None:
            note(f"clearsight: note: {mixed}")
        knobs = {k: v for k, v in (("nprobe", nprobe), ("ef_search", ef_search)) if v is not None}
        if knobs:  # this search only; the index keeps the knobs it records
            searcher.params = replace(searcher.index.images.params.search, **knobs)
        qimage, qkey = load_query_image(image) if image else (None, None)
        if text is not None:
            detected = detect_query(text, force_text=force_text)
            if detected.kind == "image":
                if qimage is not None:
                    raise BadQuery(
                        f"{text} is an image and --image names another: give one query image "
                        "(use --text to search for the words)"
                    )
                text, qimage, qkey = None, detected.image, detected.image_key
            else:
                text = detected.text
        q = Query(
            text=text,
            image=qimage,
            weight=weight,
            negative=negative,
            top_k=top_k,
            offset=offset,
            image_key=qkey,
            **(filters or {}),
        )
        q.validate()  # before anything is built from it: a bad --top-k is one line, not a traceback
        if paths:  # the paths as the file system knows them (odd bytes kept), nothing else on stdout
            out = sys.stdout.buffer
            for hit in searcher.search(q).results:
                out.write(os.fsencode(hit.path) + b"\n")
            out.flush()
            return
        if captions:
            result = searcher.search_captions(q)
            if json_out:
                typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
            else:
                print_table(result.to_dict())
            return
        evidence_stage: EvidenceProvider = NoEvidence("not asked for")
        if want_evidence or explain:  # the explainer reads the evidence the page would show
            evidence_stage = make_evidence_provider(settings.evidence_regions, evidence_method or "auto")
        explainer = _explainer(settings, explain_backend, searcher, stack) if explain else None
        caption_stage = (
            _captions(searcher, settings, device, stack, precision) if caption else CatalogCaptions(searcher)
        )
        pipeline = CardPipeline(searcher, explainer, evidence_stage, caption_stage)
        page = pipeline.search(q, query_echo(q))
        pipeline.explain_cards_sync(page)
        pngs = _write_pngs(page, evidence) if evidence is not None else []
        payload = page_payload(page, explainer, pngs if evidence is not None else None)
        if json_out:
            typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
            return
        print_table(payload, details=caption or explain)
        if evidence is not None:
            typer.echo(f"evidence: {sum(p is not None for p in pngs)} annotated PNGs in {evidence}")
        if is_demo_model(page.result.model if page.result else ""):
            note("clearsight: note: a DEMO model (synthetic coloured shapes only), not a real encoder")


#: Spec fields the command spells its own way: the argument, --image (a file, not a held key), -w,
#: --negative. Every other field of the query spec (a filter) is an option named after it.
_OWN_FIELDS = frozenset({"text", "image_key", "like_id", "weight", "negative"})


def with_filter_options(command: Callable[..., None]) -> Callable[..., None]:
    """`command` with one option per filter of the query spec (`--min-score`...), typed and described
    by the spec, handed to it as `filters`: a field added to the spec is a flag without a change here."""
    hints = typing.get_type_hints(QuerySpec)
    names = [f.name for f in dataclasses.fields(QuerySpec) if f.name not in _OWN_FIELDS]
    docs = {f.name: f.metadata.get(DOC) or "" for f in dataclasses.fields(QuerySpec)}
    options = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[hints[name], typer.Option("--" + name.replace("_", "-"), help=docs[name])],
        )
        for name in names
    ]
    own = inspect.signature(command, eval_str=True)

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        filters = {n: v for n in names if (v := kwargs.pop(n, None)) is not None}
        command(*args, filters=filters, **kwargs)

    kept = [p for p in own.parameters.values() if p.name != "filters"]
    run.__signature__ = own.replace(parameters=kept + options)  # type: ignore[attr-defined]
    return run


def _explainer(settings: Settings, backend: str | None, searcher: Searcher, stack: ExitStack) -> Explainer:
    """The explainer the server would use, sharing its cache (`<data dir>/explanations.sqlite`)."""
    from explainer.explain.cache import open_explanation_cache
    from explainer.explain.factory import explainer_from_settings

    cache = open_explanation_cache(searcher.collection.data_dir, _warn)
    if cache is not None:
        stack.callback(cache.close)
    explainer = explainer_from_settings(settings, backend, cache, warn=_warn)
    stack.callback(explainer.close)
    return explainer


def _captions(
    searcher: Searcher, settings: Settings, device: str, stack: ExitStack, precision: str | None = None
) -> CaptionProvider:
    """BLIP for hits without a caption; the catalog's captions when BLIP is not on this machine."""
    from explainer.captions.captioner import CaptionerConfig, CaptionService, create_captioner
    from retrieval.paths import demo_captioner

    # A demo collection captions with the demo's own captioner unless another one is configured.
    demo = None if settings.caption_model else demo_captioner(searcher.collection.data_dir)
    config = CaptionerConfig.from_settings(settings, device=device, model=demo, precision=precision)
    try:
        captioner = create_captioner(config)
    except ModelUnavailable as exc:
        _warn(f"captioner unavailable, showing cached or dataset captions instead: {exc}")
        return CatalogCaptions(searcher)
    stack.callback(captioner.close)
    service = CaptionService(
        searcher.collection,
        captioner,
        batch_size=config.resolved_batch_size(),
        prefix=settings.caption_prefix,
    )
    return GeneratingCaptions(searcher, service, _warn)


def _write_pngs(page: ResultPage, out_dir: Path) -> list[Path | None]:
    from retrieval.evidence import write_evidence_pngs

    drawable = [(h.path, ev) for h, ev in zip(page.hits, page.evidence, strict=True) if ev is not None]
    written = iter(write_evidence_pngs([p for p, _ in drawable], [ev for _, ev in drawable], out_dir, "both"))
    return [next(written) if ev is not None else None for ev in page.evidence]


def _warn(message: str) -> None:
    note(f"clearsight: {message}")


search_cmd = with_filter_options(_search_cmd)
