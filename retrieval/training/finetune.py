"""Contrastive fine-tuning of a CLIP model on captioned images, with a guard against shipping a worse model.

Careless CLIP fine-tuning is known to collapse (text→image R@1 falling to zero within an epoch at a
too-high learning rate, or a temperature that runs away). So the starting model is evaluated on the
validation split first, every epoch is evaluated with the same `evaluate` the product reports with, the
best epoch is kept, and a result that is worse than the start is refused unless forced.

The recipe is CLIP's own: symmetric InfoNCE with the model's learnable temperature (clamped at 100, as
in the paper), AdamW with linear warmup and cosine decay, no weight decay on gains, biases, 1-d
embeddings or the temperature, and gradient clipping. Each epoch shows every image once with one of its
captions drawn at random, so all captions are used without over-weighting images that have many.
Mixed precision and gradient accumulation are written the standard torch way: autocast on CUDA, and bf16
autocast on a CPU that computes bf16 natively (or when asked); accumulation on CUDA only, and it does not
enlarge the pool of in-batch negatives, only the optimiser batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from retrieval import imageio
from retrieval.encoders import EncoderConfig, create_encoder
from retrieval.errors import (
    BadImage,
    ConfigError,
    FinetuneRefused,
    NotEnoughData,
    ShapeError,
)
from retrieval.training.contrastive import Optimiser, apply_freeze
from retrieval.training.datasets import DatasetItem, LoadedDataset, load_splits_or_all
from retrieval.training.evaluate import PreparedImages, evaluate, prepare_images
from retrieval.training.metrics import RetrievalMetrics
from retrieval.training.types import EvalConfig, FinetuneConfig
from retrieval.types import Float32Array

HISTORY_FILE = "finetune_history.json"
PLOT_FILE = "finetune_curves.png"


#: An epoch whose mean contrastive loss is within this fraction of ln(batch), or above it, learned
#: nothing: ln(batch) is the loss of logits that do not tell the batch's pairs apart (a collapsed model,
#: or one still at chance), and more than that is worse than guessing.
COLLAPSE_TOLERANCE = 0.02


def is_collapsed(loss: float | None, batch_size: int, tolerance: float = COLLAPSE_TOLERANCE) -> bool:
    """Whether a mean InfoNCE loss sits at ln(batch) (or above), where every caption is as likely as any.

    Retrieval figures alone can miss it: from a chance-level start, a collapsed model's R@1 can beat the
    start's by luck (4 -> 5 of 795), while the loss says plainly that nothing was learned.
    """
    if loss is None or batch_size < 2:
        return False
    return loss >= (1.0 - tolerance) * math.log(batch_size)


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    loss: float | None  # None when no step of the epoch gave a finite loss
    lr: float
    val: dict[str, float]
    seconds: float
    improved: bool
    collapsed: bool = False  # mean loss at ln(batch): never chosen over an epoch that learned


@dataclass
class FinetuneResult:
    """What happened: start and best validation figures side by side, the history, and what was written."""

    start: dict[str, float]
    best: dict[str, float]
    best_epoch: int
    history: list[EpochRecord]
    step_losses: list[float]
    step_lrs: list[float]
    stopped_early: bool
    written: bool
    out_dir: str | None
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    best_collapsed: bool = False  # the best epoch's loss sat at ln(batch)
    chance_loss: float = 0.0  # ln(batch): the loss of a model that tells no pair apart

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["epochs"] = out.pop("history")
        return out


def summarise(metrics: RetrievalMetrics) -> dict[str, float]:
    """The validation figures fine-tuning decides on and shows."""
    out = {
        f"{name}_r{k}": getattr(direction, f"recall_at_{k}")
        for name, direction in (("t2i", metrics.text_to_image), ("i2t", metrics.image_to_text))
        for k in (1, 5, 10)
    }
    mean_rank = 0.5 * (metrics.text_to_image.mean_rank + metrics.image_to_text.mean_rank)
    return {**out, "rsum": metrics.rsum, "mean_rank": mean_rank}


def _key(summary: dict[str, float]) -> tuple[float, float]:
    """rsum decides (six recalls: one lucky R@1 cannot carry it), the mean rank of both directions breaks
    ties (lower is better: it moves even where every recall is still zero)."""
    return (round(summary["rsum"], 6), -round(summary.get("mean_rank", 0.0), 6))


def _better(summary: dict[str, float], collapsed: bool, best: dict[str, float], best_collapsed: bool) -> bool:
    """Whether an epoch beats the best so far: one that learned always beats one that collapsed."""
    if collapsed != best_collapsed:
        return best_collapsed
    return _key(summary) > _key(best)


def side_by_side(start: dict[str, float], tuned: dict[str, float]) -> str:
    """Start and fine-tuned validation figures in two columns (recalls in %), for people to compare."""
    rows = [f"{'validation':<18} {'start':>8} {'fine-tuned':>11}"]
    for k in start:
        scale = 1.0 if k in ("rsum", "mean_rank") else 100.0
        name = k.replace("_r", " R@").replace("t2i", "text→image").replace("i2t", "image→text")
        name = name.replace("mean R@ank", "mean rank")
        rows.append(f"{name:<18} {scale * start[k]:>8.1f} {scale * tuned[k]:>11.1f}")
    return "\n".join(rows)


# --------------------------------------------------------------------------- data


def load_training_data(
    fmt: str,
    annotations: Path,
    images: Path,
    train_split: str = "train",
    val_split: str = "val",
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[LoadedDataset, LoadedDataset]:
    """Train and validation sets; a dataset without split information gets a seeded hold-out instead."""
    loaded = load_splits_or_all(fmt, annotations, images, (train_split, val_split))
    if isinstance(loaded, list):
        train_set, val_set = loaded
        return train_set, val_set
    everything = loaded
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(everything.items))
    held = set(order[: max(1, round(val_fraction * len(order)))].tolist())
    train = [it for i, it in enumerate(everything.items) if i not in held]
    val = [it for i, it in enumerate(everything.items) if i in held]
    fmt, report = everything.format, everything.report
    return LoadedDataset(train, fmt, report, "train"), LoadedDataset(val, fmt, report, "val")


class _Pixels:
    """Preprocessed training images: all in memory when they fit the budget, else decoded per batch."""

    def __init__(self, items: list[DatasetItem], encoder: Any, config: FinetuneConfig) -> None:
        self.encoder = encoder
        self.workers = config.workers
        self.draft = max(int(encoder.info.image_size), 1)
        size = int(encoder.info.image_size)
        per_image = 3 * size * size * 4
        self.cache: Float32Array | None = None
        self.items, self.failed = items, 0
        if len(items) * per_image <= config.preload_mb * 2**20:
            arrays = self._decode(items, desc="loading images" if config.progress else None)
            good = [i for i, a in enumerate(arrays) if a is not None]
            self.failed = len(items) - len(good)
            self.items = [items[i] for i in good]
            self.cache = np.stack([a for a in arrays if a is not None]) if good else None

    def _one(self, item: DatasetItem) -> Float32Array | None:
        try:
            image = imageio.open_image(item.path, draft_size=self.draft).image
        except BadImage:
            return None
        return self.encoder.preprocess([image])[0]

    def _decode(self, items: list[DatasetItem], desc: str | None = None) -> list[Float32Array | None]:
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="train-decode") as pool:
            mapped = pool.map(self._one, items)
            return list(tqdm(mapped, total=len(items), desc=desc or "", disable=desc is None, unit="img"))

    def batch(self, index: np.ndarray) -> tuple[Float32Array, np.ndarray]:
        """Pixels of the decodable items among `index`, and which of them those are."""
        if self.cache is not None:
            return self.cache[index], index
        arrays = self._decode([self.items[int(i)] for i in index])
        keep = np.array([a is not None for a in arrays])
        return np.stack([a for a in arrays if a is not None]), index[keep]


# --------------------------------------------------------------------------- model surgery


# --------------------------------------------------------------------------- training


def _eval_config(config: FinetuneConfig) -> EvalConfig:
    return EvalConfig(batch_size=config.eval_batch_size, workers=config.workers, progress=False)


def _prepare_validation(
    encoder: Any, val: LoadedDataset, config: FinetuneConfig, budget_bytes: int
) -> PreparedImages | None:
    """The validation images decoded and preprocessed once, when they fit `budget_bytes`; else None and
    every validation reads them again. Only the model changes between epochs, not the preprocessing."""
    size = int(encoder.info.image_size)
    if len(val.items) * 3 * size * size * 4 > budget_bytes:
        return None
    return prepare_images(val, encoder, _eval_config(config))


def _validate(
    encoder: Any,
    val: LoadedDataset,
    config: FinetuneConfig,
    images: PreparedImages | None = None,
    cache_dir: str | None = None,
) -> dict[str, float] | None:
    """Validation figures, or None when the model has diverged (its embeddings hold NaN or infinity)."""
    model = encoder.model
    was_training = model.training
    model.eval()
    try:
        eval_config = replace(_eval_config(config), cache_dir=Path(cache_dir) if cache_dir else None)
        return summarise(evaluate(val, encoder, eval_config, images).metrics)
    except ShapeError:
        return None
    finally:
        model.train(was_training)


def finetune(
    model: str,
    train: LoadedDataset,
    val: LoadedDataset,
    out_dir: Path | str,
    config: FinetuneConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `model` (hub id, registry name or directory) and save the best epoch to `out_dir`.

    The best epoch is judged on rsum, then mean rank; an epoch whose loss sits at ln(batch) (collapse)
    never beats one that learned. Raises `FinetuneRefused` (carrying the result) when the best epoch
    collapsed or is worse on validation than the starting model and `config.force` is false; nothing is
    written then. `log` receives one line per epoch with its loss and validation figures.
    """
    import torch

    config = config or FinetuneConfig()
    previous = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _finetune(model, train, val, Path(out_dir), config, log)
    finally:
        torch.set_num_threads(previous)


def _finetune(
    model: str,
    train: LoadedDataset,
    val: LoadedDataset,
    out_dir: Path,
    config: FinetuneConfig,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    import torch

    _check_out_dir(out_dir)
    if len(train.items) < 2:
        raise NotEnoughData(f"fine-tuning needs at least 2 training images, got {len(train.items)}")
    if not val.items:
        raise NotEnoughData("fine-tuning needs a validation split with images", remedy="name_val_split")
    torch.manual_seed(config.seed)
    # Any: training needs the transformers model behind the encoder, which the Encoder protocol hides.
    encoder: Any = create_encoder(EncoderConfig(model=model, device=config.device, precision="fp32"))
    try:
        if encoder.info.family != "clip":
            raise ConfigError(f"fine-tuning supports CLIP models; {model!r} is a {encoder.info.family} model")
        result, best_state = _train(encoder, model, train, val, config, log)
        if best_state is None:
            raise FinetuneRefused(
                "no epoch produced a usable model (training diverged at once); nothing was written. "
                "Lower the learning rate. " + " ".join(result.notes),
                result,
                remedy=None,
            )
        if result.best_collapsed and not config.force:
            raise FinetuneRefused(
                "training collapsed: the contrastive loss stayed at or above ln(batch) = "
                f"{result.chance_loss:.3f}, the loss of a model that tells no image-caption pair apart, so "
                "nothing was written\n" + side_by_side(result.start, result.best) + "\n",
                result,
            )
        worse = _key(result.best) < _key(result.start)
        if worse and not config.force:
            raise FinetuneRefused(
                "the fine-tuned model is worse on validation than the starting model, so it was not written\n"
                + side_by_side(result.start, result.best)
                + "\n",
                result,
            )
        if worse or result.best_collapsed:
            what = "collapsed" if result.best_collapsed else "worse than the start"
            result.notes.append(f"written although {what} (force)")
        encoder.model.load_state_dict(best_state)
        _save(encoder, result, out_dir)
        return result
    finally:
        encoder.close()


def _train(
    encoder: Any,
    model: str,
    train: LoadedDataset,
    val: LoadedDataset,
    config: FinetuneConfig,
    log: Callable[[str], None] | None = None,
) -> tuple[FinetuneResult, dict[str, Any] | None]:
    """The epochs: train, validate, keep the best state, stop on patience or divergence."""
    import torch

    rng = np.random.default_rng(config.seed)
    net, device = encoder.model, encoder.device
    notes: list[str] = []
    if config.grad_accum > 1 and not device.startswith("cuda"):
        notes.append(f"gradient accumulation ({config.grad_accum}) is used on CUDA only; ignored on {device}")
    trainable = apply_freeze(net, config.freeze, config.last_n)
    pixels = _Pixels(train.items, encoder, config)
    if pixels.failed:
        notes.append(f"{pixels.failed} training images could not be decoded and were skipped")
    items = pixels.items
    batch_size = min(config.batch_size, len(items))
    batches = max(1, len(items) // batch_size)  # the short last batch is dropped
    opt = Optimiser(net, trainable, device, batches, config)
    # The memory budget is shared: what the training images left of it may hold the validation images.
    left = config.preload_mb * 2**20 - (pixels.cache.nbytes if pixels.cache is not None else 0)
    val_images = _prepare_validation(encoder, val, config, left)

    start = _validate(encoder, val, config, val_images, cache_dir=config.cache_dir)
    if start is None:
        raise ConfigError(
            f"the starting model {model!r} produces NaN or infinite embeddings; it cannot be tuned"
        )
    result = FinetuneResult(
        start=start,
        best=start,
        best_epoch=0,
        history=[],
        step_losses=[],
        step_lrs=[],
        stopped_early=False,
        written=False,
        out_dir=None,
        notes=notes,
        config={**asdict(config), "model": model, "train_images": len(items), "val_images": len(val.items)},
        chance_loss=math.log(batch_size),
    )
    if log:
        log(f"epoch 0 (start): {_epoch_line(start)}")
    best_state: dict[str, Any] | None = None
    stale = 0
    for epoch in range(1, config.epochs + 1):
        began = time.perf_counter()
        net.train()
        order = rng.permutation(len(items))
        bar = tqdm(range(batches), desc=f"epoch {epoch}/{config.epochs}", disable=not config.progress)
        losses: list[float] = []
        for b in bar:
            px, kept = pixels.batch(order[b * batch_size : (b + 1) * batch_size])
            if len(kept) < 2:
                continue
            captions = [items[int(i)].captions[int(rng.integers(len(items[int(i)].captions)))] for i in kept]
            tok = encoder.tokenize(captions)
            inputs = {"pixels": torch.from_numpy(px), **{k: tok[k] for k in ("input_ids", "attention_mask")}}
            value = opt.step(
                {k: v.to(device) for k, v in inputs.items()}, (b + 1) % opt.accum == 0 or b + 1 == batches
            )
            if not math.isfinite(value):
                notes.append(f"loss became {value} in epoch {epoch}; training stopped")
                result.stopped_early = True
                break
            losses.append(value)
            result.step_losses.append(value)
            result.step_lrs.append(opt.lr)
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{opt.lr:.2e}")
        bar.close()
        checked = None if result.stopped_early else _validate(encoder, val, config, val_images)
        if checked is None and not result.stopped_early:
            notes.append(
                f"the model diverged in epoch {epoch} (NaN or infinite embeddings); training stopped"
            )
            result.stopped_early = True
        mean_loss = float(np.mean(losses)) if losses else None
        collapsed = is_collapsed(mean_loss, batch_size)
        improved = checked is not None and (
            best_state is None or _better(checked, collapsed, result.best, result.best_collapsed)
        )
        if checked is not None and improved:
            result.best, result.best_epoch, result.best_collapsed, stale = checked, epoch, collapsed, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        else:
            stale += 1
        summary = checked or {k: 0.0 for k in start}
        seconds = time.perf_counter() - began
        result.history.append(EpochRecord(epoch, mean_loss, opt.lr, summary, seconds, improved, collapsed))
        if log:
            loss_text = "no finite loss" if mean_loss is None else f"loss {mean_loss:.3f}"
            flags = (" · best so far" if improved else "") + (
                f" · COLLAPSED (loss at or above ln(batch) = {result.chance_loss:.3f})" if collapsed else ""
            )
            log(f"epoch {epoch}/{config.epochs}: {loss_text}, {_epoch_line(summary)}{flags}")
        if result.stopped_early:
            break
        if stale >= config.patience:
            result.stopped_early = True
            notes.append(f"stopped after epoch {epoch}: no improvement for {config.patience} epochs")
            break
    return result, best_state


def _epoch_line(summary: dict[str, float]) -> str:
    """One epoch's validation in words, for the per-epoch progress line."""
    return (
        f"validation text→image R@1 {100 * summary['t2i_r1']:.1f}%, image→text R@1 "
        f"{100 * summary['i2t_r1']:.1f}%, rsum {summary['rsum']:.1f}, mean rank {summary['mean_rank']:.1f}"
    )


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to overwrite a folder this module did not write: it could be the user's only copy of a model."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / HISTORY_FILE).exists():
        raise ConfigError(
            f"{out_dir} exists and is not a previous fine-tuning output", remedy="other_out_dir"
        )


def _save(encoder: Any, result: FinetuneResult, out_dir: Path) -> None:
    """save_pretrained into a sibling temporary folder, then swap it in: a crash never leaves half a model."""
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        encoder.model.save_pretrained(str(tmp))
        encoder.processor.save_pretrained(str(tmp))
        result.written, result.out_dir = True, str(out_dir)
        (tmp / HISTORY_FILE).write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
        save_curves(result, tmp / PLOT_FILE)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        result.written, result.out_dir = False, None
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_curves(result: FinetuneResult, path: Path) -> Path:
    """Loss and learning rate per step beside validation R@1 per epoch (epoch 0 is the start).

    Both panels carry a legend; the loss panel marks ln(batch), the loss of a collapsed model, and the
    validation axis is scaled to the figures (R@1 of a few percent on a 0-100 axis reads as a flat line).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    steps = np.arange(1, len(result.step_losses) + 1)
    lines = left.plot(steps, result.step_losses, lw=0.8, label="loss (per step)")
    if result.chance_loss:
        lines.append(
            left.axhline(result.chance_loss, color="tab:red", ls="--", lw=0.8, label="ln(batch): collapse")
        )
    left.set(xlabel="step", ylabel="InfoNCE loss", title="training")
    twin = left.twinx()
    lines += twin.plot(steps, result.step_lrs, color="tab:orange", lw=0.8, label="learning rate")
    twin.set_ylabel("learning rate")
    left.legend(lines, [str(line.get_label()) for line in lines], fontsize=8, loc="upper right")
    epochs = [0] + [r.epoch for r in result.history]
    top = 0.0
    for key, label in (("t2i_r1", "text→image R@1"), ("i2t_r1", "image→text R@1")):
        values = [100 * result.start[key]] + [100 * r.val[key] for r in result.history]
        top = max(top, *values)
        right.plot(epochs, values, marker="o", label=label)
    right.axvline(result.best_epoch, color="grey", ls=":", label=f"best (epoch {result.best_epoch})")
    right.set(xlabel="epoch", ylabel="validation R@1 (%)", title="validation")
    right.set_ylim(0, min(100.0, max(1.0, top * 1.15)))
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
