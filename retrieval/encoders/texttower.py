"""CLIP's text tower as stored serving weights, run in NumPy: a text query without torch or transformers.

A text search needs one sentence encoded. Importing torch and transformers' modelling stack and loading
both towers costs seconds; the text tower alone, kept once as float32 arrays in the collection's data
directory (memory-mapped, so only the rows and layers a query reads are paged in) and run as a dozen
matrix products, costs a few tens of milliseconds. The transformers model stays the reference: tests
compare this tower's embeddings with `HFDualEncoder.encode_texts` at fp32.

Only CLIP text towers with the activations CLIP uses are exported (`exportable`); anything else keeps
the transformers path. The stored tower is keyed by the encoder's fingerprint, so new weights are never
answered by old ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.encoders.base import EncoderInfo, l2_normalise
from retrieval.encoders.feed import usable_cores
from retrieval.types import Float32Array

log = logging.getLogger(__name__)

#: Bumped whenever the stored layout changes: an older folder is ignored and written again.
FORMAT = 1
META = "meta.json"
WEIGHTS = "weights.f32"
TOKENIZER = "tokenizer.json"
#: Activations this tower implements, by transformers' names.
ACTIVATIONS = ("quick_gelu", "gelu_new", "gelu_pytorch_tanh")


def tower_dir(data_dir: Path | str, fingerprint: str) -> Path:
    """Where a collection keeps the text tower of the encoder with `fingerprint`."""
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in fingerprint)
    return Path(data_dir) / "serving" / f"text-{safe}"


def exportable(model: Any) -> bool:
    """Whether `model` (a transformers CLIPModel) has a text tower this module can run."""
    cfg: Any = getattr(model, "config", None)
    if getattr(cfg, "model_type", "") != "clip":
        return False
    tcfg = cfg.text_config
    return str(getattr(tcfg, "hidden_act", "")) in ACTIVATIONS and hasattr(model, "text_projection")


def export(model: Any, tokenizer: Any, info: EncoderInfo, out: Path) -> Path:
    """Write `model`'s text tower (float32), its tokenizer and `info` into `out`, atomically.

    Written into a temporary sibling and renamed, so a reader sees a whole tower or none.
    """
    import torch

    tcfg = model.config.text_config
    text = model.text_model
    tensors: dict[str, Any] = {
        "token_embedding": text.embeddings.token_embedding.weight,
        "position_embedding": text.embeddings.position_embedding.weight,
        "final_ln.w": text.final_layer_norm.weight,
        "final_ln.b": text.final_layer_norm.bias,
        "projection": model.text_projection.weight.T,  # (hidden, dim): x @ projection
    }
    for n, layer in enumerate(text.encoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        # q, k and v in one (hidden, 3*hidden) product; stored as x @ W
        qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).T
        qkv_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        tensors |= {
            f"{n}.ln1.w": layer.layer_norm1.weight,
            f"{n}.ln1.b": layer.layer_norm1.bias,
            f"{n}.qkv.w": qkv_w,
            f"{n}.qkv.b": qkv_b,
            f"{n}.out.w": attn.out_proj.weight.T,
            f"{n}.out.b": attn.out_proj.bias,
            f"{n}.ln2.w": layer.layer_norm2.weight,
            f"{n}.ln2.b": layer.layer_norm2.bias,
            f"{n}.fc1.w": mlp.fc1.weight.T,
            f"{n}.fc1.b": mlp.fc1.bias,
            f"{n}.fc2.w": mlp.fc2.weight.T,
            f"{n}.fc2.b": mlp.fc2.bias,
        }
    with written_atomically(out) as tmp:
        layout: dict[str, list[Any]] = {}
        offset = 0
        with (tmp / WEIGHTS).open("wb") as fh:
            for name, t in tensors.items():
                arr = np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())
                arr.tofile(fh)  # no bytes copy beside it: the embedding table alone is ~100 MB
                layout[name] = [offset, list(arr.shape)]
                offset += arr.size
        tokenizer.backend_tokenizer.save(str(tmp / TOKENIZER))
        eos = getattr(tcfg, "eos_token_id", None)
        meta = {
            "format": FORMAT,
            "info": info.__dict__,
            "layers": int(tcfg.num_hidden_layers),
            "heads": int(tcfg.num_attention_heads),
            "eps": float(tcfg.layer_norm_eps),
            "act": str(tcfg.hidden_act),
            "eos_token_id": None if eos is None else int(eos),
            "context_length": int(info.context_length),
            "layout": layout,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
    return out


@contextlib.contextmanager
def written_atomically(out: Path) -> Iterator[Path]:
    """A temporary sibling folder to write a tower into, renamed to `out` when the block ends, so a
    reader sees a whole tower or none; removed if the block fails. Another process's whole tower,
    written meanwhile, is kept."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".text-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:
            if read_meta(out) is None:  # not another process's whole tower, written meanwhile
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The stored tower's description, or None when there is none (or of another format)."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    return meta


def _layer_norm(x: Float32Array, w: Float32Array, b: Float32Array, eps: float) -> Float32Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return np.asarray((x - mean) / np.sqrt(var + eps) * w + b, dtype=np.float32)


def _act(x: Float32Array, kind: str) -> Float32Array:
    if kind == "quick_gelu":
        y = x / (1.0 + np.exp(-1.702 * x))
    else:  # gelu_new / gelu_pytorch_tanh: the tanh approximation
        y = 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))
    return np.asarray(y, dtype=np.float32)


class _Half:
    """The right half of one matrix product, run by whichever thread claims it first."""

    __slots__ = ("_claimed", "_done", "_error", "_lock", "out", "w", "x")

    def __init__(self, x: Float32Array, w: Float32Array, out: Float32Array) -> None:
        self.x, self.w, self.out = x, w, out
        self._lock = threading.Lock()
        self._claimed = False
        self._done = threading.Event()
        self._error: BaseException | None = None

    def claim(self) -> bool:
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def run(self) -> None:
        try:
            np.matmul(self.x, self.w, out=self.out)
        except BaseException as exc:  # handed to the caller, which re-raises it
            self._error = exc
        finally:
            self._done.set()

    def wait(self) -> None:
        self._done.wait()
        if self._error is not None:
            raise self._error


class SharedProducts:
    """Matrix products `x @ w` split by columns between the calling thread and one helper thread.

    A query's text tower reads ~150 MB of weights for a dozen tokens: each product is bound by memory
    bandwidth, and one BLAS thread cannot draw all of it. A BLAS pool of two (OpenBLAS's own) halves
    that on a quiet machine but splits every product statically, so with both cores busy each product
    waits for the thread that has no core: a query took 2x longer than with one thread (bench/RESULTS.md).
    Here the right half is offered to a helper and the caller takes it back if the helper has not
    started it by the time the left half is done: on a quiet machine both halves run at once, on a busy
    one the caller does all of it, no slower than alone. Correctness never depends on the helper (a
    process forked without it still answers). NumPy releases the interpreter lock inside the product.
    """

    def __init__(self, min_half: int = 64) -> None:
        self.min_half = min_half  # narrower halves are not worth a hand-over
        self._tasks: queue.SimpleQueue[_Half] = queue.SimpleQueue()
        self._helper: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def _ensure_helper(self) -> None:
        if self._helper is not None and self._helper.is_alive():
            return
        with self._start_lock:
            if self._helper is None or not self._helper.is_alive():
                self._helper = threading.Thread(target=self._serve, name="texttower-helper", daemon=True)
                self._helper.start()

    def _serve(self) -> None:
        while True:
            task = self._tasks.get()
            if task.claim():
                task.run()

    def matmul(self, x: Float32Array, w: Float32Array) -> Float32Array:
        cols = w.shape[1]
        half = cols // 2
        out = np.empty((x.shape[0], cols), np.float32)
        if half < self.min_half:
            np.matmul(x, w, out=out)
            return out
        self._ensure_helper()
        right = _Half(x, w[:, half:], out[:, half:])
        self._tasks.put(right)
        np.matmul(x, w[:, :half], out=out[:, :half])
        if right.claim():
            right.run()
        right.wait()
        return out


#: The process's one helper: text towers share it (their products are serialised by the caller anyway).
_SHARED = SharedProducts()


class TextTower:
    """A stored CLIP text tower: tokenizer and float32 weights, memory-mapped."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.folder = folder
        self.meta = meta
        self.info = EncoderInfo(**meta["info"])
        self.context_length = int(meta["context_length"])
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.context_length)
        #: Splits each product with a helper thread; None (one core, or to compare) runs them whole.
        self.products: SharedProducts | None = _SHARED if usable_cores() >= 2 else None
        flat = np.memmap(folder / WEIGHTS, dtype=np.float32, mode="r")
        self.w: dict[str, Float32Array] = {}
        for name, (offset, shape) in meta["layout"].items():
            size = int(np.prod(shape))
            self.w[name] = flat[offset : offset + size].reshape(shape)

    @classmethod
    def open(cls, folder: Path) -> TextTower | None:
        """The tower stored in `folder`, or None when there is none (a caller then uses transformers)."""
        meta = read_meta(folder)
        if meta is None or not (folder / WEIGHTS).is_file() or not (folder / TOKENIZER).is_file():
            return None
        try:
            layout = meta["layout"]
            need = max(int(off) + int(np.prod(shape)) for off, shape in layout.values())
            if (folder / WEIGHTS).stat().st_size != need * 4:
                return None  # cut short (a full disk, a copy interrupted): written again on the next load
            return cls(folder, meta)
        except Exception as exc:  # a damaged cache is ignored, never an error: the model is still there
            log.warning("ignoring the stored text tower in %s: %s", folder, exc)
            return None

    def token_ids(self, text: str) -> list[int]:
        """The ids transformers' CLIP tokenizer gives `text` (start and end tokens, truncated)."""
        return list(self.tokenizer.encode(text).ids)

    def encode_texts(self, texts: Sequence[str]) -> Float32Array:
        """L2-normalised float32 embeddings, shape (n, dim); each text runs alone, so none is padded."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        return l2_normalise(np.stack([self._encode(self.token_ids(t)) for t in texts]))

    def _encode(self, ids: list[int]) -> Float32Array:
        w, m = self.w, self.meta
        mm = self.products.matmul if self.products is not None else np.matmul
        heads, eps, act = int(m["heads"]), float(m["eps"]), str(m["act"])
        n = len(ids)
        x = w["token_embedding"][ids] + w["position_embedding"][:n]
        width = x.shape[-1]
        hd = width // heads
        scale = hd**-0.5
        causal = np.triu(np.full((n, n), -np.inf, dtype=np.float32), k=1)
        for i in range(int(m["layers"])):
            h = _layer_norm(x, w[f"{i}.ln1.w"], w[f"{i}.ln1.b"], eps)
            qkv = mm(h, w[f"{i}.qkv.w"]) + w[f"{i}.qkv.b"]
            q, k, v = (
                qkv[:, j * width : (j + 1) * width].reshape(n, heads, hd).transpose(1, 0, 2) for j in range(3)
            )
            scores = (q * scale) @ k.transpose(0, 2, 1) + causal
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            attn = (scores @ v).transpose(1, 0, 2).reshape(n, width)
            x = x + mm(attn, w[f"{i}.out.w"]) + w[f"{i}.out.b"]
            h = _layer_norm(x, w[f"{i}.ln2.w"], w[f"{i}.ln2.b"], eps)
            h = _act(mm(h, w[f"{i}.fc1.w"]) + w[f"{i}.fc1.b"], act)
            x = x + mm(h, w[f"{i}.fc2.w"]) + w[f"{i}.fc2.b"]
        x = _layer_norm(x, w["final_ln.w"], w["final_ln.b"], eps)
        eos = m["eos_token_id"]
        arr = np.asarray(ids)
        # transformers' pooling: the first end token, or (an old config's eos id of 2) the highest id
        pos = int(arr.argmax()) if eos == 2 or eos is None or eos not in ids else int((arr == eos).argmax())
        return np.asarray(x[pos] @ w["projection"], dtype=np.float32)
