"""Generator adapter for transformers vision-language models (image-text-to-text).

Any model `AutoModelForImageTextToText` + `AutoProcessor` load (LLaVA / LLaVA-NeXT,
Qwen2-VL / Qwen2.5-VL, ...), from a hub id or a local directory. The policy's per-sample
score is the log-probability of a response given (image(s), prompt): token log-probs from
`token_logps`, reduced by the method (sum, length average, or RLHF-V's dense weighting).

- LoRA (peft) on the language model's linear layers only; the vision tower and the
  projector stay frozen unless `train_vision_tower` / `train_projector` (then they train
  fully through peft's `modules_to_save`, which the reference still sees untouched).
- `reference()`: adapters disabled (no second model) with LoRA; a frozen copy with full
  fine-tuning.
- `rollout(prompts, images=..., num_samples=K)`: K sampled responses per (image, prompt).
- Padding: right by default; with left padding, position ids are derived from the
  attention mask (M-RoPE models compute their own from it).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmalign.config import check_hub_model, num
from mmalign.data.vlm import VLMEncoder, VLMRow, build_sequences, load_row_images
from mmalign.registry import register_generator
from mmalign.types import Rollout, Samples

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "merger", "connector")


@dataclass
class VLMLoraSettings:
    rank: int = num(16, ge=1)
    alpha: float = num(32.0, gt=0)
    dropout: float = num(0.0, ge=0, lt=1)
    # linear layers of the language model (names as in Llama / Qwen2 / Mistral)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def validate(self) -> None:
        if self.rank <= 0:
            raise ValueError("rank: must be positive")


@dataclass
class VLMGeneratorConfig:
    pretrained: str  # hub id or local directory (model + processor)
    revision: str | None = None
    finetune: Literal["lora", "full", "none"] = "lora"
    lora: VLMLoraSettings = field(default_factory=VLMLoraSettings)
    train_vision_tower: bool = False
    train_projector: bool = False
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # frozen weights; LoRA trains in float32
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"
    trust_remote_code: bool = False
    system_prompt: str | None = None
    padding_side: Literal["right", "left"] = "right"
    max_length: int | None = num(None, ge=1)  # prompt (image tokens included) + response
    on_too_long: Literal["error", "drop", "truncate_response"] = "error"  # never truncates image tokens
    # processor image size overrides (Qwen2-VL family), e.g. max_pixels: 401408
    min_pixels: int | None = num(None, ge=1)
    max_pixels: int | None = num(None, ge=1)
    # rollout defaults
    max_new_tokens: int = num(128, ge=1)
    temperature: float = num(1.0, gt=0)
    top_p: float = num(1.0, gt=0, le=1)

    def validate(self) -> None:
        from mmalign.paths import resolve

        p = self.pretrained = resolve(self.pretrained)  # toy:vlm_toy -> the shipped asset
        looks_local = p.startswith(("/", ".", "~")) or p.count("/") > 1
        if looks_local and not Path(p).expanduser().is_dir():
            raise ValueError(f"pretrained: directory {p} not found")
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError("max_length: must be positive")


def _find_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Shortest module paths whose last component is one of `names`."""
    found = []
    for n, _ in model.named_modules():
        last = n.rsplit(".", 1)[-1]
        if last in names and not any(n.startswith(f + ".") for f in found):
            found.append(n)
    return found


class VLMGenerator:
    """A vision-language model through transformers (a `TokenGenerator`, mmalign.protocols): it
    samples and scores token responses; it has no denoising steps, so no diffusion hooks."""

    modality = "text"

    def __init__(self, cfg: VLMGeneratorConfig, model: nn.Module | None = None, processor: Any = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from mmalign.paths import resolve

        self.cfg = cfg
        cfg.pretrained = resolve(cfg.pretrained)
        src = str(Path(cfg.pretrained).expanduser()) if Path(cfg.pretrained).expanduser().is_dir() else cfg.pretrained
        pkw: dict[str, Any] = {
            k: v for k, v in (("min_pixels", cfg.min_pixels), ("max_pixels", cfg.max_pixels)) if v is not None
        }
        self.processor = processor or AutoProcessor.from_pretrained(
            src, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **pkw
        )
        kw: dict[str, Any] = {
            "revision": cfg.revision,
            "dtype": DTYPES[cfg.dtype],
            "trust_remote_code": cfg.trust_remote_code,
        }
        if cfg.attn_implementation:
            kw["attn_implementation"] = cfg.attn_implementation
        self.base = model or AutoModelForImageTextToText.from_pretrained(src, **kw)
        self.base.config.use_cache = False
        self.uses_mrope = hasattr(self.base, "get_rope_index") or hasattr(
            getattr(self.base, "model", None), "get_rope_index"
        )
        vision = _find_modules(self.base, VISION_NAMES)
        proj = [
            n
            for n in _find_modules(self.base, PROJECTOR_NAMES)
            if not (cfg.train_vision_tower and any(n.startswith(v + ".") for v in vision))
        ]
        self.vision_modules, self.projector_modules = vision, proj
        self._ref_model: nn.Module | None = None
        if cfg.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            self.base.requires_grad_(False)
            frozen = "|".join(n.rsplit(".", 1)[-1] for n in vision + proj) or "__none__"
            targets = "|".join(cfg.lora.target_modules)
            # LoRA on the language model only: skip anything under the vision tower / projector
            regex = rf"^(?!.*\b({frozen})\b).*\.({targets})$"
            save = ([n.rsplit(".", 1)[-1] for n in vision] if cfg.train_vision_tower else []) + (
                [n.rsplit(".", 1)[-1] for n in proj] if cfg.train_projector else []
            )
            self.model = get_peft_model(
                self.base,
                LoraConfig(
                    r=cfg.lora.rank,
                    lora_alpha=cfg.lora.alpha,
                    lora_dropout=cfg.lora.dropout,
                    target_modules=regex,
                    modules_to_save=save or None,
                ),
            )
            for p in self.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        elif cfg.finetune == "full":
            self.model = self.base
            self.model.to(torch.float32).requires_grad_(True)
            for n in ([] if cfg.train_vision_tower else vision) + ([] if cfg.train_projector else proj):
                self.model.get_submodule(n).requires_grad_(False)
            self._ref_model = copy.deepcopy(self.base).requires_grad_(False).eval()
            self._ref_model.to(DTYPES[cfg.dtype])
        else:
            self.model = self.base.requires_grad_(False).eval()
        self._forward_model: nn.Module = self.model
        self._use_ref = False
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)

    # ------------------------------------------------------------------ plumbing
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: Any) -> VLMGenerator:
        self.model.to(device)
        if self._ref_model is not None:
            self._ref_model.to(device)
        return self

    def trainable(self) -> nn.Module:
        return self.model

    def set_forward_module(self, module: nn.Module) -> None:
        self._forward_model = module

    def enable_gradient_checkpointing(self) -> None:
        self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    @contextmanager
    def reference(self):
        """The frozen reference policy: LoRA (and modules_to_save copies) disabled, or the frozen copy."""
        if self.cfg.finetune == "none":
            yield
        elif self._ref_model is not None:
            self._use_ref = True
            try:
                yield
            finally:
                self._use_ref = False
        else:
            with self.model.disable_adapter():
                yield

    def encoder(self):
        return VLMEncoder(self.processor, self.cfg.max_length, self.cfg.on_too_long, self.cfg.system_prompt)

    @property
    def multimodal_token_ids(self) -> set[int]:
        """Image / video / vision-boundary placeholder ids (never valid inside a response)."""
        ids = set()
        for cfg in (self.base.config, self.processor):
            for k in (
                "image_token_id",
                "image_token_index",
                "video_token_id",
                "video_token_index",
                "vision_start_token_id",
                "vision_end_token_id",
            ):
                v = getattr(cfg, k, None)
                if isinstance(v, int) and v >= 0:
                    ids.add(v)
        return ids

    @property
    def pad_id(self) -> int:
        t = self.tokenizer
        return t.pad_token_id if t.pad_token_id is not None else (t.eos_token_id or 0)

    # ------------------------------------------------------------------ scoring
    def _model_inputs(self, seqs: dict[str, Any], model: nn.Module) -> dict[str, Any]:
        dev = self.device
        dtype = next(model.parameters()).dtype if self._use_ref else self.base.dtype
        inp: dict[str, Any] = {"input_ids": seqs["input_ids"].to(dev), "attention_mask": seqs["attention_mask"].to(dev)}
        inp.update({k: v.to(dev) for k, v in seqs["token_extras"].items()})
        for k, v in seqs["vision"].items():
            inp[k] = v.to(dev, dtype) if v.is_floating_point() else v.to(dev)
        if not self.uses_mrope and bool((seqs["attention_mask"][:, 0] == 0).any()):  # left padding
            inp["position_ids"] = (inp["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return inp

    def token_logps(self, seqs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token log p(token | previous tokens, images) of every sequence.

        Returns (logps, loss_mask, changed), each [N, L-1] and aligned: position j scores
        input_ids[:, j+1]; logps are zero outside the response."""
        model = self._ref_model if self._use_ref else self._forward_model
        out = model(**self._model_inputs(seqs, model), use_cache=False)
        logits = out.logits[:, :-1].float()
        labels = seqs["input_ids"][:, 1:].to(logits.device)
        lp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        mask = seqs["loss_mask"][:, 1:].to(logits.device)
        return lp * mask, mask, seqs["changed"][:, 1:].to(logits.device)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_ids(
        self,
        prompts: Sequence,
        max_new_tokens: int | None = None,
        do_sample: bool = True,
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> list[Tensor]:
        """Sample one response per encoded prompt (`EncodedPrompt`s); returns the new token ids,
        cut after the first end-of-sequence token (kept)."""
        seqs = build_sequences(prompts, [torch.zeros(0, dtype=torch.long)] * len(prompts), self.pad_id, "left")
        model = self.model
        was_training = model.training
        model.eval()
        inp = self._model_inputs(seqs, model)
        inp.pop("position_ids", None)
        eos = self.base.generation_config.eos_token_id
        kw = dict(
            do_sample=do_sample,
            max_new_tokens=max_new_tokens or self.cfg.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=eos,
        )
        if self.multimodal_token_ids:  # a sampled image token would break image-token/feature counts
            kw["suppress_tokens"] = sorted(self.multimodal_token_ids)
        if do_sample:
            kw.update(temperature=temperature or self.cfg.temperature, top_p=top_p or self.cfg.top_p)
        out = model.generate(**inp, **kw)
        model.train(was_training)
        new = out[:, seqs["input_ids"].shape[1] :].cpu()
        eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        res = []
        for row in new:
            ids = row.tolist()
            cut = next((j + 1 for j, t in enumerate(ids) if t in eos_ids), len(ids))
            res.append(torch.tensor(ids[:cut], dtype=torch.long))
        return res

    @torch.no_grad()
    def rollout(
        self,
        prompts: Sequence[str],
        images: Sequence[Any] | None = None,
        num_samples: int = 1,
        seeds: Sequence[int] | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        do_sample: bool = True,
        **_: Any,
    ) -> Rollout:
        """K = num_samples sampled responses per (image(s), prompt). `images[i]` is a PIL image,
        a path or a list of them. Returns a Rollout whose samples.text holds the B*K responses
        (prompt-major), extras["response_ids"] their token ids and extras["group"] the prompt index."""
        if images is None or len(images) != len(prompts):
            raise ValueError("VLMGenerator.rollout: pass one image (or list of images) per prompt: images=[...]")
        enc = self.encoder()
        encoded = []
        for i, (p, im) in enumerate(zip(prompts, images)):
            ims = load_row_images(VLMRow(list(im) if isinstance(im, (list, tuple)) else [im], p, name=f"prompt {i}"))
            encoded.append(enc.encode_prompt(ims, p))
        rep = [e for e in encoded for _ in range(num_samples)]
        if seeds is not None:
            torch.manual_seed(int(seeds[0]))
        ids = self.generate_ids(rep, max_new_tokens, do_sample, temperature)
        texts = [self.tokenizer.decode(x, skip_special_tokens=True) for x in ids]
        n = len(rep)
        return Rollout(
            samples=Samples(text=texts),
            latents=torch.zeros(n, 0),
            timesteps=torch.zeros(0),
            log_probs=None,
            prompts=[p for p in prompts for _ in range(num_samples)],
            extras={"response_ids": ids, "group": torch.arange(len(prompts)).repeat_interleave(num_samples)},
        )

    # ------------------------------------------------------------------ saving
    def save_trained(self, out_dir: str | Path) -> Path:
        """A peft adapter directory (adapter_config.json + adapter_model.safetensors), or the full
        model; the processor is saved alongside so the directory is self-describing."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out, safe_serialization=True)
        self.processor.save_pretrained(out)
        (out / "mmalign_generator.json").write_text(
            json.dumps({"pretrained": self.cfg.pretrained, "finetune": self.cfg.finetune})
        )
        return out

    def load_trained(self, path: str | Path) -> None:
        path = Path(path)
        if (path / "adapter_model.safetensors").is_file() and self.cfg.finetune == "lora":
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            res = set_peft_model_state_dict(self.model, load_file(str(path / "adapter_model.safetensors")))
            if getattr(res, "unexpected_keys", None):
                raise ValueError(f"{path}: adapter keys do not match this model: {res.unexpected_keys[:5]}")
        elif (path / "config.json").is_file():
            from transformers import AutoModelForImageTextToText

            loaded = AutoModelForImageTextToText.from_pretrained(path)
            res = self.base.load_state_dict(loaded.state_dict(), strict=False)
            if res.unexpected_keys:
                raise ValueError(f"{path}: weights do not match: {res.unexpected_keys[:5]}")
        else:
            raise FileNotFoundError(f"{path}: neither adapter_model.safetensors nor a full model found")


@register_generator("vlm", VLMGeneratorConfig)
def build_vlm(cfg: VLMGeneratorConfig) -> VLMGenerator:
    """A transformers image-text-to-text model (LLaVA, Qwen2-VL, ...) with LoRA on its LM."""
    check_hub_model("generator.pretrained", cfg.pretrained)
    return VLMGenerator(cfg)
