"""Audiobox Aesthetics (Tjandra et al. 2025, "Meta Audiobox Aesthetics: Unified Automatic Quality
Assessment for Speech, Music, and Sound"): four no-reference quality axes for any audio,

    CE content enjoyment, CU content usefulness, PC production complexity, PQ production quality

(each on the 1-10 scale of the annotations). The original scorer (`audiobox_aesthetics` 0.0.4,
infer.AesPredictor + model/aes.AesMultiOutput) computes, per waveform:

    resample to 16 kHz (torchaudio), mix to mono
    windows: start every hop = 10 s, length W = 10 s; a shorter (last) window is zero-padded to W
             and carries a padding mask and the weight w_i = valid_samples_i / W
    WavLM (Base size: 12 layers, 768-d, gated relative position bias) on each padded window;
             the sample mask becomes a frame mask as fairseq does it (drop T mod F trailing samples, reshape to
             F blocks, a frame is padding when its whole block is), used to zero the padded frames
             before the convolutional position embedding and as the attention key-padding mask
    h_0..h_12 = the encoder's input after pos-conv + LayerNorm, then each layer's output
    per axis k: e_k = sum_l softmax(a_k)_l h_l            (learned layer weights a_k)
                e_k = mean of e_k over the valid frames;  e_k = e_k / ||e_k||  (normalize_embed)
                y_k = MLP_k(e_k)                           (one Linear in the released heads)
                s_k = y_k * std_k + mean_k                 (targets were standardised in training;
                                                            `target_transform` stores mean/std)
    score_k = sum_i w_i s_k,i / sum_i w_i                  (over the waveform's windows)

The reward is one axis (`axis`, default "PQ": production quality is the axis that judges the
rendering itself — clarity, noise, artefacts — rather than what the audio contains) or a weighted
sum of axes (`axis_weights`, e.g. {PQ: 1.0, CE: 0.5}); `axes()` returns all four. Higher is better.

Model: rebuilt on transformers' WavLMModel, whose attention is the same port of the unilm WavLM
(gated relative position bias with the same bucket formula, one bias table in layer 0 shared by
all layers, post-LayerNorm layers, group-norm feature extractor, weight-normalised position
conv). We run its submodules with our own loop, to take every layer's hidden state and the
fairseq frame mask (WavLMModel.forward derives the frame mask from conv output lengths, which
differs by a frame or two). The released weights load from the hub repo's layout (config.json +
model.safetensors, `facebook/audiobox-aesthetics`, as AesMultiOutput.save_pretrained writes it)
or the checkpoint.pt layout ({"state_dict": {"model.<key>": ...}, "model_cfg", "target_transform"};
torch.load(weights_only=True) only); `convert_state_dict` maps the original WavLM key names to
transformers' (`original_state_dict` is its inverse). The package is not needed at run time.

Notes on the original: its `precision` field never enables autocast (it compares str(torch.dtype)
with "16"/"bf16"), so released scores are float32; its WavLM architecture is hard-coded (Base
size, 94 M parameters), so a checkpoint does not describe its backbone: the `wavlm` config field (the original's
WavLMConfig names) exists for tiny test models. Only the variant the package builds is supported
(weighted layer sum, nth_layer = layers + 1, gated relative position bias, post-LayerNorm).
Verified against the package on tiny random models (tests/fixtures/audiobox,
scripts/make_audiobox_reference.py; scores agree to ~1e-5) and, once, on the full-size random
model (agreement to 5e-7; not committed: 380 MB). Differentiable with respect to the waveform (all torch).
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmalign.config import num
from mmalign.registry import register_reward
from mmalign.types import Samples

from .clap import audio_to_mono, resample
from .common import (
    HF_PREFIX,
    check_batch,
    check_model_spec,
    grad_mode,
    load_strict,
    module_device,
    resolve_file,
    reward_info,
    torch_dtype,
)

AXES = ("CE", "CU", "PC", "PQ")
SAMPLE_RATE = 16000  # fixed by the original (AesPredictor.sample_rate)

# The backbone audiobox_aesthetics hard-codes (model/aes.py DEFAULT_AUDIO_CFG: WavLM Base size), in the
# original's WavLMConfig names; only the fields that shape the inference graph.
WAVLM_BASE: dict[str, Any] = {
    "extractor_mode": "default",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "conv_bias": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "relative_position_embedding": True,
    "num_buckets": 320,
    "max_distance": 800,
    "gru_rel_pos": True,
    "normalize": False,
}
# What the package supports differently is not what it builds: refuse rather than guess.
_FIXED = {
    "extractor_mode": "default",
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "relative_position_embedding": True,
    "gru_rel_pos": True,
    "normalize": False,
}

# AesMultiOutput's dataclass defaults (config.json from save_pretrained lists only what differs).
HEAD_DEFAULTS: dict[str, Any] = {
    "proj_num_layer": 1,
    "proj_ln": False,
    "proj_act_fn": "gelu",
    "proj_dropout": 0.0,
    "nth_layer": 13,
    "use_weighted_layer_sum": True,
    "precision": "32",
    "normalize_embed": True,
    "output_dim": 1,
}


# --------------------------------------------------------------------------- backbone config


def parse_conv_layers(spec: str | Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """The original's `conv_feature_layers` ("[(512,10,5)] + [(512,3,2)] * 4 + ...", which it
    eval()s) read with a literal-only evaluator, or a list of (dim, kernel, stride)."""
    if isinstance(spec, str):

        def ev(node: ast.AST) -> Any:
            if isinstance(node, ast.Constant) and isinstance(node.value, int):
                return node.value
            if isinstance(node, (ast.List, ast.Tuple)):
                items = [ev(e) for e in node.elts]
                return items if isinstance(node, ast.List) else tuple(items)
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
                a, b = ev(node.left), ev(node.right)
                return a + b if isinstance(node.op, ast.Add) else a * b
            raise ValueError(f"conv_feature_layers: unsupported expression {ast.dump(node)[:60]}")

        spec = ev(ast.parse(spec, mode="eval").body)
    layers = [tuple(int(v) for v in layer) for layer in spec]
    if not layers or any(len(layer) != 3 for layer in layers):
        raise ValueError(f"conv_feature_layers: expected (dim, kernel, stride) triples, got {spec!r}")
    return layers  # type: ignore[return-value]


def wavlm_arch(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The package's WavLM (Base size) with `overrides` (the original's WavLMConfig names), checked."""
    arch = dict(WAVLM_BASE)
    for key, value in (overrides or {}).items():
        if key not in arch:
            raise ValueError(f"wavlm.{key}: unknown WavLM field (allowed: {', '.join(arch)})")
        arch[key] = value
    for key, want in _FIXED.items():
        if arch[key] != want:
            raise ValueError(f"wavlm.{key}: only {want!r} is supported (what audiobox_aesthetics builds)")
    parse_conv_layers(arch["conv_feature_layers"])
    if arch["encoder_embed_dim"] % arch["encoder_attention_heads"]:
        raise ValueError("wavlm: encoder_embed_dim must be divisible by encoder_attention_heads")
    return arch


def hf_wavlm_config(arch: Mapping[str, Any]):
    """The original's WavLMConfig fields -> transformers.WavLMConfig (inference: no dropout, no masking)."""
    from transformers import WavLMConfig

    conv = parse_conv_layers(arch["conv_feature_layers"])
    return WavLMConfig(
        hidden_size=arch["encoder_embed_dim"],
        num_hidden_layers=arch["encoder_layers"],
        num_attention_heads=arch["encoder_attention_heads"],
        intermediate_size=arch["encoder_ffn_embed_dim"],
        hidden_act="gelu",
        feat_extract_activation="gelu",
        feat_extract_norm="group",
        conv_dim=[c[0] for c in conv],
        conv_kernel=[c[1] for c in conv],
        conv_stride=[c[2] for c in conv],
        conv_bias=arch["conv_bias"],
        num_conv_pos_embeddings=arch["conv_pos"],
        num_conv_pos_embedding_groups=arch["conv_pos_groups"],
        num_buckets=arch["num_buckets"],
        max_bucket_distance=arch["max_distance"],
        do_stable_layer_norm=False,
        layer_norm_eps=1e-5,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        feat_proj_dropout=0.0,
        final_dropout=0.0,
        layerdrop=0.0,
        mask_time_prob=0.0,
        mask_feature_prob=0.0,
        apply_spec_augment=False,
    )


# --------------------------------------------------------------------------- key mapping

# (original key prefix under `wavlm_model.`, transformers WavLMModel prefix); {i} is an index.
# First match wins, in this order, in both directions.
_KEY_TABLE = [
    ("feature_extractor.conv_layers.{i}.0.", "feature_extractor.conv_layers.{i}.conv."),
    ("feature_extractor.conv_layers.{i}.2.", "feature_extractor.conv_layers.{i}.layer_norm."),  # GroupNorm, layer 0
    ("layer_norm.", "feature_projection.layer_norm."),
    ("post_extract_proj.", "feature_projection.projection."),
    ("encoder.pos_conv.0.weight_g", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    ("encoder.pos_conv.0.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    ("encoder.pos_conv.0.bias", "encoder.pos_conv_embed.conv.bias"),
    ("encoder.layer_norm.", "encoder.layer_norm."),
    ("encoder.layers.{i}.self_attn.relative_attention_bias.", "encoder.layers.{i}.attention.rel_attn_embed."),
    ("encoder.layers.{i}.self_attn.grep_linear.", "encoder.layers.{i}.attention.gru_rel_pos_linear."),
    ("encoder.layers.{i}.self_attn.grep_a", "encoder.layers.{i}.attention.gru_rel_pos_const"),
    ("encoder.layers.{i}.self_attn.", "encoder.layers.{i}.attention."),  # q/k/v/out_proj
    ("encoder.layers.{i}.self_attn_layer_norm.", "encoder.layers.{i}.layer_norm."),
    ("encoder.layers.{i}.fc1.", "encoder.layers.{i}.feed_forward.intermediate_dense."),
    ("encoder.layers.{i}.fc2.", "encoder.layers.{i}.feed_forward.output_dense."),
    ("encoder.layers.{i}.final_layer_norm.", "encoder.layers.{i}.final_layer_norm."),
]
_DROPPED = {"mask_emb"}  # the pre-training mask embedding: unused at inference


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)"))


_FORWARD = [(_compile(a), b) for a, b in _KEY_TABLE]
_BACKWARD = [(_compile(b), a) for a, b in _KEY_TABLE]


def _rename(key: str, rules) -> str | None:
    for pattern, target in rules:
        m = pattern.match(key)
        if m:
            return target.replace("{i}", m.groupdict().get("i") or "") + key[m.end() :]
    return None


def convert_state_dict(sd: Mapping[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """Original AesMultiOutput keys -> this module's keys (`wavlm.` + transformers WavLMModel names,
    heads unchanged). Unknown keys are an error naming them."""
    out, unknown = {}, []
    for key, value in sd.items():
        if key.startswith(("proj_layer.", "layer_weights.")):
            out[key] = value
            continue
        sub = key[len("wavlm_model.") :] if key.startswith("wavlm_model.") else None
        if sub in _DROPPED:
            continue
        new = _rename(sub, _FORWARD) if sub is not None else None
        if new is None:
            unknown.append(key)
        else:
            out["wavlm." + new] = value
    if unknown:
        raise ValueError(f"{source}: not an Audiobox Aesthetics checkpoint: unexpected keys {unknown[:5]}")
    if "wavlm.feature_projection.projection.weight" not in out and "wavlm.feature_projection.layer_norm.weight" in out:
        # the original has no post_extract_proj when the conv dim equals the embedding dim
        dim = out["wavlm.feature_projection.layer_norm.weight"].shape[0]
        ref = out["wavlm.feature_projection.layer_norm.weight"]
        out["wavlm.feature_projection.projection.weight"] = torch.eye(dim, dtype=ref.dtype)
        out["wavlm.feature_projection.projection.bias"] = torch.zeros(dim, dtype=ref.dtype)
    return out


def original_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `convert_state_dict` (writes test checkpoints in the released layout)."""
    out = {}
    for key, value in sd.items():
        if key.startswith(("proj_layer.", "layer_weights.")):
            out[key] = value
            continue
        old = _rename(key.removeprefix("wavlm."), _BACKWARD)
        if old is None:
            raise ValueError(f"no original name for {key}")
        out["wavlm_model." + old] = value
    return out


# --------------------------------------------------------------------------- model


def mlp_block(dim: int, out_dim: int, num_layer: int, act_fn: str, layer_norm: bool, dropout: float) -> list[nn.Module]:
    """The original heads' layout (model/utils.create_mlp_block), so that keys match."""
    if act_fn != "gelu":
        raise ValueError(f"proj_act_fn: only 'gelu' is supported, got {act_fn!r}")
    layers: list[nn.Module] = []
    for i in range(num_layer):
        if i == num_layer - 1:
            layers.append(nn.Linear(dim, out_dim))
        else:
            layers.append(nn.Linear(dim, dim))
            if layer_norm:
                layers.append(nn.LayerNorm(dim))
            layers.append(nn.GELU())
            if dropout != 0:
                layers.append(nn.Dropout(dropout))
    return layers


def frame_padding_mask(lengths: Tensor, n_samples: int, n_frames: int) -> Tensor:
    """[N] valid sample counts -> [N, n_frames] bool, True = padding (fairseq WavLM's
    forward_padding_mask: drop the n_samples % n_frames trailing samples, reshape to n_frames
    blocks, a frame is padding when every sample of its block is)."""
    pad = torch.arange(n_samples, device=lengths.device)[None, :] >= lengths[:, None]
    extra = n_samples % n_frames
    if extra > 0:
        pad = pad[:, :-extra]
    return pad.view(pad.shape[0], n_frames, -1).all(-1)


class AudioboxAestheticsModel(nn.Module):
    """transformers WavLMModel + the four heads; forward -> normalised predictions per axis."""

    def __init__(self, arch: Mapping[str, Any], heads: Mapping[str, Any]):
        super().__init__()
        from transformers import WavLMModel

        self.arch, self.heads = dict(arch), dict(heads)
        self.wavlm = WavLMModel(hf_wavlm_config(arch))
        dim, n_states = arch["encoder_embed_dim"], arch["encoder_layers"] + 1
        self.layer_weights = nn.ParameterDict({k: nn.Parameter(torch.ones(n_states) / n_states) for k in AXES})
        self.proj_layer = nn.ModuleDict(
            {
                k: nn.Sequential(
                    *mlp_block(
                        dim, 1, heads["proj_num_layer"], heads["proj_act_fn"], heads["proj_ln"], heads["proj_dropout"]
                    )
                )
                for k in AXES
            }
        )

    def hidden_states(self, wave: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """[N, T] windows, [N] valid lengths -> hidden states [N, F, C, layers+1], frame mask [N, F] (True = valid)."""
        w = self.wavlm
        feats = w.feature_extractor(wave).transpose(1, 2)  # conv stack (group norm over the padded window too)
        pad = frame_padding_mask(lengths, wave.shape[-1], feats.shape[1])
        x, _ = w.feature_projection(feats)  # LayerNorm -> Linear (the original's layer_norm, post_extract_proj)
        enc = w.encoder
        x = x.masked_fill(pad[..., None], 0.0)
        x = enc.layer_norm(x + enc.pos_conv_embed(x))
        keep = ~pad
        states, bias = [x], None
        with warnings.catch_warnings():  # WavLMAttention passes a bool key mask with a float bias mask, as the original
            warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
            for i, layer in enumerate(enc.layers):
                x, bias = layer(x, attention_mask=keep, position_bias=bias, index=i)
                states.append(x)
        return torch.stack(states, dim=-1), keep

    def forward(self, wave: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        hidden, keep = self.hidden_states(wave, lengths)
        mask = keep.unsqueeze(-1).to(hidden.dtype)
        out = {}
        for axis in AXES:
            embed = hidden @ torch.softmax(self.layer_weights[axis], dim=-1)  # [N, F, C]
            embed = (embed * mask).sum(1) / mask.sum(1).clamp(min=1)
            if self.heads["normalize_embed"]:
                embed = F.normalize(embed, dim=-1)
            out[axis] = self.proj_layer[axis](embed).squeeze(-1)
        return out


# --------------------------------------------------------------------------- loading


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or Path(spec).expanduser().exists()


def _read_hub_dir(config_path: str, weights_path: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    try:
        cfg = json.loads(Path(config_path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON: {e}") from None
    return load_file(weights_path), cfg


def load_original(spec: str) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    """(original-layout state dict, AesMultiOutput config incl. target_transform, source) from a hub
    id, a save_pretrained directory, a checkpoint.pt / .safetensors file, or hf-hub:ORG/REPO/FILE."""
    if spec.startswith(HF_PREFIX):
        spec = resolve_file(spec, "model")
    path = Path(spec).expanduser()
    if path.is_dir():
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        for f in (cfg_file, weights):
            if not f.is_file():
                raise FileNotFoundError(f"model: {f} not found (a directory needs config.json + model.safetensors)")
        sd, cfg = _read_hub_dir(str(cfg_file), str(weights))
        return sd, cfg, str(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            cfg_file = path.with_name("config.json")
            if not cfg_file.is_file():
                raise FileNotFoundError(f"model: {cfg_file} not found (needed next to {path})")
            sd, cfg = _read_hub_dir(str(cfg_file), str(path))
            return sd, cfg, str(path)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickles with arbitrary objects are refused on purpose
            raise ValueError(
                f"{path}: not loadable with torch.load(weights_only=True) ({e}); use the hub "
                "layout instead (config.json + model.safetensors, facebook/audiobox-aesthetics)"
            ) from None
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise ValueError(
                f"{path}: expected a checkpoint dict with 'state_dict' (Audiobox Aesthetics checkpoint.pt)"
            )
        cfg = dict(ckpt.get("model_cfg") or {})
        if "target_transform" in ckpt:
            cfg["target_transform"] = ckpt["target_transform"]
        sd = {re.sub(r"^model\.", "", k): v for k, v in ckpt["state_dict"].items()}  # as AesPredictor renames
        return sd, cfg, str(path)
    if _looks_local(spec):
        raise FileNotFoundError(
            f"model: {spec} not found (expected a hub id, a directory with config.json + "
            "model.safetensors, or a checkpoint.pt file)"
        )
    from huggingface_hub import hf_hub_download

    sd, cfg = _read_hub_dir(hf_hub_download(spec, "config.json"), hf_hub_download(spec, "model.safetensors"))
    return sd, cfg, spec


def head_config(cfg: Mapping[str, Any], arch: Mapping[str, Any], source: str) -> tuple[dict, dict]:
    """The heads' settings (AesMultiOutput defaults filled in, checked) and {axis: (mean, std)}."""
    heads = dict(HEAD_DEFAULTS)
    heads.update({k: cfg[k] for k in HEAD_DEFAULTS if k in cfg})
    if not heads["use_weighted_layer_sum"]:
        raise ValueError(f"{source}: use_weighted_layer_sum=false is not supported (the released model uses it)")
    if int(heads["output_dim"]) != 1:
        raise ValueError(f"{source}: output_dim={heads['output_dim']}, expected 1")
    if int(heads["nth_layer"]) != arch["encoder_layers"] + 1:
        raise ValueError(
            f"{source}: nth_layer={heads['nth_layer']} but the original only runs with nth_layer = "
            f"encoder_layers + 1 = {arch['encoder_layers'] + 1} (check the `wavlm` config)"
        )
    tt = cfg.get("target_transform")
    if not isinstance(tt, Mapping) or any(not isinstance(tt.get(k), Mapping) for k in AXES):
        raise ValueError(f"{source}: target_transform must give mean and std for each of {', '.join(AXES)}")
    try:
        stats = {k: (float(tt[k]["mean"]), float(tt[k]["std"])) for k in AXES}
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{source}: target_transform must give numeric mean and std for each axis") from None
    return heads, stats


# --------------------------------------------------------------------------- reward


@dataclass
class AudioboxAestheticsConfig:
    # hub id, a directory (config.json + model.safetensors), a checkpoint.pt, or hf-hub:ORG/REPO/FILE
    model: str = "facebook/audiobox-aesthetics"
    axis: Literal["CE", "CU", "PC", "PQ"] = "PQ"
    axis_weights: dict[str, float] | None = num(None)  # score = sum_k w_k * axis_k (replaces `axis`)
    wavlm: dict[str, Any] | None = None  # backbone overrides in the original's WavLMConfig names (tiny tests)
    window_s: float = num(10.0, gt=0)  # the original: 10 s windows every 10 s
    hop_s: float = num(10.0, gt=0)
    batch_size: int = num(8, ge=1)  # windows per forward pass
    differentiable: bool = True
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"  # float64: gradient checks
    device: str | None = None

    def validate(self) -> None:
        if not self.model.startswith(HF_PREFIX):
            check_model_spec(self.model, "model")
        if self.axis_weights is not None:
            if not self.axis_weights:
                raise ValueError("axis_weights: give at least one axis")
            for k, v in self.axis_weights.items():
                if k not in AXES:
                    raise ValueError(f"axis_weights.{k}: unknown axis (one of {', '.join(AXES)})")
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"axis_weights.{k}: expected a number, got {v!r}")
        if self.window_s <= 0 or self.hop_s <= 0:
            raise ValueError("window_s, hop_s: must be > 0")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        wavlm_arch(self.wavlm)


class AudioboxAesthetics:
    modality = "audio"
    sampling_rate = SAMPLE_RATE

    def __init__(self, cfg: AudioboxAestheticsConfig, name: str = "audiobox_aesthetics"):
        self.cfg, self.name = cfg, name
        self.differentiable = cfg.differentiable
        self.arch = wavlm_arch(cfg.wavlm)
        sd, model_cfg, source = load_original(cfg.model)
        self.heads, self.target_transform = head_config(model_cfg, self.arch, source)
        self.model = AudioboxAestheticsModel(self.arch, self.heads)
        load_strict(self.model, convert_state_dict(sd, source), source)
        self.model.eval().requires_grad_(False).to(dtype=torch_dtype(cfg.dtype))
        if cfg.device:
            self.model.to(cfg.device)
        self.window = int(round(cfg.window_s * SAMPLE_RATE))
        self.hop = int(round(cfg.hop_s * SAMPLE_RATE))
        self.weights = dict(cfg.axis_weights) if cfg.axis_weights else {cfg.axis: 1.0}

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if self.model.wavlm.dtype == torch.float64 else torch.float32

    def windows(self, waves: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Mono 16 kHz waveforms -> windows [N, W] (zero-padded), valid lengths [N], owner index [N]."""
        chunks, lengths, owner = [], [], []
        for b, w in enumerate(waves):
            for start in range(0, w.shape[-1], self.hop):
                piece = w[start : start + self.window]
                n = piece.shape[-1]
                chunks.append(F.pad(piece, (0, self.window - n)) if n < self.window else piece)
                lengths.append(n)
                owner.append(b)
        dev = waves[0].device
        return torch.stack(chunks), torch.tensor(lengths, device=dev), torch.tensor(owner, device=dev)

    def predict(self, waves: Sequence[Tensor], sample_rate: int) -> dict[str, Tensor]:
        """Waveforms of any lengths ([C, T] or [T] each, in [-1, 1]) -> {axis: [B] scores}."""
        who = f"reward {self.name!r}"
        if not len(waves):
            raise ValueError(f"{who}: no waveforms")
        with grad_mode(self.differentiable):
            mono = []
            for i, w in enumerate(waves):
                w = w.to(self.device, self.compute_dtype)
                w = audio_to_mono(w[None], who)[0] if w.ndim == 2 else w
                if w.ndim != 1 or w.shape[-1] == 0:
                    raise ValueError(f"{who}: sample {i} is empty or not [C, T] / [T] (shape {tuple(w.shape)})")
                mono.append(resample(w, int(sample_rate), SAMPLE_RATE))
            chunks, lengths, owner = self.windows(mono)
            parts = [
                self.model(
                    chunks[i : i + self.cfg.batch_size].to(self.model.wavlm.dtype), lengths[i : i + self.cfg.batch_size]
                )
                for i in range(0, len(chunks), self.cfg.batch_size)
            ]
            weight = lengths.to(self.compute_dtype) / self.window
            total = torch.zeros(len(mono), dtype=self.compute_dtype, device=self.device).index_add(0, owner, weight)
            out = {}
            for axis in AXES:
                mean, std = self.target_transform[axis]
                pred = torch.cat([p[axis] for p in parts]).to(self.compute_dtype) * std + mean
                summed = torch.zeros_like(total).index_add(0, owner, pred * weight)
                out[axis] = summed / total
        return out

    def axes(self, samples: Samples) -> dict[str, Tensor]:
        """All four axes, {CE, CU, PC, PQ: [B]}."""
        audio = samples.require("audio", f"reward {self.name!r}")
        if samples.sample_rate is None:
            raise ValueError(f"reward {self.name!r}: Samples.sample_rate is not set")
        if audio.ndim not in (2, 3):
            raise ValueError(f"reward {self.name!r}: audio must be B,C,T in [-1,1], got shape {tuple(audio.shape)}")
        return self.predict(list(audio), int(samples.sample_rate))

    def combine(self, axes: Mapping[str, Tensor]) -> Tensor:
        return sum(w * axes[k] for k, w in self.weights.items())  # type: ignore[return-value]

    def __call__(self, samples: Samples, prompts: Sequence[str] | None = None) -> Tensor:
        audio = samples.require("audio", f"reward {self.name!r}")
        check_batch(self.name, len(audio), prompts, need_prompts=False)
        return self.combine(self.axes(samples))


@register_reward("audiobox_aesthetics", AudioboxAestheticsConfig)
@reward_info(
    "audio",
    "config (default yes)",
    "transformers WavLMModel + Audiobox Aesthetics heads (hub config.json + model.safetensors, or checkpoint.pt)",
)
def build_audiobox_aesthetics(cfg: AudioboxAestheticsConfig) -> AudioboxAesthetics:
    """Audiobox Aesthetics: CE/CU/PC/PQ quality axes (default PQ) from WavLM over 10 s windows; prompt unused."""
    return AudioboxAesthetics(cfg)
