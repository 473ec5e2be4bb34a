"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation"), rebuilt on transformers' BLIP classes.

The released scorer (`ImageReward.ImageReward.score`, package image-reward 1.5):

    image_embeds = ViT-L/16(preprocess(image))                      # BLIP visual encoder, all tokens
    h = BERT(prompt_ids, attention_mask,                            # BLIP "med" text encoder: every
             encoder_hidden_states=image_embeds)                    #   layer cross-attends to the image
    raw = MLP(h[:, 0, :])                                           # the [CLS] (first) token, 768-d
    score = (raw - 0.16717362830052426) / 1.0333394966054072        # published mean / std

    MLP: Linear(768, 1024) Dropout(0.2) Linear(1024, 128) Dropout(0.2) Linear(128, 64)
         Dropout(0.1) Linear(64, 16) Linear(16, 1)        (no activations: the ReLUs are
         commented out, as in the LAION aesthetic head, whose layout `AestheticMLP` reuses)
    prompt: BertTokenizer("bert-base-uncased") + [DEC] / [ENC] special tokens, padding
            "max_length", truncation, max_length 35; input_ids used as is ([CLS] first).
    image:  Resize(224, bicubic) on the shorter side, CenterCrop(224), ToTensor,
            Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)).

Architecture (BLIP_Pretrain(image_size=224, vit="large") with BLIP's med_config.json):
ViT-L/16 at 224 px (width 1024, 24 blocks, 16 heads, MLP 4096, exact GELU, LayerNorm eps 1e-6,
fused qkv with bias, pre-norm blocks, final norm over all tokens); BERT-base (vocab 30524,
width 768, 12 layers, 12 heads, FFN 3072, max 512 positions, no token-type embeddings,
LayerNorm eps 1e-12) with a cross-attention block (keys/values from the 1024-d image tokens)
in every layer. transformers' `BlipVisionModel` and `BlipTextModel` (is_decoder=True in the
config builds the cross-attention; called bidirectionally, as BlipForImageTextRetrieval does)
are the same computation, so we build those and map the checkpoint's keys
(`convert_original_state_dict`):

    blip.visual_encoder.cls_token / pos_embed        -> vision_model.embeddings.class_embedding / position_embedding
    blip.visual_encoder.patch_embed.proj.*           -> vision_model.embeddings.patch_embedding.*
    blip.visual_encoder.blocks.{i}.norm1 / norm2     -> vision_model.encoder.layers.{i}.layer_norm1 / layer_norm2
    blip.visual_encoder.blocks.{i}.attn.qkv / proj   -> vision_model.encoder.layers.{i}.self_attn.qkv / projection
    blip.visual_encoder.blocks.{i}.mlp.fc1 / fc2     -> vision_model.encoder.layers.{i}.mlp.fc1 / fc2
    blip.visual_encoder.norm                         -> vision_model.post_layernorm
    blip.text_encoder.*                              -> text_encoder.*   (same BERT names)
    mlp.layers.*                                     -> mlp.layers.*
    dropped: blip.vision_proj.*, blip.text_proj.* (BLIP's contrastive projections, unused by
             the score) and the text embeddings' position_ids buffer.

Both fused qkv layers lay out [q; k; v] rows the same way (reshape(B, N, 3, heads, head_dim)),
so they copy unchanged. Any other key, or a missing one, is an error naming the file. The
original loads with strict=False; we load strictly.

Loading: `checkpoint` is the released `ImageReward.pt` (a plain state_dict; local path or
hf-hub:THUDM/ImageReward/ImageReward.pt), read with torch.load(weights_only=True). The
architecture is built in (ImageReward v1.0, above) unless `blip_config` names a hub id or a
local directory with a transformers BlipConfig (tests use a tiny one). `tokenizer` is a hub id
or directory of a BERT tokenizer (default bert-base-uncased). The image-reward package is not
needed (it does not import on transformers 5).

Preprocessing runs in torch on float images so that the score is differentiable with respect
to the pixels: bicubic resize of the shorter side with antialiasing (long side truncated like
torchvision), center crop with torchvision's rounded offset, clamp to [0, 1], normalise. The
original resizes an 8-bit PIL image (PIL's bicubic, rounded back to uint8); at the model's
size (no resize) the two are identical, otherwise they differ by about one 8-bit step per
pixel before normalisation (tested; `preprocess_pil` runs the original path).

Verified against the original code: scripts/make_image_reward_reference.py builds the original
ImageReward class (image-reward 1.5, under transformers 4.46 in a throwaway venv) at the tiny
sizes of rewards/fixtures.py, loads a deterministic state dict into it strictly, and records
its scores; tests/unit/rewards/test_rewards_image_reward.py checks that this adapter, loading the same
state dict through the key mapping, gives the same scores.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mmalign.config import num
from mmalign.registry import register_reward
from mmalign.types import Samples

from .aesthetic import AestheticMLP
from .common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipTransform,
    check_batch,
    check_file_spec,
    check_model_spec,
    grad_mode,
    load_state_dict,
    load_strict,
    module_device,
    resolve_file,
    reward_info,
    torch_dtype,
)

# ImageReward.ImageReward.__init__: self.mean, self.std (normalisation of the MLP output)
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
IMAGE_REWARD_MAX_LENGTH = 35
IMAGE_REWARD_CHECKPOINT = "hf-hub:THUDM/ImageReward/ImageReward.pt"


def image_reward_formula(raw: Tensor) -> Tensor:
    """(MLP output - mean) / std with the published constants."""
    return (raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


def image_reward_v1_config():
    """The released model's architecture as a transformers BlipConfig (see the module docstring)."""
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=16,
            layer_norm_eps=1e-6,
            hidden_act="gelu",
        ),
        text_config=dict(
            vocab_size=30524,
            hidden_size=768,
            encoder_hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=512,
            layer_norm_eps=1e-12,
            hidden_act="gelu",
            is_decoder=True,
            pad_token_id=0,
        ),
    )


# --------------------------------------------------------------------------- key mapping

# (released checkpoint prefix, our module prefix); {i} is a block index.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ("blip.visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{i}.norm1.", "vision_model.encoder.layers.{i}.layer_norm1."),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.", "vision_model.encoder.layers.{i}.self_attn.qkv."),
    ("blip.visual_encoder.blocks.{i}.attn.proj.", "vision_model.encoder.layers.{i}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{i}.norm2.", "vision_model.encoder.layers.{i}.layer_norm2."),
    ("blip.visual_encoder.blocks.{i}.mlp.fc1.", "vision_model.encoder.layers.{i}.mlp.fc1."),
    ("blip.visual_encoder.blocks.{i}.mlp.fc2.", "vision_model.encoder.layers.{i}.mlp.fc2."),
    ("blip.visual_encoder.norm.", "vision_model.post_layernorm."),
    ("blip.text_encoder.", "text_encoder."),
    ("mlp.layers.", "mlp.layers."),
)
# in the released state_dict but not used by the score
UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def _pattern(prefix: str) -> re.Pattern:
    return re.compile("^" + re.escape(prefix).replace(re.escape("{i}"), r"(\d+)") + "(.*)$")


_FORWARD = [(_pattern(a), b) for a, b in KEY_MAP]
_BACKWARD = [(_pattern(b), a) for a, b in KEY_MAP]


def _rename(key: str, table) -> str | None:
    for pat, target in table:
        m = pat.match(key)
        if m:
            groups = m.groups()
            out = target.replace("{i}", groups[0]) if "{i}" in target else target
            return out + groups[-1]
    return None


def convert_original_state_dict(sd: Mapping[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """Released ImageReward.pt keys -> ImageRewardModel keys (unused keys dropped, unknown ones refused)."""
    out, unknown = {}, []
    for key, value in sd.items():
        if key.startswith(UNUSED_PREFIXES):
            continue
        new = _rename(key, _FORWARD)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(
            f"{source}: not an ImageReward checkpoint: {len(unknown)} unknown keys, e.g. {unknown[:5]} "
            "(expected blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*)"
        )
    return out


def to_original_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ImageRewardModel keys -> the released checkpoint's keys (used to write test fixtures)."""
    out = {}
    for key, value in sd.items():
        new = _rename(key, _BACKWARD)
        if new is None:
            raise KeyError(f"no released-checkpoint name for {key}")
        out[new] = value
    return out


# --------------------------------------------------------------------------- model


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attending BERT + MLP head; forward returns the raw (unnormalised) MLP output."""

    def __init__(self, config: Any):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        vcfg, tcfg = config.vision_config, config.text_config
        if not getattr(tcfg, "is_decoder", False):
            tcfg.is_decoder = True  # builds the cross-attention blocks (BlipTextLayer)
        if tcfg.encoder_hidden_size != vcfg.hidden_size:
            raise ValueError(
                f"blip_config: text encoder_hidden_size {tcfg.encoder_hidden_size} != vision hidden_size "
                f"{vcfg.hidden_size} (the text encoder cross-attends to the image tokens)"
            )
        self.vision_model = BlipVisionModel(vcfg)
        self.text_encoder = BlipTextModel(tcfg, add_pooling_layer=False)
        self.mlp = AestheticMLP(tcfg.hidden_size)

    def text_features(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The text encoder's first ([CLS]) token after cross-attending to all image tokens: [B, D]."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
        )
        return out.last_hidden_state[:, 0, :]

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        feats = self.text_features(pixel_values, input_ids, attention_mask)
        head_dtype = self.mlp.layers[0].weight.dtype
        return self.mlp(feats.to(head_dtype)).squeeze(-1)


# --------------------------------------------------------------------------- reward


@dataclass
class ImageRewardConfig:
    checkpoint: str = IMAGE_REWARD_CHECKPOINT  # the released ImageReward.pt: local path or hf-hub:ORG/REPO/FILE
    blip_config: str | None = (
        None  # None: ImageReward v1.0 (ViT-L/16 224 px + BERT-base); or hub id / dir of a BlipConfig
    )
    tokenizer: str = "bert-base-uncased"  # hub id or local directory of a BERT tokenizer
    max_length: int = num(IMAGE_REWARD_MAX_LENGTH, ge=1)
    batch_size: int = num(16, ge=1)
    differentiable: bool = True
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"  # float64: gradient checks
    device: str | None = None

    def validate(self) -> None:
        check_file_spec(self.checkpoint, "checkpoint")
        check_model_spec(self.blip_config, "blip_config")
        check_model_spec(self.tokenizer, "tokenizer")
        if self.max_length < 2:
            raise ValueError("max_length: must be >= 2 ([CLS] and [SEP])")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")


def load_blip_config(spec: str | None):
    if spec is None:
        return image_reward_v1_config()
    from transformers import BlipConfig

    return BlipConfig.from_pretrained(spec)


def load_image_reward_tokenizer(spec: str):
    """BLIP's init_tokenizer: the BERT tokenizer plus [DEC] (bos) and [ENC] special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageReward:
    """ImageReward score: (MLP(BLIP text-encoder [CLS] | image) - mean) / std; batched; differentiable."""

    modality = "image"
    uses_prompts = True  # scores media against its prompt: `mmalign score` refuses an empty one

    def __init__(self, cfg: ImageRewardConfig, name: str = "image_reward"):
        self.cfg, self.name = cfg, name
        self.differentiable = cfg.differentiable
        blip_cfg = load_blip_config(cfg.blip_config)
        path = resolve_file(cfg.checkpoint, "checkpoint")
        sd = convert_original_state_dict(load_state_dict(path), path)
        head = sd.get("mlp.layers.0.weight")
        width = int(blip_cfg.text_config.hidden_size)
        if head is not None and head.shape[1] != width:
            raise ValueError(
                f"{path}: MLP head expects {head.shape[1]}-d text features but the BLIP config "
                f"({cfg.blip_config or 'ImageReward v1.0'}) has a {width}-d text encoder"
            )
        model = ImageRewardModel(blip_cfg)
        try:
            load_strict(model, sd, path)
        except RuntimeError as e:  # shape mismatches (e.g. a 384 px BLIP config for a 224 px checkpoint)
            raise ValueError(
                f"{path}: checkpoint does not match the BLIP config "
                f"({cfg.blip_config or 'ImageReward v1.0'}): {str(e).splitlines()[-1].strip()}"
            ) from None
        dtype = torch_dtype(cfg.dtype)
        self.compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        model.vision_model.to(dtype)
        model.text_encoder.to(dtype)
        model.mlp.to(self.compute_dtype)  # the original scores the [CLS] feature in float32 (.float())
        self.model = model.eval().requires_grad_(False)
        if cfg.device:
            self.model.to(cfg.device)
        self.tokenizer = load_image_reward_tokenizer(cfg.tokenizer)
        size = int(blip_cfg.vision_config.image_size)
        self.image_size = size
        # ImageReward._transform(224): Resize(224, BICUBIC) -> CenterCrop(224) -> ToTensor -> Normalize
        self.transform = ClipTransform(
            resize=size,
            crop=(size, size),
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
            crop_offset="round",
            interpolation="bicubic",
        )

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    def preprocess(self, images: Tensor) -> Tensor:
        """B,3,H,W in [0,1] -> normalised pixel_values at the model's size (differentiable)."""
        return self.transform(images)

    def preprocess_pil(self, pil_images: list) -> Tensor:
        """The original (non-differentiable) PIL path: torchvision Resize/CenterCrop/ToTensor/Normalize."""
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

        tf = Compose(
            [
                Resize(self.image_size, interpolation=InterpolationMode.BICUBIC),
                CenterCrop(self.image_size),
                lambda im: im.convert("RGB"),
                ToTensor(),
                Normalize(self.transform.mean, self.transform.std),
            ]
        )
        return torch.stack([tf(im) for im in pil_images])

    def tokenize(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        tok = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
        )
        return {"input_ids": tok["input_ids"].to(self.device), "attention_mask": tok["attention_mask"].to(self.device)}

    def raw_scores(self, pixel_values: Tensor, prompts: Sequence[str]) -> Tensor:
        """MLP output (before normalisation) for already-preprocessed pixel_values."""
        x = pixel_values.to(self.device, next(self.model.vision_model.parameters()).dtype)
        return self.model(x, **self.tokenize(prompts)).to(self.compute_dtype)

    def score_pixels(self, pixel_values: Tensor, prompts: Sequence[str]) -> Tensor:
        return image_reward_formula(self.raw_scores(pixel_values, prompts))

    def __call__(self, samples: Samples, prompts: Sequence[str]) -> Tensor:
        images = samples.require("image", f"reward {self.name!r}")
        check_batch(self.name, len(images), prompts)
        bs, out = self.cfg.batch_size, []
        with grad_mode(self.differentiable):
            for i in range(0, len(images), bs):
                x = self.preprocess(images[i : i + bs].to(self.device, self.compute_dtype))
                out.append(self.score_pixels(x, prompts[i : i + bs]))
        return torch.cat(out)


@register_reward("image_reward", ImageRewardConfig)
@reward_info("image", "config (default yes)", "ImageReward.pt (original keys) into transformers BLIP ViT + BERT + MLP")
def build_image_reward(cfg: ImageRewardConfig) -> ImageReward:
    """ImageReward: (MLP(BLIP [CLS] text feature cross-attending the image) - mean) / std."""
    return ImageReward(cfg)
