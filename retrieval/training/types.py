"""The training package's shared types: run configurations and the evaluation report.

They sit apart from the modules that use them so that evaluation, reporting, fine-tuning and the
optimiser each import these and never one another back (not even for type checking).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from retrieval.errors import ConfigError
from retrieval.training.datasets import LoadReport, format_report
from retrieval.training.metrics import DEFAULT_KS, RetrievalMetrics, parse_ks
from retrieval.types import Int64Array

FREEZE_MODES = ("none", "vision", "text", "all-but-projections", "last-n")


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 10
    lr: float = 1e-5  # peak learning rate; 1e-5 suits pretrained CLIP, from scratch wants ~1e-3
    batch_size: int = 64
    weight_decay: float = 0.1
    warmup: float = 0.1  # below 1: a fraction of all optimiser steps; from 1: a number of steps
    grad_clip: float = 1.0
    freeze: str = "none"  # one of FREEZE_MODES
    last_n: int = 2  # layers per tower trained with freeze="last-n"
    patience: int = 3  # epochs without improvement before stopping
    grad_accum: int = 1  # micro-batches per optimiser step (CUDA only)
    #: Autocast while training: auto (fp16 on CUDA, bf16 on a CPU with native bf16), fp16 (CUDA only),
    #: bf16 or off. Validation and the saved weights stay fp32.
    amp: str = "auto"
    device: str | None = None
    seed: int = 0
    force: bool = False  # write the model even when it is worse than the start
    eval_batch_size: int = 64
    workers: int = 2  # decode threads
    preload_mb: int = 2048  # keep preprocessed training, then validation, images in memory up to this size
    #: torch CPU threads while training (None: torch's default). On a busy machine one thread can be
    #: several times faster than two that keep preempting each other.
    threads: int | None = None
    progress: bool = True
    #: Embedding cache for the starting model's validation (an eval cache folder; None: none). Only the
    #: start is cached: its weights are fixed, while every later epoch evaluates changed weights.
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.freeze not in FREEZE_MODES:
            raise ConfigError(f"unknown freeze mode {self.freeze!r}; use one of {', '.join(FREEZE_MODES)}")
        if self.amp not in ("auto", "fp16", "bf16", "off"):
            raise ConfigError(f"unknown amp {self.amp!r}; use auto, fp16, bf16 or off")
        for name in (
            "epochs",
            "batch_size",
            "last_n",
            "patience",
            "grad_accum",
            "eval_batch_size",
            "workers",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be at least 2: contrastive loss needs in-batch negatives")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup < 0 or not self.grad_clip > 0:
            raise ConfigError("lr and grad_clip must be positive; weight_decay and warmup non-negative")


@dataclass(frozen=True)
class EvalConfig:
    index: str = "flat"  # flat (exact), hnsw, ivfpq, or a FAISS factory string
    batch_size: int = 32  # images per encoder call
    text_batch_size: int = 256
    workers: int = 2  # decode threads
    cache_dir: Path | None = None  # None: no embedding cache (fine-tuning evaluates a moving model)
    out_dir: Path | None = None  # None: nothing written; else report.json, report.md, ranks, plots
    approx_k: int = 100  # depth of approximate searches
    search_chunk: int = 2048  # queries per FAISS call, bounding the temporary result arrays
    progress: bool = True
    ks: tuple[int, ...] = DEFAULT_KS  # cutoffs of recall, precision and nDCG (`--k 1,5,10`)
    bootstrap: int = 1000  # resamples for the recall@K confidence intervals; 0 computes none
    gallery: int = 24  # worst text→image queries kept for the failure gallery

    def __post_init__(self) -> None:
        for name in ("batch_size", "text_batch_size", "workers", "approx_k", "search_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        object.__setattr__(self, "ks", parse_ks(self.ks))
        if not 0 <= self.bootstrap <= 100_000:
            raise ConfigError(f"bootstrap resamples must be between 0 and 100000, got {self.bootstrap}")
        if not 0 <= self.gallery <= 1000:
            raise ConfigError(f"the failure gallery holds 0 to 1000 queries, got {self.gallery}")


@dataclass(frozen=True)
class CacheStats:
    path: str | None
    image_hits: int
    images_encoded: int
    text_hits: int
    texts_encoded: int


@dataclass(frozen=True)
class IndexInfo:
    requested: str
    factory: str  # what was built and searched
    exact: bool
    note: str


@dataclass(frozen=True)
class WorstQuery:
    """A text→image query that ranked its image badly: what came first instead, for the failure gallery."""

    caption: str
    image: int  # index into EvalReport.image_ids / image_paths: the right image
    rank: int
    top: list[tuple[int, float]]  # (image index, score), best first


@dataclass
class EvalReport:
    """Metrics plus everything needed to trace them back to data, model and index."""

    metrics: RetrievalMetrics
    model: dict[str, object]
    index: IndexInfo
    dataset_format: str
    split: str | None
    load_report: LoadReport
    n_unreadable: int
    cache: CacheStats
    seconds: dict[str, float]
    image_ids: list[str] = field(repr=False)
    captions: list[str] = field(repr=False)
    caption_to_image: Int64Array = field(repr=False)
    unreadable: list[tuple[str, str]] = field(default_factory=list, repr=False)
    files: dict[str, str] = field(default_factory=dict)
    image_paths: list[str] = field(default_factory=list, repr=False)
    worst: list[WorstQuery] = field(default_factory=list, repr=False)
    #: Where the numbers come from: clearsight version, time, annotation file and its sha256.
    provenance: dict[str, object] = field(default_factory=dict)
    #: direction -> "recall@K" -> (low, high), percentile bootstrap over queries
    intervals: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        return {
            "images": len(self.image_ids),
            "captions": len(self.captions),
            "images_missing": self.load_report.missing_images.count,
            "images_unreadable": self.n_unreadable,
        }

    def to_dict(self) -> dict[str, object]:
        """The JSON report; `counts` sits in each direction too, so either object stands on its own."""
        counts = self.counts
        return {
            "text_to_image": {**self.metrics.text_to_image.to_dict(), "counts": counts},
            "image_to_text": {**self.metrics.image_to_text.to_dict(), "counts": counts},
            "counts": counts,
            "rsum": self.metrics.rsum,
            "mean_recall": self.metrics.mean_recall,
            "model": self.model,
            "index": asdict(self.index),
            "dataset": {"format": self.dataset_format, "split": self.split},
            "load_report": {**asdict(self.load_report), "summary": format_report(self.load_report)},
            "unreadable_examples": [f"{p}: {r}" for p, r in self.unreadable[:5]],
            "cache": asdict(self.cache),
            "seconds": self.seconds,
            "files": self.files,
            **self.provenance,
            "confidence_intervals": {
                **{d: {k: list(v) for k, v in ci.items()} for d, ci in self.intervals.items()},
                "method": "percentile bootstrap over queries, 95%",
            },
        }
