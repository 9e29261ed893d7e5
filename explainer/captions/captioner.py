"""Captions written by an image-to-text model (BLIP), cached in the catalog by image content.

Captioning is the slowest stage of the product on a CPU (seconds per image), so captions are
precomputed (`clearsight caption`) and cached by content hash and by everything that shapes the
text (weights, generation settings, prefix): an image is captioned once whatever its path, and a
run killed midway loses at most one batch. Generated captions are also stored as the image's
captions (source `generated:<model>`), which is how they join image→text search after a sync.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from PIL import Image
from tqdm import tqdm

from retrieval import hub
from retrieval.catalog import ImageRecord
from retrieval.collection import Collection
from retrieval.encoders import base as encoder_base
from retrieval.encoders.base import PRECISIONS, default_dtype, select_device, torch_dtype
from retrieval.errors import BadImage, ClearsightError, ConfigError, ModelUnavailable
from retrieval.imageio import content_hash, decode, read_bytes
from retrieval.registry import CaptionerSpec, default_captioner, find_captioner
from retrieval.registry import list_captioners as list_captioners  # re-exported for callers
from retrieval.status import GENERATED_PREFIX

if TYPE_CHECKING:
    from explainer.settings import Settings

T = TypeVar("T")
U = TypeVar("U")
_END: Any = object()

SOURCE_PREFIX = GENERATED_PREFIX  # "generated:<model>"
CHANGED = "changed since indexing (run `clearsight index` again)"


#: What a captioner's `precision` takes: the encoders' choices, plus int8 (dynamic quantisation of BLIP's
#: linear layers, on the CPU only).
CAPTION_PRECISIONS = (*PRECISIONS, "int8")
#: What `auto` picks on a CPU without native bf16: the fastest precision that agrees with fp32 there.
#: BLIP-base, batch 8, 20 tokens on this project's 2-core CPU: int8 1.94 img/s against fp32 1.11
#: (bench/caption_bench.py); on the trained scene captioner 43.5% of int8's captions were true against
#: fp32's 42.0% (tests/explainer/captions/test_precision.py checks within 3 points).
AUTO_PLAIN_CPU = "int8"
#: Narrower models stay fp32 there: quantising each call's activations costs more than it saves on small
#: matrices (the 32-wide test BLIP ran int8 at 0.26x fp32's speed).
INT8_MIN_WIDTH = 512


def caption_precision(device: str, precision: str | None = None, width: int | None = None) -> str:
    """The precision a captioner runs in: an explicit choice, or `auto`, the fastest that agrees with fp32.

    auto: fp16 on accelerators, bf16 on a CPU with native bf16, else AUTO_PLAIN_CPU for models at least
    INT8_MIN_WIDTH wide (`width`: the text decoder's hidden size; None: assume a real-sized model) and fp32
    for narrower ones.
    """
    value = (precision or "auto").strip().lower()
    if value not in CAPTION_PRECISIONS:
        raise ConfigError(f"unknown caption precision {value!r}: use {', '.join(CAPTION_PRECISIONS)}")
    if value == "int8":
        if device != "cpu":
            raise ConfigError("int8 captions run on the CPU only (dynamic quantisation); use fp16 on a GPU")
        return value
    if value == "auto" and device == "cpu" and not encoder_base.cpu_has_native_bf16():
        return AUTO_PLAIN_CPU if width is None or width >= INT8_MIN_WIDTH else "fp32"
    return default_dtype(device, value)


#: Batch on a CPU: a bigger batch hardly speeds BLIP up there, and it delays a page's first caption.
CPU_BATCH = 8


def auto_batch_size(device: str, memory_bytes: int | None = None) -> int:
    """Images per generate call for a device: 8 on a CPU; on a GPU a power of two grown with its memory.

    Measured on an H200 (BLIP-base fp16, 20 tokens): 26.8 img/s at batch 8, 74.2 at 32, 96.9 at 64, so a
    fixed 8 wastes a big GPU; a GiB of memory per two images keeps far from running out. `memory_bytes`:
    the device's total memory (read from torch when None).
    """
    if not device.startswith("cuda"):
        return CPU_BATCH
    if memory_bytes is None:
        import torch

        memory_bytes = int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    images = memory_bytes // (2 * 1024**3)
    size = CPU_BATCH
    while size * 2 <= min(images, 128):
        size *= 2
    return size


def prefetch(items: Iterable[T], prepare: Callable[[T], U]) -> Iterator[U]:
    """`prepare(item)` for each item, in order, with the next one prepared on a helper thread meanwhile.

    The model then generates while the next batch is decoded and preprocessed, instead of after it; an
    error in `prepare` is raised where that item would have been yielded.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="caption-prepare") as pool:
        it = iter(items)
        ahead: Future[U] | None = None
        first = next(it, _END)
        if first is not _END:
            ahead = pool.submit(prepare, first)
        while ahead is not None:
            current = ahead
            nxt = next(it, _END)
            ahead = pool.submit(prepare, nxt) if nxt is not _END else None
            yield current.result()


# -- configuration --
@dataclass(frozen=True)
class GenerationSettings:
    """Decoding knobs, kept as data so that they can key the cache and come from settings, not code."""

    num_beams: int = 1
    max_new_tokens: int = 30
    min_new_tokens: int = 5
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ConfigError(f"caption num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"caption max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(
                f"caption min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens}"
            )
        if self.repetition_penalty <= 0:
            raise ConfigError(f"caption repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def from_settings(cls, settings: Settings) -> GenerationSettings:
        return cls(
            num_beams=settings.caption_num_beams,
            max_new_tokens=settings.caption_max_new_tokens,
            min_new_tokens=settings.caption_min_new_tokens,
            repetition_penalty=settings.caption_repetition_penalty,
        )

    def key(self) -> str:
        """A readable tag of these settings; part of the cache key, since they change the text."""
        return (
            f"beams={self.num_beams},max={self.max_new_tokens},min={self.min_new_tokens},"
            f"rep={self.repetition_penalty:g}"
        )

    def generate_kwargs(self) -> dict[str, Any]:
        return {
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "do_sample": False,  # deterministic: a cached caption must be the one a rerun would write
        }


@dataclass(frozen=True)
class CaptionerConfig:
    """How to build a captioner: which model, where to run it, how to decode."""

    model: str | None = None  # registry name, hub id or local directory; None: the registry's default
    device: str | None = None  # None/"auto": CUDA, then MPS, then CPU (like the encoders)
    # None/"auto": fp16 on CUDA and MPS; bf16 on a CPU that computes bf16 natively (avx512_bf16 or AMX);
    # on other CPUs int8 for captioners 512 wide or more, fp32 for narrower ones (see `caption_precision`)
    precision: str | None = None
    batch_size: int | Literal["auto"] = "auto"  # images per forward pass; auto: from the device
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self) -> None:
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"caption batch size must be >= 1 or auto, got {self.batch_size!r}")

    def resolved_batch_size(self) -> int:
        """The batch size, `auto` sized from the device this config runs on."""
        if isinstance(self.batch_size, int):
            return self.batch_size
        return auto_batch_size(select_device(self.device))

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> CaptionerConfig:
        """Settings fill every field an override (a CLI option, a notebook argument) leaves as None."""
        values: dict[str, Any] = {
            "model": settings.caption_model,
            "device": settings.device,
            "precision": settings.precision,
            "batch_size": settings.caption_batch_size,
            "generation": GenerationSettings.from_settings(settings),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class CaptionInterrupted(Exception):
    """Background captioning gave way to a request; the batch's images stay to be captioned later."""


class _Interrupt:
    """A generation stopping criterion that ends every sequence once `interrupt()` turns true, so a
    background batch frees the cores for a query within about one decoding step (not a whole batch)."""

    def __init__(self, interrupt: Callable[[], bool]) -> None:
        self.interrupt = interrupt
        self.fired = False

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.fired = self.fired or bool(self.interrupt())
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


# -- the interface --
@runtime_checkable
class Captioner(Protocol):
    """Writes one caption per image. Deterministic for given weights and settings (the cache relies on it).

    `name` labels the captions it writes (`generated:<name>`); `fingerprint` changes whenever the
    text it would write for an image could change (other weights or generation settings).
    """

    name: str
    fingerprint: str

    def caption(
        self,
        images: Sequence[Image.Image],
        prefix: str | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> list[str]:
        """Captions in order. When `interrupt` is given and turns true mid-way, the work in progress is
        abandoned within about one decoding step and `CaptionInterrupted` is raised."""
        ...

    def close(self) -> None: ...


def cache_key(captioner: Captioner, prefix: str | None = None) -> str:
    """The catalog cache's model column: a prefix changes the text, so it is part of the key."""
    prefix = normalise_prefix(prefix)
    return f"{captioner.fingerprint}|prefix={prefix}" if prefix else captioner.fingerprint


def normalise_prefix(prefix: str | None) -> str | None:
    text = " ".join((prefix or "").split())
    return text or None


def source_label(captioner: Captioner) -> str:
    return f"{SOURCE_PREFIX}{captioner.name}"


# -- BLIP on transformers --
class BlipCaptioner:
    """BLIP (`BlipForConditionalGeneration`) through transformers; any hub id or local directory."""

    def __init__(self, config: CaptionerConfig, spec: CaptionerSpec | None = None) -> None:
        from transformers import AutoConfig, BlipForConditionalGeneration, BlipProcessor

        name = config.model or default_captioner().name  # create_captioner always fills it
        self.device = select_device(config.device)  # a bad --device fails before weights load
        src = hub.resolve(
            name,
            spec.hub_id if spec else None,
            spec.revision if spec else None,
            known=[c.name for c in list_captioners()],
            what="captioner",
        )
        # The config first: loading BLIP weights into a checkpoint of another family would "succeed"
        # with random weights, and the captions would be nonsense rather than an error.
        model_cfg = hub.load(src, AutoConfig.from_pretrained, "captioner")
        family = str(getattr(model_cfg, "model_type", ""))
        if family != "blip":
            raise ModelUnavailable(f"{name!r} is a {family or 'unknown'} model; a BLIP captioner is needed")
        width = getattr(getattr(model_cfg, "text_config", None), "hidden_size", None)
        self.precision = caption_precision(
            self.device, config.precision, width if isinstance(width, int) else None
        )
        model: Any = hub.load(src, BlipForConditionalGeneration.from_pretrained, "captioner")
        self.processor: Any = hub.load(src, BlipProcessor.from_pretrained, "captioner's processor")
        self._dtype = torch_dtype("fp32" if self.precision == "int8" else self.precision)
        self.model: Any = model.to(device=self.device, dtype=self._dtype).eval()
        if self.precision == "int8":
            self.model = quantize_linear(self.model)
        self.generation = config.generation
        self.batch_size = config.resolved_batch_size()
        self.name = Path(src.target).name if src.is_local else (spec.name if spec else src.target)
        self.fingerprint = f"{hub.weights_fingerprint(src, model_cfg)}|{self.generation.key()}"
        self._lock = threading.Lock()  # one generation at a time on a shared model

    def caption(
        self,
        images: Sequence[Image.Image],
        prefix: str | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> list[str]:
        prefix = normalise_prefix(prefix)
        batches = [images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size)]
        out: list[str] = []
        for inputs in prefetch(batches, lambda batch: self._inputs(batch, prefix)):
            out.extend(self._generate(inputs, interrupt))
        return out

    def warm_up(self) -> None:
        """Run one short generation on a blank image, so the first real caption does not pay for the
        kernels' first-call set-up (bf16 matmuls on a CPU take seconds to prepare the first time)."""
        blank = Image.new("RGB", (32, 32), (128, 128, 128))
        kwargs = self._inputs([blank], None)
        import torch

        with self._lock, torch.inference_mode():
            if self.model is None:
                raise ModelUnavailable("this captioner was closed; create a new one")
            self.model.generate(**kwargs, max_new_tokens=2, min_new_tokens=0, num_beams=1)

    def _inputs(self, images: Sequence[Image.Image], prefix: str | None) -> dict[str, Any]:
        """The model's inputs for one batch, on its device (prepared while the previous batch generates)."""
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        # One prefix for the whole batch: equal-length prompts need no padding, which BLIP's
        # generate (it drops the last prompt token, assuming [SEP]) would mishandle.
        text = [prefix] * len(rgb) if prefix else None
        inputs = self.processor(images=rgb, text=text, return_tensors="pt")
        kwargs: dict[str, Any] = {"pixel_values": inputs["pixel_values"].to(self.device, self._dtype)}
        if prefix:
            kwargs["input_ids"] = inputs["input_ids"].to(self.device)
            kwargs["attention_mask"] = inputs["attention_mask"].to(self.device)
        return kwargs

    def _generate(self, kwargs: dict[str, Any], interrupt: Callable[[], bool] | None = None) -> list[str]:
        import torch

        extra: dict[str, Any] = {}
        stop = None
        if interrupt is not None:
            if interrupt():
                raise CaptionInterrupted("asked to yield before the batch started")
            from transformers import StoppingCriteriaList

            stop = _Interrupt(interrupt)
            extra["stopping_criteria"] = StoppingCriteriaList([stop])
        with self._lock, torch.inference_mode():
            if self.model is None:
                raise ModelUnavailable("this captioner was closed; create a new one")
            ids = self.model.generate(**kwargs, **self.generation.generate_kwargs(), **extra)
        if stop is not None and stop.fired:
            raise CaptionInterrupted("asked to yield mid-batch: its captions were not finished")
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(str(t).split()) for t in texts]

    def close(self) -> None:
        """Release the weights now rather than whenever the garbage collector gets to them."""
        import torch

        self.model = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def quantize_linear(model: Any) -> Any:
    """BLIP with its linear layers in int8 (weights now, activations per call): fewer bytes to move per token.

    Dynamic quantisation scales activations per tensor, so a caption may depend on the other images of
    its batch; the agreement tests measure what that costs in true captions.
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        # torch 2.13 (pinned) marks torch.ao quantisation deprecated in favour of torchao, a package this
        # project does not need otherwise; the warning would print on every captioner load.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated", category=UserWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


# -- factory --
def create_captioner(config: CaptionerConfig | str | None = None) -> Captioner:
    """Build the captioner a config names. Raises ModelUnavailable with a how-to when weights are missing."""
    if config is None or isinstance(config, str):
        config = CaptionerConfig(model=config)
    name = config.model or default_captioner().name
    spec = find_captioner(name)
    family = spec.family if spec else "blip"  # a local directory or unknown hub id: BLIP checks itself
    if family != "blip":
        raise ConfigError(f"no captioner backend for family {family!r}; known: blip")
    return BlipCaptioner(replace(config, model=name), spec)


# -- captioning through the catalog cache --
@dataclass
class CaptionReport:
    """What a captioning run did, counted in distinct contents (identical files are captioned once)."""

    images: int = 0  # image records considered
    contents: int = 0  # distinct content hashes among them
    captioned: int = 0  # contents the model captioned in this run
    cached: int = 0  # contents whose caption came from the cache
    failed: int = 0
    remaining: int = 0  # contents left uncaptioned by a limit
    seconds: float = 0.0  # time spent captioning (decode + model)
    failures: dict[str, int] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)  # content hash -> caption

    @property
    def rate(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "captions"}
        out["rate"] = round(self.rate, 3)
        out["seconds"] = round(self.seconds, 3)
        return out


class CaptionService:
    """Captions images through the catalog's cache and stores them as the images' captions."""

    def __init__(
        self,
        collection: Collection,
        captioner: Captioner,
        batch_size: int = 8,
        prefix: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"caption batch size must be >= 1, got {batch_size}")
        self.collection = collection
        self.captioner = captioner
        self.batch_size = batch_size
        self.prefix = normalise_prefix(prefix)
        self.key = cache_key(captioner, self.prefix)
        self.source = source_label(captioner)

    def caption_records(
        self,
        records: Iterable[ImageRecord],
        progress: bool = False,
        limit: int | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> CaptionReport:
        """Caption every content among `records` not yet cached; `limit` caps the model's work.

        Each batch commits before the next starts, so a killed run is resumed by running again; an
        `interrupt` that turns true raises `CaptionInterrupted` with the batches before it committed.
        """
        catalog = self.collection.catalog
        by_hash: dict[str, list[ImageRecord]] = {}
        report = CaptionReport()
        for rec in records:
            if rec.content_hash:
                by_hash.setdefault(rec.content_hash, []).append(rec)
                report.images += 1
        report.contents = len(by_hash)
        cached = catalog.get_generated_captions(list(by_hash), self.key)
        report.cached = len(cached)
        report.captions.update(cached)
        # Re-attach cached captions too: a run killed between caching and attaching heals here.
        self._attach({h: by_hash[h] for h in cached}, cached)

        todo = [h for h in by_hash if h not in cached]
        if limit is not None:
            todo, report.remaining = todo[: max(limit, 0)], max(len(todo) - max(limit, 0), 0)
        bar = tqdm(total=len(todo), desc="captioning", unit="img", disable=not progress or not todo)
        start = time.perf_counter()
        try:
            chunks = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
            for chunk, loaded in zip(chunks, prefetch(chunks, lambda c: _load_all(c, by_hash)), strict=True):
                images: dict[str, Image.Image] = {}
                for h, got in loaded.items():
                    if isinstance(got, BadImage):
                        _count(report, got.reason)
                    else:
                        images[h] = got
                new = self._caption_batch(images, report, interrupt)
                catalog.put_generated_captions(self.key, new)
                self._attach({h: by_hash[h] for h in new}, new)
                report.captioned += len(new)
                report.captions.update(new)
                bar.update(len(chunk))
        finally:
            bar.close()
            report.seconds = time.perf_counter() - start
        return report

    def caption_collection(self, progress: bool = False, limit: int | None = None) -> CaptionReport:
        return self.caption_records(self.collection.catalog.iter_images("indexed"), progress, limit)

    def _caption_batch(
        self,
        images: dict[str, Image.Image],
        report: CaptionReport,
        interrupt: Callable[[], bool] | None = None,
    ) -> dict[str, str]:
        """One forward pass; if it fails, image by image, so one bad image costs only its own caption."""
        hashes = list(images)
        if len(hashes) > 1:
            try:
                captions = self._run([images[h] for h in hashes], interrupt)
                return dict(zip(hashes, captions, strict=True))
            except (ClearsightError, CaptionInterrupted):
                raise  # ours, e.g. a closed model: not a property of these images
            except Exception:
                pass  # find the culprit below
        out: dict[str, str] = {}
        for h in hashes:
            try:
                out[h] = self._run([images[h]], interrupt)[0]
            except (ClearsightError, CaptionInterrupted):
                raise
            except Exception as exc:  # recorded, not raised: the rest of the collection still gets captions
                _count(report, f"captioning failed: {type(exc).__name__}")
        return out

    def _run(self, images: list[Image.Image], interrupt: Callable[[], bool] | None) -> list[str]:
        # `interrupt` only when there is one: a captioner written before it existed still works
        if interrupt is None:
            return self.captioner.caption(images, self.prefix)
        return self.captioner.caption(images, self.prefix, interrupt=interrupt)

    def _attach(self, groups: dict[str, list[ImageRecord]], captions: dict[str, str]) -> None:
        ids = [r.id for recs in groups.values() for r in recs]
        existing = self.collection.catalog.captions_for(ids)
        for h, recs in groups.items():
            for rec in recs:
                have = [c.text for c in existing.get(rec.id, []) if c.source == self.source]
                if have != [captions[h]]:
                    self.collection.catalog.set_captions(rec.id, self.source, [captions[h]])


def _load(records: list[ImageRecord], expected_hash: str) -> Image.Image:
    """The first copy of a content that still decodes to that content; files may have moved or changed."""
    error = BadImage(CHANGED)
    for rec in records:
        try:
            data = read_bytes(Path(rec.path))
        except BadImage as exc:
            error = exc
            continue
        if content_hash(data) != expected_hash:
            continue
        return decode(data).image
    raise error


def _load_all(
    hashes: Sequence[str], by_hash: dict[str, list[ImageRecord]]
) -> dict[str, Image.Image | BadImage]:
    """Decode a batch (on the prefetch thread); an image that cannot be read is returned as its error."""
    out: dict[str, Image.Image | BadImage] = {}
    for h in hashes:
        try:
            out[h] = _load(by_hash[h], h)
        except BadImage as exc:
            out[h] = exc
    return out


def _count(report: CaptionReport, reason: str) -> None:
    report.failed += 1
    report.failures[reason] = report.failures.get(reason, 0) + 1
