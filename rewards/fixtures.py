"""Tiny random models of the real classes each reward adapter loads, saved to a directory.

A public testing API: used by tests/unit/rewards/ and benchmarks/reward_throughput.py, not
by any reward at run time (nothing here downloads).
Each `make_*` writes what a user's hub id / local path / checkpoint file would hold and
returns the config arguments that load it through the adapter's normal code path.
The sizes are listed in docs/tiny_models.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

TINY_CLIP_TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
)
TINY_CLIP_VISION = dict(
    image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
)

# ChatML-style template for the tiny VLM tokenizers: images/audio become the processor's
# placeholder token, which the processor then expands to the model's feature count.
_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ IMAGE }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = (
    "Yes No yes no A B 1 2 3 4 5 6 7 8 9 10 Image Audio : ? . , \" ' image audio first second "
    "better which does this figure show a an the photo of red green blue circle square triangle "
    "cat dog on left right above below and is in sound rate from to how well match matches "
    "prompt please answer or one two with only number picture describe quality user assistant system "
    "Does Please Which How Rate Is Answer You are helpful"
).split()


def seed_all(seed: int = 0) -> None:
    torch.manual_seed(seed)


def word_tokenizer(specials: dict[int, str], chat_template: str | None = None, vocab_size: int = 256):
    """A WordLevel tokenizer (tokenizers) wrapped in PreTrainedTokenizerFast.

    `specials` pins special tokens to ids (e.g. {250: "<image>"}), as the tiny model configs
    reference them by id.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab: dict[str, int] = {t: i for i, t in enumerate(base)}
    for w in WORDS:
        if w not in vocab and len(vocab) < min(specials, default=vocab_size):
            vocab[w] = len(vocab)
    for i, tok in specials.items():
        vocab[tok] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=list(specials.values()),
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def open_clip_tokenizer_files(directory: str | Path) -> tuple[str, str]:
    """vocab.json + merges.txt for transformers' CLIPTokenizer from open_clip's bundled BPE."""
    from open_clip.tokenizer import SimpleTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    st = SimpleTokenizer()
    ren = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {ren.get(k, k): v for k, v in st.encoder.items()}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m, _ in merges) + "\n")
    return str(directory / "vocab.json"), str(directory / "merges.txt")


def clip_tokenizer(directory: str | Path):
    from transformers import CLIPTokenizer

    v, m = open_clip_tokenizer_files(Path(directory) / "_bpe")
    return CLIPTokenizer(vocab_file=v, merges_file=m)


# --------------------------------------------------------------------------- CLIP family


def make_clip_hf(directory: str | Path, seed: int = 0, image_size: int = 32) -> dict:
    """A tiny transformers CLIPModel + CLIPTokenizer + CLIPImageProcessor saved to `directory`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    seed_all(seed)
    directory = Path(directory)
    vision = dict(TINY_CLIP_VISION, image_size=image_size)
    model = CLIPModel(CLIPConfig(text_config=TINY_CLIP_TEXT, vision_config=vision, projection_dim=16))
    model.save_pretrained(directory)
    clip_tokenizer(directory).save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(directory)
    return {"model": str(directory)}


def make_hps_checkpoint(directory: str | Path, seed: int = 0) -> dict:
    """A tiny open_clip model's state_dict saved the way HPS_v2*_compressed.pt stores it."""
    import open_clip

    seed_all(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    open_clip.factory._MODEL_CONFIGS.setdefault("mmalign-tiny-clip", dict(TINY_OPEN_CLIP))
    model = open_clip.create_model("mmalign-tiny-clip", pretrained=None)
    path = directory / "HPS_tiny_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return {"checkpoint": str(path), "model_config": dict(TINY_OPEN_CLIP)}


def make_aesthetic(directory: str | Path, seed: int = 0, embed_dim: int = 16) -> dict:
    """Tiny CLIP backbone + an MLP head checkpoint with the released predictor's key layout."""
    from mmalign.rewards.aesthetic import AestheticMLP

    directory = Path(directory)
    args = make_clip_hf(directory / "clip", seed=seed)
    seed_all(seed + 1)
    head = AestheticMLP(embed_dim)
    path = directory / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), path)
    return {"clip_model": args["model"], "head": str(path)}


# --------------------------------------------------------------------------- ImageReward

# The tiny ImageReward used by the tests and by scripts/make_image_reward_reference.py (which
# builds the ORIGINAL ImageReward class at these sizes): ViT 32 px / patch 8 / width 32 / depth
# 2 / 2 heads, BERT width 32 / 2 layers / 2 heads / FFN 64, cross-attention to the ViT tokens.
TINY_IMAGE_REWARD = dict(
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    text_width=32,
    text_layers=2,
    text_heads=2,
    text_intermediate=64,
    max_position_embeddings=40,
)
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_vocab() -> list[str]:
    """A small uncased WordPiece vocabulary: BERT's specials, the test words, a few '##' pieces."""
    vocab = list(BERT_SPECIALS)
    for w in [w.lower() for w in WORDS] + ["##s", "##ed", "##ing"]:
        if w not in vocab:
            vocab.append(w)
    return vocab


def write_bert_tokenizer(directory: str | Path) -> str:
    """vocab.txt + tokenizer_config.json: loads as BertTokenizer in transformers 4 and 5 alike."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512})
    )
    return str(directory)


def tiny_image_reward_blip_config():
    """transformers BlipConfig of the tiny ImageReward (vocab = BERT vocab + [DEC] + [ENC], as BLIP's)."""
    from transformers import BlipConfig

    t = TINY_IMAGE_REWARD
    return BlipConfig(
        vision_config=dict(
            hidden_size=t["vision_width"],
            intermediate_size=4 * t["vision_width"],
            num_hidden_layers=t["vision_layers"],
            num_attention_heads=t["vision_heads"],
            image_size=t["image_size"],
            patch_size=t["patch_size"],
            layer_norm_eps=1e-6,
            hidden_act="gelu",
        ),
        text_config=dict(
            vocab_size=len(bert_vocab()) + 2,
            hidden_size=t["text_width"],
            encoder_hidden_size=t["vision_width"],
            intermediate_size=t["text_intermediate"],
            num_hidden_layers=t["text_layers"],
            num_attention_heads=t["text_heads"],
            max_position_embeddings=t["max_position_embeddings"],
            layer_norm_eps=1e-12,
            hidden_act="gelu",
            is_decoder=True,
            pad_token_id=0,
            sep_token_id=3,
            eos_token_id=3,
            bos_token_id=len(bert_vocab()),
        ),  # [DEC], added after the vocabulary as in BLIP
    )


def det_uniform(name: str, shape, seed: int = 0):
    """Deterministic values in [-1, 1) for `name` (splitmix64 of the element index, float64).

    Independent of torch's and numpy's random streams, so the same numbers come out in any
    environment (the reference script runs the original ImageReward in another venv)."""
    import zlib

    import numpy as np

    n = int(np.prod(shape)) if len(shape) else 1
    base = (zlib.crc32(name.encode()) << 24) ^ (seed << 56)
    x = np.arange(n, dtype=np.uint64) + np.uint64(base & (2**64 - 1)) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    u = (x >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return torch.from_numpy(2.0 * u - 1.0).reshape(tuple(shape))


def det_state_dict(keys: list, seed: int = 0) -> dict:
    """A well-scaled deterministic state dict for [(name, shape), ...] (any key layout):
    LayerNorm weights 1 + 0.2u, biases 0.1u, matrices u * sqrt(3 / fan_in) (unit-variance
    activations), embeddings / tokens 0.5u, `position_ids` buffers arange."""
    sd = {}
    for name, shape in keys:
        shape = tuple(shape)
        if name.endswith("position_ids"):
            sd[name] = torch.arange(shape[-1]).expand(shape).clone()
            continue
        u = det_uniform(name, shape, seed)
        leaf = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name.lower() and len(shape) == 1
        if is_norm and leaf == "weight":
            v = 1.0 + 0.2 * u
        elif leaf == "bias":
            v = 0.1 * u
        elif len(shape) >= 2 and leaf == "weight" and "embedding" not in name:
            fan_in = int(torch.tensor(shape[1:]).prod())
            v = u * (3.0 / fan_in) ** 0.5
        else:
            v = 0.5 * u
        sd[name] = v.to(torch.float32)
    return sd


def det_images(n: int, h: int, w: int, seed: int = 0):
    """n deterministic uint8 images [n, 3, h, w] (smooth blobs plus noise, so resizing matters)."""
    import torch.nn.functional as F

    coarse = (det_uniform(f"img-coarse-{h}x{w}", (n, 3, 4, 4), seed) + 1) / 2
    fine = det_uniform(f"img-fine-{h}x{w}", (n, 3, h, w), seed) * 0.15
    x = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) + fine
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def make_image_reward(directory: str | Path, seed: int = 0) -> dict:
    """A tiny ImageReward: BLIP config dir, BERT tokenizer dir, and `ImageReward.pt` holding
    deterministic weights in the released checkpoint's key layout (blip.visual_encoder...,
    blip.text_encoder..., blip.vision_proj/text_proj, mlp.layers...)."""
    from mmalign.rewards.image_reward import ImageRewardModel, to_original_state_dict

    directory = Path(directory)
    cfg = tiny_image_reward_blip_config()
    cfg.save_pretrained(directory / "blip")
    tok = write_bert_tokenizer(directory / "tokenizer")
    keys = [(k, tuple(v.shape)) for k, v in to_original_state_dict(ImageRewardModel(cfg).state_dict()).items()]
    # what the original also saves but the score never uses (BLIP's ITC projections, a buffer)
    keys += [
        ("blip.vision_proj.weight", (16, cfg.vision_config.hidden_size)),
        ("blip.vision_proj.bias", (16,)),
        ("blip.text_proj.weight", (16, cfg.text_config.hidden_size)),
        ("blip.text_proj.bias", (16,)),
        ("blip.text_encoder.embeddings.position_ids", (1, cfg.text_config.max_position_embeddings)),
    ]
    path = directory / "ImageReward.pt"
    torch.save(det_state_dict(keys, seed), path)  # well-scaled weights: scores and gradients are not tiny
    return {"checkpoint": str(path), "blip_config": str(directory / "blip"), "tokenizer": tok}


# --------------------------------------------------------------------------- VLMs


def make_llava(directory: str | Path, seed: int = 0) -> dict:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    seed_all(seed)
    directory = Path(directory)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            pad_token_id=1,
        ),
        image_token_index=250,
    )
    LlavaForConditionalGeneration(cfg).save_pretrained(directory)
    tok = word_tokenizer(
        {250: "<image>", 254: "<|im_start|>", 255: "<|im_end|>"}, _CHATML.replace("{{ IMAGE }}", "<image>")
    )
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    proc.save_pretrained(directory)
    return {"model": str(directory)}


def make_qwen2vl(directory: str | Path, seed: int = 0) -> dict:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    seed_all(seed)
    directory = Path(directory)
    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            bos_token_id=2,
            eos_token_id=3,
            rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},
        ),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=250,
        vision_start_token_id=252,
        vision_end_token_id=253,
    )
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(directory)
    tmpl = _CHATML.replace("{{ IMAGE }}", "<|vision_start|><|image_pad|><|vision_end|>")
    tok = word_tokenizer(
        {
            250: "<|image_pad|>",
            251: "<|video_pad|>",
            252: "<|vision_start|>",
            253: "<|vision_end|>",
            254: "<|im_start|>",
            255: "<|im_end|>",
        },
        tmpl,
    )
    proc = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56),
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tok,
        chat_template=tmpl,
    )
    proc.save_pretrained(directory)
    return {"model": str(directory)}


# --------------------------------------------------------------------------- audio


def make_clap(directory: str | Path, seed: int = 0, sampling_rate: int = 16000) -> dict:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    seed_all(seed)
    directory = Path(directory)
    cfg = ClapConfig(
        audio_config=dict(
            spec_size=128,
            num_mel_bins=64,
            window_size=4,
            depths=[1, 1],
            num_attention_heads=[2, 2],
            patch_embeds_hidden_size=16,
            hidden_size=32,
            patch_size=4,
            patch_stride=[4, 4],
            enable_fusion=False,
            projection_dim=16,
        ),
        text_config=dict(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=80,
            projection_dim=16,
            pad_token_id=1,
        ),
        projection_dim=16,
    )
    ClapModel(cfg).save_pretrained(directory)
    fe = ClapFeatureExtractor(
        feature_size=64,
        sampling_rate=sampling_rate,
        hop_length=160,
        fft_window_size=400,
        max_length_s=2,
        truncation="rand_trunc",
        frequency_max=sampling_rate // 2,
    )
    tok = word_tokenizer({})
    ClapProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(directory)
    return {"model": str(directory)}


def make_qwen2audio(directory: str | Path, seed: int = 0) -> dict:
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    seed_all(seed)
    directory = Path(directory)
    cfg = Qwen2AudioConfig(
        audio_config=dict(
            d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=128
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            bos_token_id=2,
            eos_token_id=3,
        ),
        audio_token_index=250,
    )
    Qwen2AudioForConditionalGeneration(cfg).save_pretrained(directory)
    tok = word_tokenizer(
        {250: "<|AUDIO|>", 251: "<|audio_bos|>", 252: "<|audio_eos|>", 254: "<|im_start|>", 255: "<|im_end|>"}
    )
    proc = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok)
    tok.chat_template = proc.chat_template
    proc = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok, chat_template=proc.chat_template
    )
    proc.save_pretrained(directory)
    return {"model": str(directory)}


# Audiobox Aesthetics: a tiny WavLM in the original's WavLMConfig names (as in
# scripts/make_audiobox_reference.py) and made-up target statistics.
TINY_WAVLM = {
    "encoder_layers": 2,
    "encoder_embed_dim": 24,
    "encoder_ffn_embed_dim": 32,
    "encoder_attention_heads": 3,
    "conv_feature_layers": "[(12,10,5)] + [(12,3,2)] * 4 + [(12,2,2)] * 2",
    "conv_pos": 16,
    "conv_pos_groups": 4,
}
AUDIOBOX_TARGETS = {
    "CE": {"mean": 5.6, "std": 1.3},
    "CU": {"mean": 6.4, "std": 1.7},
    "PC": {"mean": 3.9, "std": 1.1},
    "PQ": {"mean": 7.1, "std": 0.9},
}


def make_audiobox(directory: str | Path, seed: int = 0) -> dict:
    """A tiny Audiobox Aesthetics model in the hub repo's layout: config.json (AesMultiOutput
    fields + target_transform) and model.safetensors with the original key names."""
    from safetensors.torch import save_file

    from mmalign.rewards.audiobox import HEAD_DEFAULTS, AudioboxAestheticsModel, original_state_dict, wavlm_arch

    seed_all(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arch = wavlm_arch(TINY_WAVLM)
    model = AudioboxAestheticsModel(arch, dict(HEAD_DEFAULTS, nth_layer=arch["encoder_layers"] + 1))
    with torch.no_grad():  # heads away from their trivial init (uniform layer weights, tiny outputs)
        for name, p in model.named_parameters():
            if name.startswith(("layer_weights", "proj_layer")):
                p.add_(torch.randn_like(p))
    sd = original_state_dict(model.state_dict())
    sd["wavlm_model.mask_emb"] = torch.rand(arch["encoder_embed_dim"])
    save_file({k: v.contiguous() for k, v in sd.items()}, directory / "model.safetensors")
    cfg = {"nth_layer": arch["encoder_layers"] + 1, "target_transform": AUDIOBOX_TARGETS}
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    return {"model": str(directory), "wavlm": dict(TINY_WAVLM)}


# --------------------------------------------------------------------------- shared cache

_BUILDERS = {
    "clip_hf": make_clip_hf,
    "hps": make_hps_checkpoint,
    "aesthetic": make_aesthetic,
    "image_reward": make_image_reward,
    "llava": make_llava,
    "qwen2vl": make_qwen2vl,
    "clap": make_clap,
    "qwen2audio": make_qwen2audio,
    "audiobox": make_audiobox,
}
_CACHE: dict[str, dict] = {}
_ROOT: list = []


def tiny(kind: str) -> dict:
    """Build (once per process) the tiny model `kind` in a temp dir; returns its config args."""
    if kind not in _CACHE:
        import tempfile

        if not _ROOT:
            _ROOT.append(tempfile.TemporaryDirectory(prefix="mmalign-tiny-"))
        _CACHE[kind] = _BUILDERS[kind](Path(_ROOT[0].name) / kind)
    return dict(_CACHE[kind])


# --------------------------------------------------------------------------- a test reward


def register_test_rewards() -> None:
    """Register `test_mean_pixel` (score = scale * mean pixel value + offset): a reward whose
    value is known by hand, for mixes, video aggregation and the CLI. Idempotent."""
    from dataclasses import dataclass

    from mmalign import registry
    from mmalign.config import num

    if "test_mean_pixel" in registry.REWARDS:
        return

    @dataclass
    class MeanPixelConfig:
        scale: float = num(1.0)
        offset: float = num(0.0)

    class MeanPixel:
        modality = "image"
        differentiable = True

        def __init__(self, cfg: MeanPixelConfig):
            self.cfg, self.name = cfg, "test_mean_pixel"

        def __call__(self, samples, prompts):
            x = samples.require("image", "reward 'test_mean_pixel'")
            return self.cfg.scale * x.flatten(1).mean(1) + self.cfg.offset

        def embed_images(self, images):
            return torch.nn.functional.normalize(images.flatten(1), dim=-1)

    def build(cfg: MeanPixelConfig) -> MeanPixel:
        """Test reward: scale * mean pixel value + offset."""
        return MeanPixel(cfg)

    build.modality, build.differentiable, build.loads = "image", True, "nothing (test reward)"
    registry.register_reward("test_mean_pixel", MeanPixelConfig)(build)
