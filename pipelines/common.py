"""Plumbing every diffusers generator adapter shares (the UNet one in sd.py, the flow
transformer one in flow.py): which module trains (LoRA through peft, full, or nothing), the
frozen reference policy, and the module training forwards go through (the trainer's DDP
wrapper). One algorithm per file stays true: nothing here knows about samplers or losses.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmalign.config import num
from mmalign.types import Samples, per_sample_randn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VAE_SALT = 7919  # posterior draws use seed * 1_000_003 + VAE_SALT: never a method's noise or timestep draw


@dataclass
class LoraSettings:
    rank: int = num(8, ge=1)
    alpha: float = num(8.0, gt=0)
    dropout: float = num(0.0, ge=0, lt=1)
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    init: Literal["gaussian", "default"] = "gaussian"  # B starts at zero either way

    def validate(self) -> None:
        if self.rank <= 0:
            raise ValueError("rank: must be positive")


class TrainedModule:
    """The denoiser a generator fine-tunes, and its frozen reference.

    finetune="lora": peft adapters (float32) on `module`; the reference is the same module
    with adapters disabled (no second copy). "full": `module` trains in float32 and a frozen
    copy in `ref_dtype` is the reference. "none": frozen, inference only.
    """

    def __init__(self, module: nn.Module, finetune: str, lora: LoraSettings, ref_dtype: torch.dtype):
        self.module, self.finetune = module, finetune
        self.ref: nn.Module | None = None
        self.use_ref = False
        self.forward_module: nn.Module = module  # replaced by the trainer's wrapped (DDP) module
        if finetune == "lora":
            from peft import LoraConfig

            module.requires_grad_(False)
            config = LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                init_lora_weights="gaussian" if lora.init == "gaussian" else True,
            )
            if hasattr(module, "add_adapter"):
                module.add_adapter(config)
            else:  # a diffusers model without PeftAdapterMixin (e.g. StableAudioDiTModel): peft directly
                from peft import inject_adapter_in_model

                inject_adapter_in_model(config, module)
                for name, p in module.named_parameters():
                    p.requires_grad_("lora_" in name)
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # LoRA weights train in float32
        elif finetune == "none":
            module.requires_grad_(False).eval()
        else:
            module.to(torch.float32).requires_grad_(True)
            self.ref = copy.deepcopy(module).requires_grad_(False).eval()
            self.ref.to(ref_dtype)

    def current(self) -> nn.Module:
        """The module a forward pass should call now (the frozen copy inside `reference()`)."""
        return self.ref if self.use_ref else self.forward_module

    def to(self, device: Any) -> None:
        if self.ref is not None:
            self.ref.to(device)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.module.named_parameters() if p.requires_grad}

    @contextmanager
    def reference(self):
        """Parameters of the frozen reference policy: LoRA disabled, or the frozen copy."""
        if self.finetune == "none":
            yield
        elif self.ref is not None:
            self.use_ref = True
            try:
                yield
            finally:
                self.use_ref = False
        else:
            set_adapters_enabled(self.module, False)
            try:
                yield
            finally:
                set_adapters_enabled(self.module, True)


def set_adapters_enabled(module: nn.Module, enabled: bool) -> None:
    """Turn a module's LoRA adapters on or off (diffusers' PeftAdapterMixin, or peft's layers directly)."""
    if hasattr(module, "enable_adapters"):
        module.enable_adapters() if enabled else module.disable_adapters()
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(enabled)


class TrainedAdapterMixin:
    """The plumbing the diffusers adapters share: their trained network is `self._trained.module`
    (a TrainedModule) inside `self.pipe`."""

    @property
    def device(self) -> torch.device:
        return next(self._trained.module.parameters()).device

    def to(self, device: Any):
        self.pipe.to(device)
        self._trained.to(device)
        return self

    def trainable(self) -> nn.Module:
        return self._trained.module

    def set_forward_module(self, module: nn.Module) -> None:
        """Route training forwards through the trainer's wrapper (e.g. DDP) of `trainable()`."""
        self._trained.forward_module = module

    def enable_gradient_checkpointing(self) -> None:
        self._trained.module.enable_gradient_checkpointing()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return self._trained.trainable_state_dict()

    def reference(self):
        """Parameters of the frozen reference policy: LoRA disabled, or the frozen copy."""
        return self._trained.reference()

    # ------------------------------------------------------------------ VAE
    @torch.no_grad()
    def encode_images(self, images: Tensor, seeds: Sequence[int] | None = None) -> Tensor:
        """B,3,H,W in [0,1] -> scaled latents, drawn from the VAE posterior (`vae_latents: sample`).

        The denoiser was trained on posterior draws (as diffusers' training scripts encode), so
        fine-tuning data must be drawn the same way. The posterior *mean* is a cleaner latent
        distribution: where the posterior std is not negligible (the toy VAE's is 0.19 of the
        latent scale) fine-tuning on means re-fits the low-noise steps at the expense of the
        high-noise ones that set the composition (docs/results/toy-world-log.md). Each sample's
        draw comes from its seed in `seeds` (reproducible across process splits; give the two
        images of a preference pair the same seed and their draws cancel in the comparison),
        else from the global RNG. `vae_latents: mean` gives the deterministic mean.
        """
        x = images.to(self.device, self.vae.dtype) * 2 - 1
        dist = self.vae.encode(x).latent_dist
        z = dist.mean
        if self.cfg.vae_latents == "sample":
            if seeds is None:
                eps = torch.randn_like(z)
            else:
                eps = per_sample_randn([int(s) * 1_000_003 + VAE_SALT for s in seeds], z.shape[1:], z.device, z.dtype)
            z = z + dist.std * eps
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).float()

    def decode(self, latents: Tensor) -> Samples:
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + shift
        x = self.vae.decode(z).sample.float()
        return Samples(images=((x + 1) / 2).clamp(0, 1))
