"""Small CLIP models built from configs, saved with save_pretrained, loaded through the normal path.

No model hub is reachable on many machines (CI included), yet the whole product must run: tests,
benchmarks and `clearsight demo` build a model here (a word-level tokenizer included) and then
load it exactly like a downloaded one. The `vit-b-32` architecture has the real model's shapes
with random weights, which is all a throughput benchmark needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.errors import ConfigError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

#: Words the demo and the tests speak; any other word falls back to characters.
DEFAULT_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "to",
    "and",
    "with",
    "is",
    "are",
    "this",
    "that",
    "image",
    "photo",
    "picture",
    "shape",
    "object",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "grey",
    "gray",
    "pink",
    "brown",
    "cyan",
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "diamond",
    "ring",
    "dot",
    "top",
    "bottom",
    "left",
    "right",
    "centre",
    "center",
    "middle",
    "upper",
    "lower",
    "corner",
    "side",
    "above",
    "below",
    "beside",
    "next",
    "small",
    "big",
    "large",
    "two",
    "one",
    "three",
    "dog",
    "cat",
    "man",
    "woman",
    "person",
    "car",
    "tree",
    "house",
    # the rest of the synthetic scenes' caption vocabulary (retrieval/synthetic.py)
    "there",
    "shows",
    "plain",
    "background",
]


@dataclass(frozen=True)
class TinyArch:
    """Sizes of a CLIP built from scratch."""

    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 2
    text_width: int = 64
    text_layers: int = 2
    heads: int = 2
    projection_dim: int = 64
    context_length: int = 32
    #: log of the starting logit scale; CLIP's 2.6592 (1/0.07) is slow to rise from scratch on few steps
    logit_scale_init: float = 2.6592
    #: Start the vision tower's position embeddings as a 2-d sine-cosine grid (as MAE does) instead of
    #: std-0.02 noise, which is twenty times weaker than the patch content at the start, so a model
    #: trained for a minute learns colours long before it learns where things are.
    grid_positions: bool = False


ARCHS: dict[str, TinyArch] = {
    "tiny": TinyArch(),
    "small": TinyArch(
        image_size=96,
        patch_size=12,
        vision_width=128,
        vision_layers=4,
        text_width=128,
        text_layers=3,
        heads=4,
        projection_dim=128,
    ),
    # openai/clip-vit-base-patch32's shapes (random weights): for speed benchmarks
    "vit-b-32": TinyArch(
        image_size=224,
        patch_size=32,
        vision_width=768,
        vision_layers=12,
        text_width=512,
        text_layers=12,
        heads=8,
        projection_dim=512,
        context_length=77,
    ),
}


def _bpe_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style byte-level BPE vocabulary in which every listed word is a single token."""
    # CLIP's byte-to-unicode table: printable bytes map to themselves, the rest to code points >= 256.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    symbols = [table[b] for b in range(256)]
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[str] = []
    for word in dict.fromkeys(w.lower() for w in words):
        parts = [table[b] for b in word.encode("utf-8")]
        if len(parts) < 2:
            continue
        parts[-1] += "</w>"
        left = parts[0]
        for right in parts[1:]:
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
            left += right
            vocab.setdefault(left, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def save_tokenizer_and_processor(out: Path, arch: TinyArch, words: Iterable[str] = DEFAULT_WORDS) -> int:
    """Write tokenizer and image processor files into `out`; returns the vocabulary size."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    vocab, merges = _bpe_vocab(words)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"), model_max_length=arch.context_length
    )
    ip = CLIPImageProcessor(
        size={"shortest_edge": arch.image_size},
        crop_size={"height": arch.image_size, "width": arch.image_size},
    )
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(str(out))
    return len(vocab)


def make_clip(
    out: Path | str,
    arch: str | TinyArch = "tiny",
    words: Iterable[str] = DEFAULT_WORDS,
    seed: int = 0,
) -> Path:
    """Build a randomly initialised CLIP with a matching tokenizer and processor in `out`."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from retrieval.hub import quiet_transformers

    quiet_transformers()  # the demo builds one: its save bar and torchvision notice mean nothing to users
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
        arch = ARCHS[arch]
    out = Path(out)
    words = list(words)
    vocab_size = save_tokenizer_and_processor(out, arch, words)
    vocab = json.loads((out / "vocab.json").read_text())
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": arch.text_width,
            "intermediate_size": arch.text_width * 4,
            "num_attention_heads": arch.heads,
            "num_hidden_layers": arch.text_layers,
            "max_position_embeddings": arch.context_length,
            "bos_token_id": vocab[BOS],
            "eos_token_id": vocab[EOS],
            "pad_token_id": vocab[EOS],
        },
        vision_config={
            "hidden_size": arch.vision_width,
            "intermediate_size": arch.vision_width * 4,
            "num_attention_heads": arch.heads,
            "num_hidden_layers": arch.vision_layers,
            "image_size": arch.image_size,
            "patch_size": arch.patch_size,
        },
        projection_dim=arch.projection_dim,
        logit_scale_init_value=arch.logit_scale_init,
    )
    model = CLIPModel(cfg)
    if arch.grid_positions:
        set_grid_positions(
            model.vision_model.embeddings.position_embedding.weight, arch.image_size // arch.patch_size
        )
    model.save_pretrained(str(out))
    return out


def grid_position_table(side: int, width: int) -> Any:
    """A (1 + side*side, width) 2-d sine-cosine table (row 0, the class token, is zero).

    Half the channels encode the row, half the column, each at geometrically spaced frequencies:
    nearby patches get similar vectors and every patch a distinct one, from the first step.
    """
    import torch

    if width % 4:
        raise ConfigError(f"grid positions need a width divisible by 4, got {width}")
    quarter = width // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    coords = torch.arange(side, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    parts = []
    for axis in (rows.reshape(-1), cols.reshape(-1)):
        angles = axis[:, None] * freqs[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    table = torch.cat(parts, dim=1)
    return torch.cat([torch.zeros(1, width), table], dim=0)


def set_grid_positions(weight: Any, side: int) -> None:
    """Overwrite a (1 + side*side, width) position embedding with `grid_position_table`."""
    import torch

    with torch.no_grad():
        flat = weight.view(-1, weight.shape[-1])
        if flat.shape[0] != 1 + side * side:
            raise ConfigError(f"position table has {flat.shape[0]} rows, expected {1 + side * side}")
        flat.copy_(grid_position_table(side, flat.shape[1]))
