"""CLIP and SigLIP dual encoders on transformers."""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retrieval import hub
from retrieval.encoders.base import EncoderInfo, default_dtype, l2_normalise, select_device, torch_dtype
from retrieval.encoders.feed import DeviceFeed, Staged, auto_batch_size, check_uint8_batch
from retrieval.encoders.preprocess import PreprocessConfig, preprocess_batch, preprocess_uint8
from retrieval.errors import BadQuery, ConfigError, ModelUnavailable
from retrieval.registry import EncoderSpec, list_encoders
from retrieval.types import Float32Array, UInt8Array

_SUPPORTED = ("clip", "siglip", "siglip2")


def features(out: Any) -> Any:
    """The projected embedding of `get_image_features`/`get_text_features`.

    transformers 5 returns an output object whose pooler_output is the projected embedding; older
    versions return the tensor itself.
    """
    if hasattr(out, "pooler_output") and not hasattr(out, "shape"):
        return out.pooler_output
    return out


def _single_weights_file(target: str, revision: str | None) -> Path | None:
    """The model's one safetensors file on this machine (a local directory, or the hub cache), if any."""
    folder = Path(target)
    if folder.is_dir():
        path = folder / "model.safetensors"
        return path if path.is_file() and not (folder / "model.safetensors.index.json").exists() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(target, "model.safetensors", revision=revision)
    except ValueError:  # not a repository id
        return None
    return Path(found) if isinstance(found, str) else None


def load_model(target: str, dtype: Any, **kwargs: Any) -> Any:
    """`AutoModel.from_pretrained(target, dtype=dtype)`, with a lower peak of memory where it can.

    from_pretrained maps the whole weights file and converts tensors out of the mapping: every page
    it reads stays resident until the load ends, so a float32 checkpoint loaded as bfloat16 peaked at
    the file plus the model (a random ViT-B/32: 1,186 MB against 634 MB after the load). Read with
    pread instead, each tensor is read, converted and dropped in turn (peak 647 MB, the same weights).
    A sharded or non-safetensors checkpoint takes the ordinary path.
    """
    from transformers import MODEL_MAPPING, AutoConfig, AutoModel

    weights = _single_weights_file(target, kwargs.get("revision"))
    config = AutoConfig.from_pretrained(target, **kwargs) if weights is not None else None
    model_class: Any = MODEL_MAPPING.get(type(config), None) if config is not None else None
    if weights is None or not callable(getattr(model_class, "from_pretrained", None)):
        return AutoModel.from_pretrained(target, dtype=dtype, **kwargs)
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt", device="cpu", backend="pread") as f:
        state = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (not iterable); read as converted
        return model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)


class HFDualEncoder:
    """A transformers dual encoder (CLIPModel, SiglipModel) behind the `Encoder` interface."""

    def __init__(
        self,
        name: str,
        spec: EncoderSpec | None = None,
        device: str | None = None,
        precision: str | None = None,
    ) -> None:
        # resolved before transformers is imported, so a mistyped name fails in a fraction of a second
        src = hub.resolve(
            name,
            spec.hub_id if spec else None,
            spec.revision if spec else None,
            known=[s.name for s in list_encoders()],
            what="encoder",
        )
        from transformers import AutoProcessor

        self.device = select_device(device)
        self.precision = default_dtype(self.device, precision)
        dtype = torch_dtype(self.precision)
        self._torch_dtype = dtype
        # loaded in the dtype it runs in: no float32 copy beside it, no cast of the whole model at start
        model = hub.load(src, functools.partial(load_model, dtype=dtype), "encoder")
        processor = hub.load(src, AutoProcessor.from_pretrained, "encoder's processor")
        family = str(getattr(model.config, "model_type", ""))
        if family not in _SUPPORTED:
            raise ModelUnavailable(
                f"{name!r} is a {family or 'unknown'} model; supported: {', '.join(_SUPPORTED)}"
            )
        self.model = model.to(device=self.device, dtype=dtype).eval()  # a no-op where it already is
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.pre = PreprocessConfig.from_processor(processor.image_processor)
        vcfg, tcfg = model.config.vision_config, model.config.text_config
        dim = int(getattr(model.config, "projection_dim", 0) or tcfg.hidden_size)
        fingerprint = hub.weights_fingerprint(src, model.config)
        self.info = EncoderInfo(
            name=name,
            model_id=src.target,
            fingerprint=fingerprint,
            family=family,
            dim=dim,
            image_size=int(vcfg.image_size),
            patch_size=int(vcfg.patch_size),
            context_length=int(spec.context_length if spec else getattr(tcfg, "max_position_embeddings", 77)),
            precision=self.precision,
        )
        self._lock = threading.Lock()  # one forward pass at a time on a shared model
        self._feed: DeviceFeed | None = None  # made on first use: query-only processes never need it

    @property
    def supports_patches(self) -> bool:
        """Whether `patch_embeddings` works: only CLIP projects its patch tokens into the joint space."""
        return self.info.family == "clip"

    # -- images ---------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image]) -> Float32Array:
        return preprocess_batch(images, self.pre)

    def _check_pixels(self, pixels: Float32Array) -> None:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise BadQuery(f"pixel batch must have shape (n, 3, H, W), got {pixels.shape}")

    def _pixels_tensor(self, pixels: Float32Array) -> Any:
        """The pixel batch as a tensor on the model's device, in its dtype."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, self._torch_dtype)

    def encode_pixels(self, pixels: Float32Array) -> Float32Array:
        import torch

        self._check_pixels(pixels)
        if len(pixels) == 0:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            t = self._pixels_tensor(pixels)
            out = features(self.model.get_image_features(pixel_values=t))
            return l2_normalise(out.float().cpu().numpy())

    # -- ingest: uint8 batches, normalised on the device ----------------------------------
    def preprocess_uint8(self, image: Image.Image) -> UInt8Array:
        """One image resized and cropped to the input size, (H, W, 3) uint8: a decode worker's part."""
        return preprocess_uint8(image, self.pre)

    def stage(self, batch: UInt8Array) -> Staged:
        """Start moving a uint8 batch to the device as model input (asynchronous on CUDA)."""
        check_uint8_batch(batch, self.pre.output_hw)
        with self._lock:
            if self._feed is None:
                self._feed = DeviceFeed(self.device, self._torch_dtype, self.pre)
            return self._feed.stage(np.ascontiguousarray(batch))

    def encode_staged(self, staged: Staged) -> Float32Array:
        import torch

        if staged.n == 0:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            assert self._feed is not None
            t = self._feed.wait(staged)
            out = features(self.model.get_image_features(pixel_values=t))
            return l2_normalise(out.float().cpu().numpy())

    def encode_uint8(self, batch: UInt8Array) -> Float32Array:
        """`encode_pixels` for a batch of `preprocess_uint8` outputs."""
        return self.encode_staged(self.stage(batch))

    def ingest_batch_size(self) -> int:
        """The batch size ingest's `auto` uses on this encoder's device (see `auto_batch_size`)."""
        free = None
        if self.device.startswith("cuda"):
            import torch

            free = int(torch.cuda.mem_get_info(torch.device(self.device))[0])
        width = int(getattr(self.model.config.vision_config, "hidden_size", 768))
        return auto_batch_size(self.device, self.info.image_size, self.info.patch_size, width, free)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> Float32Array:
        # The pixels ingest encodes (uint8 crops, normalised on the device): a photo given as a query
        # is then the same vector as the photo indexed.
        chunks = [
            self.encode_uint8(np.stack([self.preprocess_uint8(im) for im in images[i : i + batch_size]]))
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.info.dim), np.float32)

    def patch_embeddings(self, pixels: Float32Array, surgery: bool = True) -> Float32Array:
        """Per-patch embeddings in the joint space, shape (n, rows, cols, dim), L2-normalised.

        CLIP's last block lets every patch attend to the whole image (q-k attention) and adds the
        residual and MLP, which makes patch-vs-text similarities noisy and favour the background.
        With `surgery` the last block uses value-value attention and keeps only the attention path
        for patch tokens (CLIP Surgery, ClearCLIP); without it the patch tokens of the normal last
        block are projected, the noisy baseline.
        """
        import torch

        if not self.supports_patches:
            raise ConfigError(
                f"dense evidence needs a CLIP model; {self.info.family} has no per-patch projection: "
                "use grid evidence"
            )
        self._check_pixels(pixels)
        rows, cols = pixels.shape[2] // self.info.patch_size, pixels.shape[3] // self.info.patch_size
        if len(pixels) == 0:
            return np.zeros((0, rows, cols, self.info.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            h = self._before_last_block(self._pixels_tensor(pixels))
            return self._patch_head(h, surgery, rows, cols)

    def _before_last_block(self, t: Any) -> Any:
        """The vision tower's hidden states entering its last block."""
        vision = self.model.vision_model
        h = vision.pre_layrnorm(vision.embeddings(t))
        for layer in vision.encoder.layers[:-1]:
            h = _hidden(layer(h, None))
        return h

    def _patch_head(self, h: Any, surgery: bool, rows: int, cols: int) -> Float32Array:
        """Unit patch embeddings (n, rows, cols, dim) from the hidden states entering the last block."""
        import torch

        vision = self.model.vision_model
        last = vision.encoder.layers[-1]
        if surgery:
            attn = last.self_attn
            x = last.layer_norm1(h)
            n, length, width = x.shape
            v = attn.v_proj(x).view(n, length, attn.num_heads, attn.head_dim).transpose(1, 2)
            weights = torch.softmax((v @ v.transpose(-1, -2)) * attn.scale, dim=-1)
            h = attn.out_proj((weights @ v).transpose(1, 2).reshape(n, length, width))
        else:
            h = _hidden(last(h, None))
        patches = self.model.visual_projection(vision.post_layernorm(h[:, 1:, :]))
        return l2_normalise(patches.float().cpu().numpy()).reshape(len(h), rows, cols, -1)

    def encode_staged_with_patches(
        self, staged: Staged, surgery: bool = True
    ) -> tuple[Float32Array, Float32Array]:
        """`encode_staged` and `patch_embeddings` of the same batch from one pass through the vision tower:
        the blocks before the last run once, and both heads start from them. Indexing stores the patch
        features this way for about 4% more work than the embeddings alone (ViT-B/32), instead of a
        second pass later."""
        import torch

        if not self.supports_patches:
            raise ConfigError(f"{self.info.family} has no per-patch projection")
        rows = cols = self.info.image_size // self.info.patch_size
        if staged.n == 0:
            return (
                np.zeros((0, self.info.dim), dtype=np.float32),
                np.zeros((0, rows, cols, self.info.dim), dtype=np.float32),
            )
        vision = self.model.vision_model
        with self._lock, torch.inference_mode():
            assert self._feed is not None
            h = self._before_last_block(self._feed.wait(staged))
            last = _hidden(vision.encoder.layers[-1](h, None))
            vecs = self.model.visual_projection(vision.post_layernorm(last[:, 0, :]))
            return l2_normalise(vecs.float().cpu().numpy()), self._patch_head(h, surgery, rows, cols)

    # -- texts ----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Any:
        """Token tensors for `texts` as the model was trained, used for encoding and fine-tuning alike.

        SigLIP pads to the full context, CLIP to the longest text of the batch; texts longer than the
        context are truncated, never an error.
        """
        padding: str | bool = "max_length" if self.info.family.startswith("siglip") else True
        return self.tokenizer(
            texts,
            padding=padding,
            truncation=True,
            max_length=self.info.context_length,
            return_tensors="pt",
        )

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> Float32Array:
        import torch

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        chunks = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenize(texts[i : i + batch_size])
            tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
            if self.info.family.startswith("siglip"):
                tok.pop("attention_mask", None)  # SigLIP was trained without a text attention mask
            with self._lock, torch.inference_mode():
                out = features(self.model.get_text_features(**tok))
                chunks.append(l2_normalise(out.float().cpu().numpy()))
        return np.concatenate(chunks)

    def close(self) -> None:
        """Release the weights now rather than whenever the garbage collector gets to them."""
        import gc

        import torch

        self.model = None
        self._feed = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _hidden(out: Any) -> Any:
    """A transformer block's hidden states: a tensor, or the first item of the tuple older releases return."""
    return out[0] if isinstance(out, tuple) else out
