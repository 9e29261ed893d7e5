"""Tiny BLIP captioners built from configs, and a recipe that teaches one to caption the synthetic scenes.

No captioner weights can be downloaded here, yet `clearsight caption`, cards and the captioning bench
must run for real. `make_blip` writes a randomly initialised BLIP (a word-level BERT tokenizer
included) with `save_pretrained`, so it loads through exactly the product's path; `train_blip` then
fits it to captioned images with BLIP's own language-model loss, which is how the offline demo gets
captions that describe its scenes instead of random words.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval import imageio
from retrieval.demo.tiny import DEFAULT_WORDS, set_grid_positions
from retrieval.errors import BadImage, ConfigError, NotEnoughData
from retrieval.training.datasets import DatasetItem

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEC, ENC = "[DEC]", "[ENC]"  # BLIP's decoder start token and its encoder twin, after the BERT vocabulary

#: "tiny" is for tests (wide random weights), "demo" is the size the demo trains (it has to learn colour,
#: shape and place), "base" has Salesforce/blip-image-captioning-base's shapes, for speed benchmarks.
BLIP_ARCHS = ("tiny", "demo", "base")

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"width": 32, "layers": 2, "heads": 2, "image_size": 32, "patch_size": 8, "init": 0.2},
    "demo": {"width": 64, "layers": 2, "heads": 2, "image_size": 24, "patch_size": 4, "init": 0.02},
}


def make_blip(out: Path | str, arch: str = "tiny", words: Iterable[str] | None = None, seed: int = 0) -> Path:
    """Build a randomly initialised BLIP captioner with a word-level BERT tokenizer, saved like a hub model.

    The vocabulary is [PAD] [UNK] [CLS] [SEP] [MASK], the words, filler tokens up to the
    architecture's size, then [DEC] [ENC]: the real model's layout, so the special ids play the
    same roles. The tiny model's weights are drawn wide (std 0.2) so that images visibly steer its
    captions; at the usual 0.02 every image gets the same text and batching bugs would hide. The
    demo model uses the usual 0.02, since it is trained.
    """
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()  # "Writing model shards" bars are noise in tests and benchmarks
    if arch not in BLIP_ARCHS:
        raise ConfigError(f"unknown BLIP architecture {arch!r}; known: {', '.join(BLIP_ARCHS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = SPECIAL + [
        w for w in dict.fromkeys([*(words or DEFAULT_WORDS), "photography"]) if w not in SPECIAL
    ]
    size = 30524 if arch == "base" else len(tokens) + 2
    tokens += [f"[unused{i}]" for i in range(size - 2 - len(tokens))] + [DEC, ENC]
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n")
    ids = {t: i for i, t in enumerate(tokens)}
    text: dict[str, Any] = {
        "vocab_size": len(tokens),
        "bos_token_id": ids[DEC],
        "sep_token_id": ids["[SEP]"],
        "eos_token_id": ids["[SEP]"],
        "pad_token_id": ids["[PAD]"],
    }
    vision: dict[str, Any] = {}
    top: dict[str, Any] = {}
    if arch in _SIZES:
        s = _SIZES[arch]
        small = {
            "hidden_size": s["width"],
            "intermediate_size": 2 * s["width"],
            "num_attention_heads": s["heads"],
            "num_hidden_layers": s["layers"],
        }
        text.update(small, encoder_hidden_size=s["width"], initializer_range=s["init"])
        if arch == "demo":  # captions are short: a 512-position table would only slow training
            text["max_position_embeddings"] = 64
        vision.update(
            small, image_size=s["image_size"], patch_size=s["patch_size"], initializer_range=s["init"]
        )
        top.update(projection_dim=s["width"], initializer_range=s["init"])
    image_size = int(vision.get("image_size", 384))
    tokenizer = BertTokenizer(
        vocab=str(out / "vocab.txt"), bos_token=DEC, extra_special_tokens=[ENC], model_max_length=512
    )
    processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(str(out))
    torch.manual_seed(seed)
    cfg = BlipConfig(text_config=text, vision_config=vision, **top)
    model = BlipForConditionalGeneration(cfg)
    if arch == "demo":  # position from the first step, as the demo CLIP (see TinyArch.grid_positions)
        set_grid_positions(
            model.vision_model.embeddings.position_embedding, image_size // int(vision["patch_size"])
        )
    model.save_pretrained(str(out))
    return out


@dataclass(frozen=True)
class BlipRecipe:
    """How the demo's captioner is trained: AdamW with warmup and cosine decay on the first caption.

    The first caption of a synthetic scene is its canonical one ("a red circle in the top left"), so
    the captioner learns one deterministic sentence per scene rather than averaging paraphrases.
    """

    steps: int = 500
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.01
    threads: int | None = 1  # one thread: on a shared two-core machine two threads preempt each other
    seed: int = 0
    time_budget_s: float | None = None  # stop early (and say so) past this many seconds

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.warmup < 0:
            raise ConfigError("BLIP training needs steps >= 1, batch_size >= 1 and warmup >= 0")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError("BLIP training needs lr > 0 and weight_decay >= 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")


@dataclass(frozen=True)
class BlipTrainResult:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float  # mean of the last 20 steps
    stopped_by_budget: bool


def _pixels(items: Sequence[DatasetItem], processor: Any) -> tuple[np.ndarray, list[str]]:
    """Every decodable training image preprocessed once (the scenes are small), with its first caption."""
    arrays: list[np.ndarray] = []
    captions: list[str] = []
    for item in items:
        try:
            image = imageio.open_image(item.path).image
        except BadImage:
            continue
        arrays.append(np.asarray(processor(images=[image], return_tensors="np")["pixel_values"][0]))
        captions.append(item.captions[0])
    if len(arrays) < 2:
        raise NotEnoughData(f"BLIP training needs at least 2 readable captioned images, got {len(arrays)}")
    return np.stack(arrays).astype(np.float32), captions


def train_blip(
    model_dir: Path | str, items: Sequence[DatasetItem], recipe: BlipRecipe | None = None
) -> BlipTrainResult:
    """Train the BLIP saved in `model_dir` on `items` and save it back there (weights only change)."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    recipe = recipe or BlipRecipe()
    model_dir = Path(model_dir)
    previous = torch.get_num_threads()
    if recipe.threads is not None:
        torch.set_num_threads(recipe.threads)
    try:
        processor: Any = BlipProcessor.from_pretrained(str(model_dir))
        model: Any = BlipForConditionalGeneration.from_pretrained(str(model_dir))
        pixels, captions = _pixels(items, processor.image_processor)
        tokens = processor.tokenizer(captions, padding=True, return_tensors="pt")
        input_ids = tokens["input_ids"].clone()
        input_ids[:, 0] = model.config.text_config.bos_token_id  # BLIP's decoder starts at [DEC]
        labels = input_ids.masked_fill(tokens["attention_mask"] == 0, -100)
        mask = tokens["attention_mask"]
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n.lower()]
        plain = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n.lower())]
        optimiser = torch.optim.AdamW(
            [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": plain, "weight_decay": 0.0}],
            lr=recipe.lr,
            betas=(0.9, 0.98),
        )

        def factor(step: int) -> float:
            if step < recipe.warmup:
                return (step + 1) / max(1, recipe.warmup)
            progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
        rng = np.random.default_rng(recipe.seed)
        torch.manual_seed(recipe.seed)
        batch = min(recipe.batch_size, len(captions))
        losses: list[float] = []
        began = time.perf_counter()
        stopped = False
        model.train()
        order = rng.permutation(len(captions))
        cursor = 0
        for _step in range(recipe.steps):
            if cursor + batch > len(order):
                order, cursor = rng.permutation(len(captions)), 0
            index = order[cursor : cursor + batch]
            cursor += batch
            out = model(
                pixel_values=torch.from_numpy(pixels[index]),
                input_ids=input_ids[index],
                attention_mask=mask[index],
                labels=labels[index],
            )
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            schedule.step()
            losses.append(float(out.loss.detach()))
            if recipe.time_budget_s is not None and time.perf_counter() - began > recipe.time_budget_s:
                stopped = True
                break
        model.eval()
        model.save_pretrained(str(model_dir))
        return BlipTrainResult(
            steps=len(losses),
            seconds=time.perf_counter() - began,
            first_loss=losses[0],
            last_loss=float(np.mean(losses[-20:])),
            stopped_by_budget=stopped,
        )
    finally:
        torch.set_num_threads(previous)
