"""`clearsight index`: build or update a collection's index from a folder of images."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
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
from retrieval import Collection, EncoderConfig, IngestConfig, IngestSummary, create_encoder
from retrieval.encoders import default_encoder
from retrieval.encoders.serving import ServingEncoder
from retrieval.evidence import StoreReport
from retrieval.folders import check_excludes
from retrieval.index import kinds
from retrieval.index.params import DEFAULT_EF_CONSTRUCTION, SearchParams
from retrieval.index.tuning import factory_for
from retrieval.paths import display_path


@dataclass(frozen=True)
class IndexKnobs:
    """Index parameters given on the command line; None keeps what the index records."""

    hnsw_m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None
    nprobe: int | None = None
    nlist: int | None = None

    def forces_rebuild(self, collection: Collection, factory: str | None) -> bool:
        """A new efConstruction only takes effect by building the graph again."""
        if self.ef_construction is None or not collection.store.exists():
            return False
        m = collection.store.read_manifest()
        kind = factory or m.factory
        return kind.lower().startswith("hnsw") and m.params.ef_construction != self.ef_construction


ENGINES = ("local", "ray")
#: What `--index` offers: every row of the table of kinds, then auto and raw factory strings.
INDEX_HELP = (
    ", ".join(f"{k.name} ({k.summary})" for k in kinds.KINDS)
    + f", {kinds.AUTO} (chosen from the collection's size and --memory-budget), or a FAISS factory string"
)


Exclude = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        metavar="GLOB",
        help="Skip folders or files matching GLOB (repeatable; a name such as 'Private' or '*.png' at any "
        "depth, or a path under PATH such as '2019/raw'); saved with the collection, so re-indexing and "
        "--watch use it too. Hidden folders and NAS/OS thumbnail folders are always skipped",
    ),
]
NoExcludes = Annotated[
    bool, typer.Option("--no-excludes", help="Forget the exclude globs saved for PATH (index everything)")
]
Hidden = Annotated[
    bool | None,
    typer.Option(
        "--hidden/--no-hidden",
        help="Also index hidden files and folders (names starting with '.'); saved like --exclude "
        "(default: skipped)",
    ),
]


def excludes_given(exclude: list[str] | None, no_excludes: bool) -> list[str] | None:
    """The exclude globs to save: None keeps the saved ones; --no-excludes clears them."""
    if no_excludes and exclude:
        raise ConfigError("give --exclude or --no-excludes, not both")
    return [] if no_excludes else (exclude or None)


def index_folder(
    path: Path,
    data_dir: Path | None = None,
    model: str | None = None,
    *,
    index: str | None = None,
    captions: Path | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    precision: str | None = None,
    rebuild: bool = False,
    patches: bool = False,
    progress: bool = True,
    knobs: IndexKnobs | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    memory_budget: str | None = None,
    exclude: Sequence[str] | None = None,
    include_hidden: bool | None = None,
) -> tuple[IngestSummary, StoreReport | None, Path]:
    """Index (or update) `path` into a collection; the plain function behind the command (and `run`).

    Returns the ingest summary, the patch-store report when `patches` was asked, and the data dir.
    `workers` is the one "parallel workers" knob: decode threads with the local engine, encoder
    actors with `engine="ray"` (which imports Ray only then). `exclude` and `include_hidden` None keep
    what the collection saved for this folder (see retrieval.folders); given, they are saved.
    """
    from explainer.settings import get_settings
    from retrieval.evidence import can_give_patches, store_collection_patches
    from retrieval.index.auto import parse_bytes
    from retrieval.ingest import ingest

    if not path.is_dir():  # before loading any model: a typo should fail in a second, not after a load
        what = "is not a folder" if path.exists() else "does not exist"
        raise ConfigError(f"{path} {what}: give the folder of images to index")
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}: use {' or '.join(ENGINES)}")
    if ray_address is not None and engine != "ray":
        raise ConfigError("a Ray address only applies to the Ray engine")
    if index is not None:
        kinds.check_name(index)  # a typo fails now, not after the model has loaded
    if exclude is not None:
        exclude = check_excludes(exclude)  # so does a bad glob
    budget = parse_bytes(memory_budget) if memory_budget is not None else None
    ddir = data_dir_or_default(data_dir)
    collection = Collection(ddir)
    manifest = collection.store.read_manifest() if collection.store.exists() else None
    if model is None and not rebuild:  # keep indexing with the collection's own model
        if manifest is not None:
            model = manifest.model_id
        elif (started := collection.catalog.indexing_model()) is not None:
            model = started[0]  # a first run stopped before writing an index: resume with its model
    pool = None
    if engine == "ray":
        from retrieval.distributed.ingest import EncoderPool, RayConfig, driver_encoder

        ray_cfg = RayConfig(
            address=ray_address,
            workers=workers or RayConfig.workers,
            device=None if device == "auto" else device,
        )
        actor_encoder = EncoderConfig(
            model=model or default_encoder().name,
            device=ray_cfg.device,
            precision=precision_or_setting(precision),
        )
    try:
        if engine == "ray" and manifest is None:
            # a first run encodes everything: start the actors now (their imports and model loads are most
            # of a small run), and let one of them store the text tower the driver needs, so the driver
            # loads no model of its own
            pool = EncoderPool(ray_cfg, actor_encoder)
            encoder = driver_encoder(pool, collection, actor_encoder)
        else:
            # loads the model only when something is encoded: a re-scan with nothing new loads none (on Ray
            # the driver's encoder only embeds caption texts: --device names the actors' device)
            encoder = ServingEncoder(
                model,
                ddir,
                device="auto" if engine == "ray" else device,
                precision=precision_or_setting(precision),
                expect_fingerprint=manifest.fingerprint if manifest is not None else None,
            )
        if patches and not can_give_patches(encoder):
            raise ConfigError(
                f"--patches needs a CLIP model; {encoder.info.family} has no per-patch projection"
            )
        knobs = knobs or IndexKnobs()
        factory = factory_for(index, knobs.hnsw_m, knobs.nlist)
        search = None
        if knobs.ef_search is not None or knobs.nprobe is not None:
            recorded = manifest.params.search if manifest is not None else None
            base = recorded or SearchParams()
            search = SearchParams(
                nprobe=knobs.nprobe or base.nprobe, ef_search=knobs.ef_search or base.ef_search
            )
        cfg = IngestConfig(
            batch_size=batch_size,
            workers=workers,
            factory=factory,
            captions_file=captions,
            rebuild=rebuild or knobs.forces_rebuild(collection, factory),
            progress=progress,
            search=search,
            ef_construction=knobs.ef_construction or DEFAULT_EF_CONSTRUCTION,
            memory_budget=budget,
            exclude=None if exclude is None else tuple(exclude),
            include_hidden=include_hidden,
            patch_features=patches or get_settings().patch_features != "off",
        )
        if engine == "ray":
            from retrieval.distributed.ingest import ray_ingest

            handed, pool = pool, None  # ray_ingest closes the pool it is given
            summary = ray_ingest(
                path, collection, encoder, actor_encoder, cfg, ray_cfg, log=note, pool=handed
            )
        else:
            summary = ingest(path, collection, encoder, cfg, log=note)
    finally:
        if pool is not None:  # the run failed before Ray ingest took the actors over: stop them
            pool.close()
    report = None
    if patches:  # the images indexed before, or by Ray; this run's own were stored as they were embedded
        rest = store_collection_patches(collection, encoder, progress=progress)[1]
        report = StoreReport(
            rest.written + summary.patches_stored,
            rest.skipped - summary.patches_stored,
            rest.failed,
            rest.bytes_written + summary.patches_bytes,
        )
    return summary, report, ddir


def index_cmd(
    path: Annotated[Path, typer.Argument(help="Folder of images (searched recursively)")],
    model: Model = None,
    data_dir: DataDir = None,
    index: Annotated[
        str | None,
        typer.Option(
            "--index",
            help=INDEX_HELP,
        ),
    ] = None,
    captions: Annotated[
        Path | None,
        typer.Option("--captions", help="JSONL of {image, captions} (default: PATH/captions.jsonl)"),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            min=1,
            max=4096,
            help="Images per forward pass (default: from the device: 32 on a CPU)",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            max=64,
            help="Parallel workers: decoders locally (default: from the cores and the measured rates), "
            "encoder actors on Ray (default 2)",
        ),
    ] = None,
    device: Device = "auto",
    precision: Precision = None,
    engine: Annotated[
        str,
        typer.Option("--engine", help="local (this process, default) or ray (a pool of encoder actors)"),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="With --engine ray: auto (this machine's cluster) or HOST:PORT "
            "(default: a private local cluster)",
        ),
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option("--memory-budget", help="Memory the index may hold, for --index auto (e.g. 512M, 8G)"),
    ] = None,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Replace an index built with another model")
    ] = False,
    patches: Annotated[
        bool,
        typer.Option(
            "--patches",
            help="Store patch features (CLIP; about 25 KB per image for ViT-B/32) for every image, those "
            "indexed before included. New images get them anyway unless CLEARSIGHT_PATCH_FEATURES=off",
        ),
    ] = False,
    hnsw_m: Annotated[
        int | None, typer.Option("--hnsw-m", min=2, max=256, help="HNSW links per node (with --index hnsw)")
    ] = None,
    ef_construction: Annotated[
        int | None, typer.Option("--ef-construction", min=1, max=4096, help="HNSW build beam (default 128)")
    ] = None,
    ef_search: Annotated[
        int | None,
        typer.Option(
            "--ef-search", min=1, max=4096, help="HNSW search beam recorded for searches (default 128)"
        ),
    ] = None,
    nprobe: Annotated[
        int | None,
        typer.Option(
            "--nprobe", min=1, max=65536, help="IVF lists visited per search, recorded (default 32)"
        ),
    ] = None,
    nlist: Annotated[
        int | None, typer.Option("--nlist", min=1, max=1 << 20, help="IVF lists (with --index ivf)")
    ] = None,
    caption: Annotated[
        bool,
        typer.Option(
            "--caption",
            help="Then caption the collection with BLIP, as `clearsight caption` does (right after encoding)",
        ),
    ] = False,
    exclude: Exclude = None,
    no_excludes: NoExcludes = False,
    hidden: Hidden = None,
    quiet: Quiet = False,
    json_out: JsonOut = False,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Then keep watching PATH and index what is added, changed or removed"),
    ] = False,
) -> None:
    """Index (or update the index of) every image under PATH."""
    if watch and engine != "local":
        raise ConfigError("--watch runs with the local engine only")
    summary, report, ddir = index_folder(
        path,
        data_dir,
        model,
        index=index,
        captions=captions,
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        rebuild=rebuild,
        patches=patches,
        progress=not quiet,
        knobs=IndexKnobs(hnsw_m, ef_construction, ef_search, nprobe, nlist),
        engine=engine,
        ray_address=ray_address,
        memory_budget=memory_budget,
        exclude=excludes_given(exclude, no_excludes),
        include_hidden=hidden,
    )
    print_summary(summary, report, ddir, json_out)
    if caption:  # after the encode pass, not inside it: ingest stays one thing (see README, captions)
        from explainer.cli.caption import caption_now

        caption_now(ddir, device=None if device == "auto" else device, quiet=quiet, err=json_out)
    if watch:
        watch_folder(path, ddir, batch_size, workers, device, precision, json_out)


def watch_folder(
    path: Path,
    ddir: Path,
    batch_size: int | None,
    workers: int | None,
    device: str,
    precision: str | None,
    json_out: bool,
) -> None:
    """Follow PATH and index each batch of changes, until interrupted (Ctrl-C)."""
    from retrieval.watch import FolderWatcher, reindex_folders

    with Collection(ddir) as collection:
        model = collection.store.read_manifest().model_id
    encoder = create_encoder(
        EncoderConfig(model=model, device=device, precision=precision_or_setting(precision))
    )
    from explainer.settings import get_settings

    config = IngestConfig(
        batch_size=batch_size,
        workers=workers,
        progress=False,
        patch_features=get_settings().patch_features != "off",
    )

    def reindex(roots: list[Path]) -> None:
        for summary in reindex_folders(ddir, encoder, roots, config, log=note):
            print_summary(summary, None, ddir, json_out)

    note(f"clearsight: watching {path} for changes (Ctrl-C stops)")
    try:
        FolderWatcher([path], reindex).run()
    finally:
        encoder.close()


def print_summary(summary: IngestSummary, report: StoreReport | None, ddir: Path, json_out: bool) -> None:
    """The index run's outcome: one JSON object, or a few lines for a person."""
    stored: dict[str, Any] | None = None
    if report is not None:
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
        f"{s.resumed} pending from an earlier run; {s.deleted} removed"
    )
    again = f" (with {s.reembedded} indexed before for another model)" if s.reembedded else ""
    typer.echo(
        f"to do {s.todo}{again}: {s.encoded} encoded ({s.rate:.1f} img/s), {s.reused} identical reused, "
        f"{s.failed_now} failed, {s.left_pending} left pending for the next run"
    )
    if s.failed:
        typer.echo(f"failed files under {display_path(s.root)}: {s.failed} (this run's and earlier ones)")
    for reason, n in sorted(s.failures.items()):
        typer.echo(f"  failed: {n} x {reason}")
    _print_skips(s)
    odd = "1 file name is" if len(s.odd_names) == 1 else f"{len(s.odd_names)} file names are"
    _list_some(f"{odd} not UTF-8 (indexed all the same; shown escaped):", s.odd_names)
    bad = "1 line" if len(s.caption_errors) == 1 else f"{len(s.caption_errors)} lines"
    _list_some(f"captions: {bad} skipped, the photos indexed all the same:", s.caption_errors)
    if s.index:
        typer.echo(
            f"index: {s.index.images} images, {s.index.captions} captions ({s.index.built_factory}) in {ddir}"
        )
    if stored is not None:
        typer.echo(
            f"patch features: {stored['written']} stored ({stored['bytes_per_image']} bytes/image), "
            f"{stored['already_stored']} already stored, {stored['failed']} failed"
        )


def _print_skips(s: IngestSummary) -> None:
    """What the walk left out, by reason (hidden, thumbnails, excluded, unsupported...)."""

    def by_reason(counts: dict[str, int]) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))

    if s.skipped:
        typer.echo(f"skipped {sum(s.skipped.values())} files: {by_reason(s.skipped)}")
    if s.unsupported_types:
        kinds_ = ", ".join(f"{suffix} {n}" for suffix, n in list(s.unsupported_types.items())[:8])
        more = " ..." if len(s.unsupported_types) > 8 else ""
        typer.echo(f"  unsupported formats: {kinds_}{more}")
    if s.skipped_folders:
        typer.echo(
            f"skipped {sum(s.skipped_folders.values())} folders (not walked): {by_reason(s.skipped_folders)}"
        )
    if s.exclude:
        typer.echo(f"  excluding: {' '.join(s.exclude)} (saved; --no-excludes forgets them)")


def _list_some(title: str, items: list[str], most: int = 10) -> None:
    """A titled list of at most `most` items, saying how many more there are (--json has them all)."""
    if not items:
        return
    typer.echo(title)
    for item in items[:most]:
        typer.echo(f"  {item}")
    if len(items) > most:
        typer.echo(f"  ... and {len(items) - most} more (--json lists them all)")
