"""The contrastive training step of CLIP fine-tuning: which weights train, the loss, and the optimiser.

Kept apart from `finetune.py` (data, epochs, validation and the guard) so each reads in one sitting.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from retrieval.encoders import default_dtype
from retrieval.errors import ConfigError

if TYPE_CHECKING:
    from retrieval.training.types import FinetuneConfig

#: CLIP clamps its temperature so logits are scaled by at most 100.
MAX_LOGIT_SCALE = math.log(100.0)


def apply_freeze(model: Any, mode: str, last_n: int) -> list[Any]:
    """Set requires_grad per the freeze mode; returns the trainable parameters."""
    trainable_prefixes: tuple[str, ...]
    heads = ("visual_projection.", "text_projection.", "logit_scale")
    if mode == "none":
        trainable_prefixes = ("",)
    elif mode == "vision":  # the vision tower is frozen
        trainable_prefixes = ("text_model.", "text_projection.", "logit_scale")
    elif mode == "text":
        trainable_prefixes = ("vision_model.", "visual_projection.", "logit_scale")
    elif mode == "all-but-projections":
        trainable_prefixes = heads
    else:
        v_layers = len(model.vision_model.encoder.layers)
        t_layers = len(model.text_model.encoder.layers)
        if last_n > min(v_layers, t_layers):
            raise ConfigError(
                f"last_n={last_n} but the towers have {v_layers} (vision) and {t_layers} (text) layers"
            )
        trainable_prefixes = (
            *heads,
            *(f"vision_model.encoder.layers.{i}." for i in range(v_layers - last_n, v_layers)),
            *(f"text_model.encoder.layers.{i}." for i in range(t_layers - last_n, t_layers)),
            "vision_model.post_layernorm.",
            "text_model.final_layer_norm.",
        )
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(trainable_prefixes))
        if p.requires_grad:
            params.append(p)
    return params


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: gains, biases, 1-d embeddings and the temperature are left alone."""
    decay: list[Any] = []
    plain: list[Any] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name.endswith(".bias") or "norm" in name or name == "logit_scale"
        (plain if no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def clip_loss(model: Any, pixels: Any, input_ids: Any, attention_mask: Any) -> Any:
    """Symmetric InfoNCE: each image must pick its caption among the batch's, and each caption its image."""
    import torch
    import torch.nn.functional as F

    from retrieval.encoders.hf import features

    img = features(model.get_image_features(pixel_values=pixels))
    txt = features(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
    img = F.normalize(img.float(), dim=-1)
    txt = F.normalize(txt.float(), dim=-1)
    scale = model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * img @ txt.t()
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class Optimiser:
    """AdamW, schedule, loss scaling and accumulation: one `step` per micro-batch, written the torch way."""

    def __init__(
        self, net: Any, trainable: list[Any], device: str, steps_per_epoch: int, config: FinetuneConfig
    ) -> None:
        import torch

        self.net, self.trainable, self.config = net, trainable, config
        self.cuda = device.startswith("cuda")
        # On a CPU only bf16 autocast exists, and `auto` takes it only where the CPU computes bf16 natively.
        cpu_bf16 = device == "cpu" and (
            config.amp == "bf16" or (config.amp == "auto" and default_dtype("cpu") == "bf16")
        )
        self.amp_dtype = torch.bfloat16 if config.amp == "bf16" or cpu_bf16 else torch.float16
        self.use_amp = (self.cuda and config.amp != "off") or cpu_bf16
        self.accum = config.grad_accum if self.cuda else 1
        total = config.epochs * math.ceil(steps_per_epoch / self.accum)
        warmup = max(1, int(config.warmup * total) if config.warmup < 1 else int(config.warmup))
        from transformers import get_cosine_schedule_with_warmup

        groups = param_groups(net, config.weight_decay)
        self.optimiser = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
        self.schedule = get_cosine_schedule_with_warmup(
            self.optimiser, num_warmup_steps=warmup, num_training_steps=total
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

    @property
    def lr(self) -> float:
        return float(self.optimiser.param_groups[0]["lr"])

    def step(self, inputs: dict[str, Any], boundary: bool) -> float:
        """Forward and backward one micro-batch; update the weights at accumulation boundaries."""
        import torch

        device_type = "cuda" if self.cuda else "cpu"
        with torch.autocast(device_type=device_type, dtype=self.amp_dtype, enabled=self.use_amp):
            loss = clip_loss(self.net, inputs["pixels"], inputs["input_ids"], inputs["attention_mask"])
        self.scaler.scale(loss / self.accum).backward()
        if boundary:
            self.scaler.unscale_(self.optimiser)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip)
            self.scaler.step(self.optimiser)
            self.scaler.update()
            self.optimiser.zero_grad(set_to_none=True)
            self.schedule.step()
            with torch.no_grad():
                self.net.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return float(loss.detach())
