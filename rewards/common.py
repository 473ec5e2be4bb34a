"""Helpers shared by the reward adapters (private: not a reward, registers nothing).

- `resolve_file`: a local checkpoint path, or `hf-hub:ORG/REPO/PATH/IN/REPO` (downloaded on a
  real run through huggingface_hub; tests only ever pass local files).
- `load_state_dict`: safetensors or `torch.load(weights_only=True)`, unwrapping
  `state_dict` / `model` containers and a DDP `module.` prefix.
- `clip_transform`: the CLIP-family pixel pipeline (resize shorter side -> center crop ->
  normalise) in torch, so that rewards are differentiable with respect to the pixels.
- `build_reward`: a reward from a registry name plus a dict of arguments, validated by
  that entry's config dataclass (used by `mix`, `ensemble`, `video_from_image`, the CLI).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from mmalign import registry
from mmalign.config import Component, ConfigError, parse_dataclass

HF_PREFIX = "hf-hub:"


# --------------------------------------------------------------------------- loading


def resolve_file(spec: str, what: str = "checkpoint") -> str:
    """A local file path, or `hf-hub:ORG/REPO/FILE` fetched with huggingface_hub."""
    if spec.startswith(HF_PREFIX):
        parts = spec[len(HF_PREFIX) :].split("/")
        if len(parts) < 3:
            raise ValueError(f"{what}: {spec!r} should look like hf-hub:ORG/REPO/FILE")
        from huggingface_hub import hf_hub_download

        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    if not Path(spec).is_file():
        raise FileNotFoundError(f"{what}: file {spec} not found")
    return spec


def check_file_spec(spec: str | None, field: str) -> None:
    """Config validation: a local file must exist; an hf-hub: spec is checked at load time."""
    if spec is None or spec.startswith(HF_PREFIX):
        return
    if not Path(spec).is_file():
        raise ValueError(f"{field}: file {spec} not found")


def check_model_spec(spec: str | None, field: str) -> None:
    """Config validation for a hub id or local directory: a path-looking value must exist."""
    if spec is None:
        return
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or Path(spec).exists()
    if looks_local and not Path(spec).expanduser().exists():
        raise ValueError(f"{field}: {spec} is neither an existing directory nor a hub id")


def load_state_dict(path: str) -> dict[str, Tensor]:
    """Weights from .safetensors or a torch pickle (weights_only=True), container keys unwrapped."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickles with arbitrary objects are refused on purpose
            raise ValueError(f"{path}: not loadable with torch.load(weights_only=True): {e}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_strict(module: torch.nn.Module, sd: Mapping[str, Tensor], source: str) -> None:
    missing, unexpected = module.load_state_dict(dict(sd), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source}: checkpoint does not match the model "
            f"(missing {len(missing)}: {list(missing)[:5]}, unexpected {len(unexpected)}: {list(unexpected)[:5]})"
        )


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}[
        name
    ]


# --------------------------------------------------------------------------- calling


def check_batch(who: str, n: int, prompts: Sequence[str] | None, need_prompts: bool = True) -> None:
    if prompts is None:
        if need_prompts:
            raise ValueError(f"reward {who!r}: needs one prompt per sample, got none")
        return
    if isinstance(prompts, str):
        raise TypeError(f"reward {who!r}: prompts must be a list of strings, got one string")
    if len(prompts) != n:
        raise ValueError(f"reward {who!r}: {n} samples but {len(prompts)} prompts")


def grad_mode(differentiable: bool) -> contextlib.AbstractContextManager:
    """Keep autograd on only when the caller wants gradients and the reward supports them."""
    return torch.set_grad_enabled(torch.is_grad_enabled() and differentiable)


def as_features(out: Any) -> Tensor:
    """transformers v5 `get_*_features` return a ModelOutput (pooler_output) or a tensor."""
    if isinstance(out, Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds", "audio_embeds"):
        val = getattr(out, key, None)
        if isinstance(val, Tensor):
            return val
    if isinstance(out, (tuple, list)) and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot read features from {type(out).__name__}")


def module_device(module: torch.nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# --------------------------------------------------------------------------- pixels

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipTransform:
    """Resize the shorter side to `resize` (or to (h, w)), center crop `crop`, normalise.

    `long_side` and `crop_offset` follow the original implementation's rounding:
    torchvision's Resize(int) and transformers both truncate the long side
    (int(size * long / short)); transformers' center crop floors the offset,
    torchvision's CenterCrop rounds it (Python round). After resizing, values are clamped to
    [0, 1] as the 8-bit originals saturate bicubic overshoot (gradient is zero where clamped).
    """

    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_offset: str = "floor"  # "floor" (transformers) | "round" (torchvision / open_clip)
    interpolation: str = "bicubic"

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        if self.resize is None:
            return h, w
        if isinstance(self.resize, tuple):
            return self.resize
        s = self.resize
        if h <= w:
            return s, int(s * w / h)
        return int(s * h / w), s

    def __call__(self, images: Tensor) -> Tensor:
        """B,3,H,W float in [0,1] -> normalised model input (differentiable)."""
        h, w = images.shape[-2:]
        nh, nw = self.resized_size(h, w)
        if (nh, nw) != (h, w):
            images = F.interpolate(images, size=(nh, nw), mode=self.interpolation, antialias=True, align_corners=False)
            # the originals resize 8-bit images, which saturates bicubic overshoot at 0 and 255
            images = images.clamp(0.0, 1.0)
        if self.crop is not None and (nh, nw) != tuple(self.crop):
            ch, cw = self.crop
            if ch > nh or cw > nw:  # both originals pad with zeros when the crop is larger
                pt, pl = max(ch - nh, 0) // 2, max(cw - nw, 0) // 2
                images = F.pad(images, (pl, max(cw - nw, 0) - pl, pt, max(ch - nh, 0) - pt))
                nh, nw = images.shape[-2:]
            if self.crop_offset == "round":
                top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
            else:
                top, left = int((nh - ch) / 2.0), int((nw - cw) / 2.0)
            images = images[..., top : top + ch, left : left + cw]
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std


def transform_from_hf_processor(proc: Any) -> ClipTransform:
    """Read a transformers CLIPImageProcessor's constants (size, crop_size, mean, std)."""
    size = getattr(proc, "size", None) or {}
    size = dict(size) if not isinstance(size, dict) else size
    size = {k: v for k, v in size.items() if v is not None}
    if not getattr(proc, "do_resize", True):
        resize = None
    elif "shortest_edge" in size:
        resize = int(size["shortest_edge"])
    elif "height" in size and "width" in size:
        resize = (int(size["height"]), int(size["width"]))
    else:
        raise ValueError(f"unsupported image processor size {size}")
    crop = None
    if getattr(proc, "do_center_crop", False):
        cs = getattr(proc, "crop_size", None) or {}
        cs = dict(cs) if not isinstance(cs, dict) else cs
        crop = (int(cs["height"]), int(cs["width"]))
    resample = getattr(proc, "resample", 3)
    interp = {2: "bilinear", 3: "bicubic", 0: "nearest"}.get(int(getattr(resample, "value", resample) or 3), "bicubic")
    mean = tuple(float(v) for v in (getattr(proc, "image_mean", None) or OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in (getattr(proc, "image_std", None) or OPENAI_CLIP_STD))
    if not getattr(proc, "do_normalize", True):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return ClipTransform(resize, crop, mean, std, crop_offset="floor", interpolation=interp)  # type: ignore[arg-type]


def images_to_uint8_pil(images: Tensor) -> list:
    """B,3,H,W in [0,1] -> PIL images (for processor-based, non-differentiable paths)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


# --------------------------------------------------------------------------- composition


def build_reward(spec: Mapping[str, Any] | Any, where: str = "reward") -> Any:
    """Build a reward from `{"name": NAME, **args}` (args validated by the entry's config).

    Also accepts a `mmalign.config.Component` (already validated) or a built reward object.
    """
    if callable(spec) and hasattr(spec, "modality"):
        return spec
    if isinstance(spec, Component):
        return registry.lookup("reward", spec.name).build(spec.args)
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(f"{where}: expected a mapping with a 'name' key (a registered reward), got {spec!r}")
    try:
        entry = registry.lookup("reward", spec["name"])
    except KeyError as e:
        raise ConfigError(f"{where}.name: {e.args[0]}") from None
    args = {k: v for k, v in spec.items() if k != "name"}
    return entry.build(parse_dataclass(entry.config, args, where))


def reward_info(modality: str, differentiable: bool | str, loads: str):
    """Attach what `mmalign score --list` prints (modality, gradients, what it loads) to a builder."""

    def deco(fn):
        fn.modality, fn.differentiable, fn.loads = modality, differentiable, loads
        return fn

    return deco
