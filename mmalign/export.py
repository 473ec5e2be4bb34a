"""Export a run's trained LoRA for the tools people use, with a Hub model card.

    diffusers  OUT/pytorch_lora_weights.safetensors   `pipe.load_lora_weights(OUT)` (rank and alpha
                                                        in the file's adapter metadata)
    kohya      OUT/<run name>.safetensors               ComfyUI, AUTOMATIC1111, Forge, SD.Next: the key
                                                        names of diffusers' `convert_state_dict_to_kohya`
                                                        (SD1.5, SDXL) and the inverse of its kohya FLUX
                                                        loader (`_convert_kohya_flux_lora_to_diffusers`)
    peft       OUT/adapter_config.json, adapter_model.safetensors   `PeftModel.from_pretrained(denoiser, OUT)`

Every export also writes OUT/README.md, a model card in the Hub's format (YAML metadata, then the
base model, method, reward, data, steps and final evaluation). The directory is written beside
OUT and renamed into place, so a failed export leaves no half-written OUT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FORMATS = ("diffusers", "kohya", "peft")
LORA_FILE = "pytorch_lora_weights.safetensors"
# kohya's `ss_base_model_version` per architecture (sd-scripts' metadata)
KOHYA_BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "sd3"}
ARCH_NAMES = {
    "sd15": "Stable Diffusion 1.x",
    "sdxl": "Stable Diffusion XL",
    "flux": "FLUX.1",
    "sd3": "Stable Diffusion 3",
    "animatediff": "AnimateDiff (motion modules of a Stable Diffusion 1.x UNet)",
}


class ExportError(ValueError):
    """Bad input to an export (not a run, no LoRA, unknown format): one line naming what is wrong."""


@dataclass
class RunInfo:
    """What an export needs to know about a finished run directory."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    final_eval: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.config.get("run", {}).get("name") or self.path.name)

    @property
    def steps(self) -> int | None:
        return self.summary.get("steps", self.config.get("train", {}).get("steps"))


def read_run(path: str | Path) -> RunInfo:
    """A run directory's config.yaml, summary.json and last evaluation (metrics.jsonl)."""
    p = Path(path)
    if not (p / "config.yaml").is_file():
        raise ExportError(f"{p}: not a run directory (no config.yaml); give the --output-dir of `mmalign train`")
    try:
        config = yaml.safe_load((p / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise ExportError(f"{p / 'config.yaml'}: not valid YAML ({e.__class__.__name__})") from None
    summary = _read_json(p / "summary.json")
    final_eval: dict[str, Any] = {}
    metrics = p / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a killed run
            if isinstance(row, dict) and isinstance(row.get("eval"), dict):
                final_eval = {"step": row.get("step"), **row["eval"]}
    return RunInfo(p, config, summary, final_eval)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- the LoRA
@dataclass
class Lora:
    """A trained LoRA in PEFT key names (no component prefix), with its rank, alpha and targets."""

    state_dict: dict[str, Any]
    component: str  # "unet" or "transformer"
    arch: str  # sd15 | sdxl | sd3 | flux | animatediff
    rank: int
    alpha: float
    target_modules: list[str]


def load_lora(run: RunInfo) -> Lora:
    """The LoRA of a run's final/ (written by the generator's `save_trained`)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    final = run.path / "final"
    if not (final / LORA_FILE).is_file():
        if final.is_dir():
            raise ExportError(
                f"{final}: holds fully fine-tuned weights, not a LoRA; load that directory with "
                "diffusers directly (kohya and peft exports need generator.finetune: lora)"
            )
        raise ExportError(f"{run.path}: no final/ weights (the run did not finish); nothing to export")
    sd = load_file(str(final / LORA_FILE))
    component = "unet" if any(k.startswith("unet.") for k in sd) else "transformer"
    sd = {k.removeprefix(f"{component}."): v for k, v in sd.items() if k.startswith(f"{component}.")}
    sd = convert_unet_state_dict_to_peft(sd)
    lora_cfg = run.config.get("generator", {}).get("lora") or {}
    rank = int(lora_cfg.get("rank") or next(v.shape[0] for k, v in sd.items() if "lora_A" in k))
    alpha = float(lora_cfg.get("alpha") or rank)
    modules = sorted({k.split(".lora_")[0] for k in sd})  # the exact layers, if the config does not say
    targets = list(lora_cfg.get("target_modules") or modules)
    if any(c in t for t in targets for c in "*?["):  # globs (animatediff's) mean nothing to peft: the layers
        targets = modules
    return Lora(sd, component, _architecture(run, component, sd), rank, alpha, targets)


def _architecture(run: RunInfo, component: str, sd: dict) -> str:
    """sd15 / sdxl (a UNet) or sd3 / flux (a transformer): from the base model's pipeline class when
    it is a local directory, else from the LoRA's layer names and the base model's name."""
    base = base_model(run)
    pipeline = _read_json(Path(base) / "model_index.json").get("_class_name", "")
    if run.config.get("generator", {}).get("name") == "animatediff" or any(".motion_modules." in k for k in sd):
        return "animatediff"
    if component == "transformer":
        if pipeline:
            return "flux" if "Flux" in pipeline else "sd3"
        single = any(k.startswith("single_transformer_blocks.") for k in sd)
        return "flux" if single or "flux" in base.lower() else "sd3"
    if pipeline:
        return "sdxl" if "XL" in pipeline else "sd15"
    return "sdxl" if "xl" in base.lower() else "sd15"


def base_model(run: RunInfo) -> str:
    """The generator's base model (hub id or local path) as the run resolved it."""
    return str(run.config.get("generator", {}).get("pretrained") or "unknown")


# --------------------------------------------------------------------------- formats
def to_kohya(lora: Lora) -> dict[str, Any]:
    """kohya-ss key names (lora_unet_..., lora_down / lora_up / alpha) for SD1.5, SDXL and FLUX."""
    import torch

    if lora.arch == "flux":
        return flux_to_kohya(lora)
    if lora.arch == "animatediff":
        raise ExportError(
            "kohya export: AnimateDiff motion-module LoRAs have no kohya key layout; use --format diffusers "
            "(AnimateDiffPipeline.load_lora_weights) or peft"
        )
    if lora.arch == "sd3":
        raise ExportError(
            "kohya export: SD3 LoRAs have no kohya key layout that ComfyUI / AUTOMATIC1111 agree on; "
            "use --format diffusers (ComfyUI loads diffusers-format SD3 LoRAs)"
        )
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    out = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora.state_dict.items()})
    # diffusers writes alpha = rank; the trained scale is alpha / rank, so write the real alpha
    return {k: torch.tensor(lora.alpha) if k.endswith(".alpha") else v.contiguous() for k, v in out.items()}


# the fused FLUX projections of sd-scripts, as diffusers' kohya loader splits them back
_FLUX_FUSED = {
    "double_blocks_{i}_img_attn_qkv": ("transformer_blocks.{i}.attn.", ["to_q", "to_k", "to_v"]),
    "double_blocks_{i}_txt_attn_qkv": ("transformer_blocks.{i}.attn.", ["add_q_proj", "add_k_proj", "add_v_proj"]),
    "single_blocks_{i}_linear1": (
        "single_transformer_blocks.{i}.",
        ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    ),
}
_FLUX_SINGLE = {
    "double_blocks_{i}_img_attn_proj": "transformer_blocks.{i}.attn.to_out.0",
    "double_blocks_{i}_txt_attn_proj": "transformer_blocks.{i}.attn.to_add_out",
    "double_blocks_{i}_img_mlp_0": "transformer_blocks.{i}.ff.net.0.proj",
    "double_blocks_{i}_img_mlp_2": "transformer_blocks.{i}.ff.net.2",
    "double_blocks_{i}_txt_mlp_0": "transformer_blocks.{i}.ff_context.net.0.proj",
    "double_blocks_{i}_txt_mlp_2": "transformer_blocks.{i}.ff_context.net.2",
    "single_blocks_{i}_linear2": "single_transformer_blocks.{i}.proj_out",
}


def flux_to_kohya(lora: Lora, mlp_dim: int | None = None) -> dict[str, Any]:
    """A diffusers FLUX LoRA in sd-scripts' key names (lora_unet_double_blocks_..., single_blocks_...).

    sd-scripts fuses q, k, v (and, in single blocks, the MLP input) into one linear; the LoRAs of
    the parts become one LoRA of rank parts x r: the downs stacked, the ups block-diagonal, exactly
    what diffusers' `_convert_kohya_flux_lora_to_diffusers` splits back. A part without a LoRA
    (proj_mlp, not a default target) gets a zero block. alpha is scaled with the rank so that
    alpha / rank, the LoRA scale, is unchanged.
    """
    import torch

    sd = dict(lora.state_dict)
    out: dict[str, Any] = {}
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"(?:single_)?transformer_blocks\.(\d+)\.", k))}
    for i in sorted(blocks):
        for kohya, (prefix, parts) in _FLUX_FUSED.items():
            names = [prefix.format(i=i) + p for p in parts]
            if not any(f"{n}.lora_A.weight" in sd for n in names):
                continue
            ref = next(sd[f"{n}.lora_A.weight"] for n in names if f"{n}.lora_A.weight" in sd)
            downs, ups = [], []
            for n in names:
                a, b = sd.pop(f"{n}.lora_A.weight", None), sd.pop(f"{n}.lora_B.weight", None)
                if a is None:  # a part without a LoRA: a zero block of its output width
                    width = (mlp_dim or 4 * ref.shape[1]) if n.endswith("proj_mlp") else ref.shape[1]
                    a, b = torch.zeros_like(ref), ref.new_zeros(width, ref.shape[0])
                downs.append(a)
                ups.append(b)
            key = "lora_unet_" + kohya.format(i=i)
            out[f"{key}.lora_down.weight"] = torch.cat(downs).contiguous()
            out[f"{key}.lora_up.weight"] = torch.block_diag(*ups).contiguous()
            out[f"{key}.alpha"] = torch.tensor(lora.alpha * len(names))
        for kohya, name in _FLUX_SINGLE.items():
            name = name.format(i=i)
            if f"{name}.lora_A.weight" in sd:
                key = "lora_unet_" + kohya.format(i=i)
                out[f"{key}.lora_down.weight"] = sd.pop(f"{name}.lora_A.weight").contiguous()
                out[f"{key}.lora_up.weight"] = sd.pop(f"{name}.lora_B.weight").contiguous()
                out[f"{key}.alpha"] = torch.tensor(lora.alpha)
    if sd:
        raise ExportError(f"kohya export: FLUX LoRA layers with no sd-scripts name: {sorted(sd)[:3]}")
    return out


def _adapter_metadata(lora: Lora) -> dict[str, Any]:
    return {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": lora.target_modules}


def write_diffusers(lora: Lora, out: Path) -> list[str]:
    """pytorch_lora_weights.safetensors with the adapter metadata that diffusers' loader reads."""
    from diffusers.loaders import FluxLoraLoaderMixin, SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin

    meta = _adapter_metadata(lora)
    if lora.component == "unet":
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            out, unet_lora_layers=lora.state_dict, unet_lora_adapter_metadata=meta, safe_serialization=True
        )
    else:
        mixin = FluxLoraLoaderMixin if lora.arch == "flux" else SD3LoraLoaderMixin
        mixin.save_lora_weights(
            out,
            transformer_lora_layers=lora.state_dict,
            transformer_lora_adapter_metadata=meta,
            safe_serialization=True,
        )
    return [LORA_FILE]


def write_kohya(lora: Lora, out: Path, name: str) -> list[str]:
    """One .safetensors file with kohya keys and sd-scripts' metadata."""
    from safetensors.torch import save_file

    tensors = to_kohya(lora)  # (refuses an architecture without a kohya layout)
    file = f"{_slug(name)}.safetensors"
    meta = {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": str(lora.alpha),
        "ss_base_model_version": KOHYA_BASE_VERSION[lora.arch],
    }
    save_file(tensors, str(out / file), metadata=meta)
    return [file]


def write_peft(lora: Lora, out: Path, base: str) -> list[str]:
    """adapter_config.json + adapter_model.safetensors, as `PeftModel.save_pretrained` writes them."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.target_modules, base_model_name_or_path=base
    ).save_pretrained(str(out))
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in lora.state_dict.items()},
        str(out / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    return ["adapter_config.json", "adapter_model.safetensors"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "lora"


# --------------------------------------------------------------------------- model card
def model_card(run: RunInfo, lora: Lora, fmt: str, files: list[str]) -> str:
    """README.md in the Hub's model-card format: YAML metadata, then what was trained and how well."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = run.config
    method = cfg.get("method", {}).get("name", "?")
    reward = cfg.get("reward") or {}
    data = cfg.get("data", {})
    base = base_model(run)
    hub_base = base if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists() else None
    card_data = ModelCardData(
        base_model=hub_base,
        library_name="diffusers",
        license=None,
        tags=[
            "lora",
            "text-to-video" if lora.arch == "animatediff" else "text-to-image",
            "mmalign",
            method,
            lora.arch,
            f"{fmt}-format",
        ],
    )
    data_desc = data.get("path") or data.get("prompts") or "?"
    named = (cfg.get("generator", {}).get("lora") or {}).get("target_modules")  # as configured (globs too)
    layers = lora.target_modules
    shown = ", ".join(named or layers) if named or len(layers) <= 8 else f"{len(layers)} layers"
    reward_desc = (
        f"`{reward.get('name')}`" + (f" ({reward.get('model')})" if reward.get("model") else "")
        if reward
        else "none (human labels or a fixed preference data set)"
    )
    lines = [
        f"# {run.name}",
        "",
        f"A LoRA for {ARCH_NAMES[lora.arch]} trained with mmalign's `{method}` method.",
        "",
        "| | |",
        "|---|---|",
        f"| Base model | `{base}` |",
        f"| Method | `{method}` |",
        f"| Reward | {reward_desc} |",
        f"| Data | {data.get('kind', '?')}: `{data_desc}` |",
        f"| Steps | {run.steps if run.steps is not None else '?'} |",
        f"| LoRA | rank {lora.rank}, alpha {lora.alpha:g}, on {shown} |",
        f"| Format | {fmt}: {', '.join(files)} |",
        "",
    ]
    numbers = {k: v for k, v in run.final_eval.items() if isinstance(v, (int, float)) and k != "step"}
    if numbers:
        lines += (
            [f"## Final evaluation (step {run.final_eval.get('step', '?')})", "", "| metric | value |", "|---|---|"]
            + [f"| {k} | {v:.4g} |" for k, v in numbers.items()]
            + [""]
        )
    lines += ["## Use", "", USAGE[fmt].format(base=base, file=files[0]), ""]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)))


USAGE = {
    "diffusers": "```python\nfrom diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained("
    '"{base}")\npipe.load_lora_weights("path/to/this/folder")\n```',
    "kohya": "Copy `{file}` into ComfyUI's `models/loras/` (or AUTOMATIC1111 / Forge's `models/Lora/`). "
    'diffusers reads it too: `pipe.load_lora_weights("path/to/this/folder", weight_name="{file}")`.',
    "peft": "```python\nfrom peft import PeftModel\n\ndenoiser = PeftModel.from_pretrained(pipe.unet, "
    '"path/to/this/folder")  # pipe.transformer for SD3 / FLUX\n```',
}


# --------------------------------------------------------------------------- entry point
def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """Export the LoRA of `run_dir` in `fmt` (diffusers | kohya | peft) to `out` (default RUN/export/FMT)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: unknown format; expected one of {', '.join(FORMATS)}")
    run = read_run(run_dir)
    lora = load_lora(run)
    dest = Path(out) if out is not None else run.path / "export" / fmt
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        if fmt == "diffusers":
            files = write_diffusers(lora, tmp)
        elif fmt == "kohya":
            files = write_kohya(lora, tmp, run.name)
        else:
            files = write_peft(lora, tmp, base_model(run))
        (tmp / "README.md").write_text(model_card(run, lora, fmt, files))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
